/**
 * This replica's view of the tasks, kept from the cluster by a watch on task Secrets (list, then
 * watch, reconnecting on its own). Any replica's starts and ends reach every other replica here.
 * Local writes update it at once, so a caller reads its own writes.
 */
import * as k8s from '@kubernetes/client-node';
import { TASK_SELECTOR, taskFromSecret, type Task } from './model.ts';

export class TaskStore {
  readonly #byId = new Map<string, Task>();
  readonly #removed: Array<(id: string) => void> = [];
  #informer: (k8s.Informer<k8s.V1Secret> & k8s.ObjectCache<k8s.V1Secret>) | undefined;
  #synced = false;

  /** Starts watching; resolves once the first list is in. */
  async watch(config: k8s.KubeConfig, namespace: string): Promise<void> {
    const core = config.makeApiClient(k8s.CoreV1Api);
    const informer = k8s.makeInformer<k8s.V1Secret>(
      config,
      `/api/v1/namespaces/${namespace}/secrets`,
      () => core.listNamespacedSecret({ namespace, labelSelector: TASK_SELECTOR }),
      TASK_SELECTOR,
    );
    const put = (s: k8s.V1Secret) => {
      const task = taskFromSecret(s);
      if (task) this.#byId.set(task.id, task);
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
    await informer.start();
    for (const s of informer.list()) put(s);
    this.#synced = true;
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
