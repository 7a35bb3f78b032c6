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
  /**
   * The same tasks by agent, and by agent and name (`agent\0name`), so that what a request asks of the
   * store (a task by name, an agent's tasks, how many it holds) does not go through every task: with
   * 10 000 tasks held, each such scan cost a start and a credential request about as much as the
   * rest of its work (docs/benchmarks.md, "Scale"). Usually one task per name; two only for a moment
   * (a task ended on another replica whose removal has not arrived yet, and its name started again).
   */
  readonly #byAgent = new Map<string, Map<string, Task>>();
  readonly #byName = new Map<string, Map<string, Task>>();
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
    // Each listed record's verification starts as the informer adds it; the first sync waits for those.
    const inFlight = new Set<Promise<void>>();
    const put = (s: k8s.V1Secret) => {
      // The informer keeps this very object: without managedFields (nothing here reads them) it holds
      // about half as much per task.
      if (s.metadata) delete s.metadata.managedFields;
      const ingest = this.#ingest(s, informer);
      inFlight.add(ingest);
      void ingest.finally(() => inFlight.delete(ingest));
    };
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
    // start() resolves once the list is in the cache: every listed record was added (put) meanwhile,
    // so waiting for the verifications in flight is waiting for the list's (not verifying it twice).
    await informer.start();
    await Promise.all([...inFlight]);
    this.#synced = true;
  }

  /** Trusts the record only once its signature holds, and only if it is still the current version. */
  async #ingest(secret: k8s.V1Secret, informer: k8s.ObjectCache<k8s.V1Secret>): Promise<void> {
    const task = taskFromSecret(secret);
    if (!task) return;
    const ok = await this.#verified(task);
    const meta = secret.metadata ?? {};
    const now = informer.get(meta.name ?? '', meta.namespace);
    if (!now || now.metadata?.resourceVersion !== meta.resourceVersion) return; // superseded while verifying
    if (ok) {
      this.upsert(task);
      return;
    }
    this.remove(task.id);
    for (const cb of this.#forged) cb(task, secret);
  }

  /**
   * Whether the record's signature holds. A record this view already trusts, changed in what the
   * signature does not cover (its activation: the state label), carries the same signature over the
   * same facts: that holds as long as its key is still in the key set (read as verify() reads it),
   * without the Ed25519 verification again (a task start costs every replica two of them otherwise:
   * 8 % of a replica's CPU while 10 000 tasks were started; docs/benchmarks.md, "Scale").
   */
  async #verified(task: Task): Promise<boolean> {
    if (!this.#signer) return true;
    try {
      const known = this.#byId.get(task.id);
      if (known?.signature !== undefined && known.signature === task.signature && JSON.stringify(taskFacts(known)) === JSON.stringify(taskFacts(task))) {
        const kid = task.signature.slice(0, Math.max(0, task.signature.indexOf('.')));
        if (kid && (await this.#signer.publicKey(kid, false))) return true;
      }
      return await this.#signer.verify('task', taskFacts(task), task.signature);
    } catch {
      return false; // the key could not be read: trust nothing rather than everything
    }
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
    const tasks = this.#byName.get(`${agent}\0${name}`);
    return tasks?.values().next().value;
  }

  list(): Task[] {
    return [...this.#byId.values()];
  }

  /** Every task, without a copy (do not change the store while iterating). */
  values(): IterableIterator<Task> {
    return this.#byId.values();
  }

  /** The tasks of `agent` (any state). */
  ofAgent(agent: string): Task[] {
    const tasks = this.#byAgent.get(agent);
    return tasks ? [...tasks.values()] : [];
  }

  /** How many tasks `agent` holds (any state). */
  countOf(agent: string): number {
    return this.#byAgent.get(agent)?.size ?? 0;
  }

  get size(): number {
    return this.#byId.size;
  }

  upsert(task: Task): void {
    const before = this.#byId.get(task.id);
    if (before) this.#unindex(before);
    this.#byId.set(task.id, task);
    add(this.#byAgent, task.agent, task);
    add(this.#byName, `${task.agent}\0${task.name}`, task);
  }

  remove(id: string): void {
    const task = this.#byId.get(id);
    if (!task) return;
    this.#byId.delete(id);
    this.#unindex(task);
    for (const cb of this.#removed) cb(id);
  }

  #unindex(task: Task): void {
    drop(this.#byAgent, task.agent, task.id);
    drop(this.#byName, `${task.agent}\0${task.name}`, task.id);
  }
}

function add(index: Map<string, Map<string, Task>>, key: string, task: Task): void {
  let tasks = index.get(key);
  if (!tasks) index.set(key, (tasks = new Map()));
  tasks.set(task.id, task);
}

function drop(index: Map<string, Map<string, Task>>, key: string, id: string): void {
  const tasks = index.get(key);
  if (tasks?.delete(id) && tasks.size === 0) index.delete(key);
}
