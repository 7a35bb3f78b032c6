/**
 * Tasks as the audit webhook needs them: the API server reports a request about a second after it
 * was made (with the default batch settings up to 30 s), often after the task that made it has
 * ended and left the store. So this keeps, for an hour after they were last seen, the facts of every
 * task this replica saw (id -> agent, name, template, namespace), and the JTIs it minted (jti -> task
 * id) for as long as their tokens live plus that hour.
 *
 * Fed from: the store (a snapshot every `snapshotIntervalMs`, so tasks of other replicas are known
 * too; a removal from the store marks the time the task was last seen), this replica's mints
 * (TaskService's `onMinted`), and at start the tail of the audit log (`task.started` and
 * `credential.minted` records), so a restart does not forget tasks that ended just before it.
 *
 * Bounded: at most `maxTasks` tasks and `maxTokens` JTIs, the oldest dropped first.
 */
import type { TaskInfo } from '../audit/kube-events.ts';
import type { Task } from './model.ts';
import type { TaskStore } from './store.ts';

export type { TaskInfo } from '../audit/kube-events.ts';

export interface RecentTasksOptions {
  /** How long a task is remembered after it was last seen. Default one hour. */
  retentionMs?: number;
  /** How often the store is looked at. Default 1 s. */
  snapshotIntervalMs?: number;
  maxTasks?: number;
  maxTokens?: number;
  now?: () => number;
}

interface Seen {
  info: TaskInfo;
  lastSeen: number;
}

export class RecentTasks {
  readonly #store: TaskStore;
  readonly #retentionMs: number;
  readonly #snapshotIntervalMs: number;
  readonly #maxTasks: number;
  readonly #maxTokens: number;
  readonly #now: () => number;
  /** In insertion order of last sighting (re-inserted on each), so the oldest come first. */
  readonly #tasks = new Map<string, Seen>();
  readonly #tokens = new Map<string, { taskId: string; until: number }>();
  #timer: ReturnType<typeof setInterval> | undefined;

  constructor(store: TaskStore, options: RecentTasksOptions = {}) {
    this.#store = store;
    this.#retentionMs = options.retentionMs ?? 3600_000;
    this.#snapshotIntervalMs = options.snapshotIntervalMs ?? 1000;
    this.#maxTasks = options.maxTasks ?? 50_000;
    this.#maxTokens = options.maxTokens ?? 100_000;
    this.#now = options.now ?? Date.now;
    store.onRemoved((id) => {
      const seen = this.#tasks.get(id);
      if (seen) this.#touch(seen.info, this.#now());
    });
  }

  /** Looks at the store now and then every snapshotIntervalMs (an unref'd timer). */
  start(): void {
    this.snapshot();
    this.#timer ??= setInterval(() => this.snapshot(), this.#snapshotIntervalMs).unref();
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** Notes every task in the store as seen now, and forgets what is past retention. */
  snapshot(): void {
    const now = this.#now();
    for (const task of this.#store.list()) this.#touch(infoOf(task), now);
    this.#prune(now);
  }

  /** A task the store holds, or one seen within the retention. */
  get(id: string): TaskInfo | undefined {
    const task = this.#store.get(id);
    if (task) {
      const info = infoOf(task);
      this.#touch(info, this.#now());
      return info;
    }
    const seen = this.#tasks.get(id);
    return seen && seen.lastSeen >= this.#now() - this.#retentionMs ? seen.info : undefined;
  }

  /** The task id a JTI the broker minted belongs to (while the token lives, and the retention after). */
  taskOfJti(jti: string): string | undefined {
    const t = this.#tokens.get(jti);
    return t && t.until >= this.#now() ? t.taskId : undefined;
  }

  /** TaskService's onMinted: a token was minted for `task` (its record is durable). */
  readonly minted = (task: Task, jti: string, expiresAt: Date): void => {
    const now = this.#now();
    this.#touch(infoOf(task), now);
    this.#token(jti, task.id, expiresAt.getTime());
  };

  /** From the audit log at start: a task known at `time` (ms), and optionally a token minted for it. */
  remember(info: TaskInfo, time: number, token?: { jti: string; expiresAt: number }): void {
    const now = this.#now();
    const lastSeen = Math.min(time, now);
    if (lastSeen < now - this.#retentionMs && !token) return;
    const current = this.#tasks.get(info.id);
    if (!current || current.lastSeen < lastSeen) this.#touch(info, lastSeen);
    if (token) this.#token(token.jti, info.id, token.expiresAt);
  }

  get size(): { tasks: number; tokens: number } {
    return { tasks: this.#tasks.size, tokens: this.#tokens.size };
  }

  #touch(info: TaskInfo, at: number): void {
    this.#tasks.delete(info.id);
    this.#tasks.set(info.id, { info, lastSeen: at });
    if (this.#tasks.size > this.#maxTasks) this.#tasks.delete(this.#tasks.keys().next().value!);
  }

  #token(jti: string, taskId: string, expiresAt: number): void {
    const until = expiresAt + this.#retentionMs;
    if (until < this.#now()) return;
    this.#tokens.delete(jti);
    this.#tokens.set(jti, { taskId, until });
    if (this.#tokens.size > this.#maxTokens) this.#tokens.delete(this.#tokens.keys().next().value!);
  }

  #prune(now: number): void {
    const cutoff = now - this.#retentionMs;
    // Oldest first: stop at the first one still within the retention.
    for (const [id, seen] of this.#tasks) {
      if (seen.lastSeen >= cutoff) break;
      this.#tasks.delete(id);
    }
    for (const [jti, t] of this.#tokens) if (t.until < now) this.#tokens.delete(jti);
  }
}

export function infoOf(task: Pick<Task, 'id' | 'agent' | 'name' | 'template' | 'namespace'>): TaskInfo {
  return { id: task.id, agent: task.agent, name: task.name, template: task.template, namespace: task.namespace };
}
