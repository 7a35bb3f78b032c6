/**
 * This replica's view of the tasks, kept from the cluster by a watch on task Secrets (list, then
 * watch, reconnecting on its own). Any replica's starts and ends reach every other replica here.
 * Local writes update it at once, so a caller reads its own writes.
 *
 * Every record read from the cluster is verified (its signature, src/state-signature.ts) before it is
 * trusted; one that fails is kept out of the view and handed to the `onForged` listeners.
 */
import * as k8s from '@kubernetes/client-node';
import { TASK_SELECTOR, taskFacts, taskFromSecret, type Task } from './model.ts';
import type { StateSigner } from '../state-signature.ts';

export interface TaskStoreOptions {
  /** Verifies task records; without it every well-formed record is trusted (unit tests only). */
  signer?: StateSigner;
}

export class TaskStore {
  readonly #byId = new Map<string, Task>();
  readonly #removed: Array<(id: string) => void> = [];
  readonly #forged: Array<(task: Task, secret: k8s.V1Secret) => void> = [];
  readonly #signer: StateSigner | undefined;
  #informer: (k8s.Informer<k8s.V1Secret> & k8s.ObjectCache<k8s.V1Secret>) | undefined;
  #synced = false;

  constructor(options: TaskStoreOptions = {}) {
    this.#signer = options.signer;
  }

  /** Starts watching; resolves once the first list is in (and verified). */
  async watch(config: k8s.KubeConfig, namespace: string): Promise<void> {
    const core = config.makeApiClient(k8s.CoreV1Api);
    const informer = k8s.makeInformer<k8s.V1Secret>(
      config,
      `/api/v1/namespaces/${namespace}/secrets`,
      () => core.listNamespacedSecret({ namespace, labelSelector: TASK_SELECTOR }),
      TASK_SELECTOR,
    );
    const put = (s: k8s.V1Secret) => void this.#ingest(s, informer);
    informer.on('add', put);
    informer.on('update', put);
    informer.on('delete', (s) => {
      const task = taskFromSecret(s);
      if (task) this.remove(task.id);
    });
    // ListWatch reconnects by itself after an error, with backoff.
    informer.on('error', () => {
      this.#synced = false;
    });
    informer.on('connect', () => {
      this.#synced = true;
    });
    this.#informer = informer;
    await informer.start();
    await Promise.all(informer.list().map((s) => this.#ingest(s, informer)));
    this.#synced = true;
  }

  /** Trusts the record only once its signature holds, and only if it is still the current version. */
  async #ingest(secret: k8s.V1Secret, informer: k8s.ObjectCache<k8s.V1Secret>): Promise<void> {
    const task = taskFromSecret(secret);
    if (!task) return;
    let ok = true;
    if (this.#signer) {
      try {
        ok = await this.#signer.verify('task', taskFacts(task), task.signature);
      } catch {
        ok = false; // the key could not be read: trust nothing rather than everything
      }
    }
    const meta = secret.metadata ?? {};
    const now = informer.get(meta.name ?? '', meta.namespace);
    if (!now || now.metadata?.resourceVersion !== meta.resourceVersion) return; // superseded while verifying
    if (ok) {
      this.#byId.set(task.id, task);
      return;
    }
    this.remove(task.id);
    for (const cb of this.#forged) cb(task, secret);
  }

  get synced(): boolean {
    return this.#synced;
  }

  async stop(): Promise<void> {
    await this.#informer?.stop();
  }

  onRemoved(cb: (id: string) => void): void {
    this.#removed.push(cb);
  }

  /** Called with each record whose signature fails (it is not in the view). */
  onForged(cb: (task: Task, secret: k8s.V1Secret) => void): void {
    this.#forged.push(cb);
  }

  get(id: string): Task | undefined {
    return this.#byId.get(id);
  }

  findByName(agent: string, name: string): Task | undefined {
    for (const t of this.#byId.values()) if (t.agent === agent && t.name === name) return t;
    return undefined;
  }

  list(): Task[] {
    return [...this.#byId.values()];
  }

  upsert(task: Task): void {
    this.#byId.set(task.id, task);
  }

  remove(id: string): void {
    if (this.#byId.delete(id)) for (const cb of this.#removed) cb(id);
  }
}
