/**
 * The history of tasks that ended (by request, by expiry, by revocation of a forged record, or
 * cleaned up after a start that never finished), so that `broker task list --all` and `task show`
 * still answer after a task has gone. One ConfigMap `task-history-<id>` per task in the broker's own
 * namespace, written once when the task ends (after its audit record), signed like approval records
 * (src/state-signature.ts) and verified on every read: an entry changed outside the broker is
 * skipped. The sweeper removes entries older than the policy's `broker.taskHistory`.
 */
import type { V1ConfigMap } from '@kubernetes/client-node';
import { clusterError, isConflict, type KubeApis } from '../kube/config.ts';
import { SIGNATURE_ANNOTATION, type Facts, type StateSigner } from '../state-signature.ts';
import { LABEL, MANAGED_BY, toView, type Task, type TaskView } from './model.ts';

export const HISTORY_KIND = 'task-history';
export const HISTORY_SELECTOR = `${LABEL.managedBy}=${MANAGED_BY},${LABEL.kind}=${HISTORY_KIND}`;

/** How a task left: ended by request, expired, revoked (its record was forged), cleaned (its start never finished). */
export type EndedState = 'ended' | 'expired' | 'revoked' | 'cleaned';

export interface HistoryEntry {
  task: TaskView;
  state: EndedState;
  endedAt: string;
  /** Why it ended, in words. */
  cause: string;
  /** Who ended it: `agent:NAME`, `system:sweeper`, `system:broker`. */
  actor: string;
}

/** A task as `GET /v1/tasks?all=true` and `GET /v1/tasks/{ref}` show it: active, or from the history. */
export type TaskStateView = TaskView & { state: 'active' | EndedState; endedAt?: string; endedBy?: string; cause?: string };

export function historyView(entry: HistoryEntry): TaskStateView {
  return { ...entry.task, state: entry.state, endedAt: entry.endedAt, endedBy: entry.actor, cause: entry.cause };
}

export function historyName(taskId: string): string {
  return `task-history-${taskId}`;
}

/** What the broker signs of an entry: its object name and the stored data, exactly as stored. */
function historyFacts(name: string, data: Record<string, string>): Facts {
  return { name, entry: data['entry'] ?? '' };
}

export interface TaskHistoryOptions {
  /** Signs entries and verifies them on read; without it every entry is trusted (unit tests only). */
  signer?: StateSigner | undefined;
  now?: () => Date;
  /** How long one agent's list is reused, so a burst of refused credential calls costs one read. Default 3 s. */
  cacheMs?: number;
  /** Entries kept per agent whatever their age (the newest), so a busy agent cannot fill the namespace. Default 1000. */
  maxPerAgent?: number;
}

export class TaskHistory {
  readonly #kube: KubeApis;
  readonly #namespace: string;
  readonly #retentionMs: number;
  readonly #signer: StateSigner | undefined;
  readonly #now: () => Date;
  readonly #cacheMs: number;
  readonly #maxPerAgent: number;
  readonly #cache = new Map<string, { until: number; entries: Promise<HistoryEntry[]> }>();

  constructor(kube: KubeApis, namespace: string, retentionSeconds: number, options: TaskHistoryOptions = {}) {
    this.#kube = kube;
    this.#namespace = namespace;
    this.#retentionMs = retentionSeconds * 1000;
    this.#signer = options.signer;
    this.#now = options.now ?? (() => new Date());
    this.#cacheMs = options.cacheMs ?? 3_000;
    this.#maxPerAgent = options.maxPerAgent ?? 1000;
  }

  /** Writes the entry for a task that has just ended. An entry that already exists is kept (the first end wins). */
  async record(task: Task, state: EndedState, cause: string, actor: string): Promise<HistoryEntry> {
    const entry: HistoryEntry = { task: toView(task), state, endedAt: this.#now().toISOString(), cause, actor };
    const name = historyName(task.id);
    const data = { entry: JSON.stringify(entry) };
    const signature = this.#signer ? await this.#signer.sign(HISTORY_KIND, historyFacts(name, data)) : undefined;
    const body: V1ConfigMap = {
      metadata: {
        name,
        labels: { [LABEL.managedBy]: MANAGED_BY, [LABEL.kind]: HISTORY_KIND, [LABEL.agent]: task.agent, [LABEL.taskName]: task.name, [LABEL.taskId]: task.id },
        ...(signature ? { annotations: { [SIGNATURE_ANNOTATION]: signature } } : {}),
      },
      data,
    };
    try {
      await this.#kube.core.createNamespacedConfigMap({ namespace: this.#namespace, body });
    } catch (err) {
      if (!isConflict(err)) throw clusterError('writing the task history', err);
    }
    this.#cache.delete(task.agent);
    return entry;
  }

  /** The agent's ended tasks still in the history, newest first. */
  list(agent: string): Promise<HistoryEntry[]> {
    if (!agent) return Promise.resolve([]);
    const now = Date.now();
    const hit = this.#cache.get(agent);
    if (hit && hit.until > now) return hit.entries;
    const entries = this.#read(agent);
    this.#cache.set(agent, { until: now + this.#cacheMs, entries });
    entries.catch(() => this.#cache.delete(agent));
    return entries;
  }

  /** The agent's entry for `ref`: a task id, or the latest task of that name. */
  async find(agent: string, ref: string): Promise<HistoryEntry | undefined> {
    const entries = await this.list(agent);
    return entries.find((e) => e.task.id === ref) ?? entries.find((e) => e.task.name === ref);
  }

  /**
   * Removes entries older than the retention (by when the API server stored them), and an agent's
   * oldest beyond `maxPerAgent`. Run by the sweeper.
   */
  async sweep(): Promise<number> {
    let list;
    try {
      list = await this.#kube.core.listNamespacedConfigMap({ namespace: this.#namespace, labelSelector: HISTORY_SELECTOR });
    } catch (err) {
      throw clusterError('listing the task history', err);
    }
    const cutoff = this.#now().getTime() - this.#retentionMs;
    const created = (cm: V1ConfigMap) => (cm.metadata?.creationTimestamp ? new Date(cm.metadata.creationTimestamp).getTime() : Infinity);
    const perAgent = new Map<string, number>();
    let removed = 0;
    // Newest first, so the count per agent keeps the newest.
    for (const cm of [...list.items].sort((a, b) => created(b) - created(a))) {
      const agent = cm.metadata?.labels?.[LABEL.agent] ?? '';
      const rank = (perAgent.get(agent) ?? 0) + 1;
      perAgent.set(agent, rank);
      if ((created(cm) >= cutoff && rank <= this.#maxPerAgent) || !cm.metadata?.name) continue;
      await this.#kube.core.deleteNamespacedConfigMap({ name: cm.metadata.name, namespace: this.#namespace }).then(() => removed++, () => undefined);
    }
    if (removed > 0) this.#cache.clear();
    return removed;
  }

  async #read(agent: string): Promise<HistoryEntry[]> {
    let list;
    try {
      list = await this.#kube.core.listNamespacedConfigMap({ namespace: this.#namespace, labelSelector: `${HISTORY_SELECTOR},${LABEL.agent}=${agent}` });
    } catch (err) {
      throw clusterError('reading the task history', err);
    }
    const entries = await Promise.all(list.items.map((cm) => this.#trusted(cm)));
    return entries.filter((e): e is HistoryEntry => e !== undefined && e.task.agent === agent).sort((a, b) => b.endedAt.localeCompare(a.endedAt));
  }

  /** The entry a ConfigMap holds if the broker's signature over it holds; else undefined (ignored). */
  async #trusted(cm: V1ConfigMap): Promise<HistoryEntry | undefined> {
    const name = cm.metadata?.name ?? '';
    let entry: HistoryEntry;
    try {
      entry = JSON.parse(cm.data?.['entry'] ?? '') as HistoryEntry;
    } catch {
      return undefined;
    }
    if (typeof entry?.task?.id !== 'string' || historyName(entry.task.id) !== name) return undefined;
    if (!this.#signer) return entry;
    const ok = await this.#signer.verify(HISTORY_KIND, historyFacts(name, cm.data ?? {}), cm.metadata?.annotations?.[SIGNATURE_ANNOTATION]).catch(() => false);
    return ok ? entry : undefined;
  }
}
