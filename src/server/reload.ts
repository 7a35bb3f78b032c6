/**
 * Policy reload without a restart: on SIGHUP and when the policy file changes.
 *
 * The policy-dependent services (TaskService, ApprovalService, the authenticators) are built again
 * from the new policy and swapped in one place, this holder, which the HTTP routes and the sweeper
 * read through at each use; the task store, the audit log, the signing key and the sweeper are kept.
 * A new policy is validated first (the same parser as at start); a bad one is refused and the running
 * one kept. Both are recorded: `policy.reloaded` (with the new SHA-256 and which templates were added,
 * removed or changed) before the new policy takes effect, `policy.reload_refused` with the problems.
 *
 * What a reload does not touch: tasks already running keep their grant until they end (their
 * RoleBinding exists; the store is shared), including tasks of a template the new policy removed;
 * their tokens are minted afresh on the next credential call (the new TaskService holds none yet).
 * `broker.namespace` and `broker.taskNamespace` cannot change without a restart (the task watch, the
 * signing key, the checkpoint and the Lease live there): such a policy is refused, saying so.
 *
 * The file is watched through its directory (editors replace a file by renaming another over it, and
 * a Kubernetes ConfigMap volume swaps a `..data` symlink), debounced, and reloaded only when its bytes
 * changed (SHA-256).
 */
import { createHash } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import type { V1Secret } from '@kubernetes/client-node';
import type { AuditSink } from '../audit/sink.ts';
import type { ApprovalService } from '../approvals/service.ts';
import type { Authenticator } from '../identity/types.ts';
import { parsePolicy } from '../policy/parse.ts';
import type { Policy, PolicyIssue } from '../policy/types.ts';
import type { Task } from '../tasks/model.ts';
import type { TaskService } from '../tasks/service.ts';
import type { TaskStore } from '../tasks/store.ts';

/** The services built from one policy. */
export interface PolicyServices {
  tasks: TaskService;
  approvals: ApprovalService;
  authenticators: Authenticator[];
}

export interface PolicyState extends PolicyServices {
  policy: Policy;
  sha256: string;
}

export type ReloadTrigger = 'SIGHUP' | 'file changed' | 'request';

export interface ReloadResult {
  outcome: 'reloaded' | 'unchanged' | 'refused';
  /** The policy now running. */
  sha256: string;
  /** What changed (reloaded). */
  diff?: PolicyDiff;
  /** Why it was refused. */
  problems?: string[];
}

/** Which parts of the policy differ between two versions. */
export interface PolicyDiff {
  templatesAdded: string[];
  templatesRemoved: string[];
  templatesChanged: string[];
  /** Other top-level sections that changed: `agents`, `people`, `gated`, `approverGroups`, `defaultApproval`, `broker.tokenTtl`, ... */
  changed: string[];
}

export function sha256Hex(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

/** What differs from `before` to `after`, by template name and section. Pure. */
export function diffPolicies(before: Policy, after: Policy): PolicyDiff {
  const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
  const old = new Map(before.templates.map((t) => [t.name, t]));
  const now = new Map(after.templates.map((t) => [t.name, t]));
  const changed: string[] = [];
  for (const key of ['agents', 'people', 'gated', 'approverGroups', 'defaultApproval'] as const) if (!same(before[key], after[key])) changed.push(key);
  const keys = new Set([...Object.keys(before.broker), ...Object.keys(after.broker)]);
  for (const k of [...keys].sort()) {
    if (!same((before.broker as unknown as Record<string, unknown>)[k], (after.broker as unknown as Record<string, unknown>)[k])) changed.push(`broker.${k}`);
  }
  return {
    templatesAdded: [...now.keys()].filter((n) => !old.has(n)),
    templatesRemoved: [...old.keys()].filter((n) => !now.has(n)),
    templatesChanged: [...now].filter(([n, t]) => old.has(n) && !same(old.get(n), t)).map(([n]) => n),
    changed,
  };
}

/** Why `after` cannot replace `before` without a restart, if it cannot. */
export function restartNeeded(before: Policy, after: Policy): string[] {
  const out: string[] = [];
  for (const k of ['namespace', 'taskNamespace'] as const) {
    if (before.broker[k] !== after.broker[k]) {
      out.push(`broker.${k}: "${before.broker[k]}" -> "${after.broker[k]}" needs a restart (the task watch, signing key, approval requests, checkpoint and sweeper Lease live there); the running policy stays until the broker is restarted`);
    }
  }
  return out;
}

/**
 * The store as one TaskService sees it: its `onRemoved`/`onForged` listeners are kept aside and become
 * the store's only ones when that service is swapped in, so a revoked forged task is recorded once,
 * not once per policy the broker has run with.
 */
export class StoreListeners {
  #removed: ((id: string) => void) | undefined;
  #forged: ((task: Task, secret: V1Secret) => void) | undefined;

  constructor(store: TaskStore) {
    store.onRemoved((id) => this.#removed?.(id));
    store.onForged((task, secret) => this.#forged?.(task, secret));
  }

  /** A view of `store` for a service being built, and a function that makes its listeners the live ones. */
  view(store: TaskStore): { store: TaskStore; activate: () => void } {
    let removed: ((id: string) => void) | undefined;
    let forged: ((task: Task, secret: V1Secret) => void) | undefined;
    // Each method bound once, not at every call: the credential path calls get and findByName per request.
    const bound = new WeakMap<object, unknown>();
    const view = new Proxy(store, {
      get: (target, prop) => {
        if (prop === 'onRemoved') return (cb: (id: string) => void) => void (removed = cb);
        if (prop === 'onForged') return (cb: (task: Task, secret: V1Secret) => void) => void (forged = cb);
        const value = Reflect.get(target, prop, target) as unknown;
        if (typeof value !== 'function') return value;
        let fn = bound.get(value);
        if (fn === undefined) bound.set(value, (fn = (value as (...a: unknown[]) => unknown).bind(target)));
        return fn;
      },
    });
    return {
      store: view,
      activate: () => {
        this.#removed = removed;
        this.#forged = forged;
      },
    };
  }
}

export interface PolicyHolderOptions {
  /** The policy file. */
  path: string;
  policy: Policy;
  /** The exact text `policy` was parsed from. */
  text: string;
  /** Builds the services for a policy; `activate` makes their store listeners the live ones (StoreListeners). */
  build: (policy: Policy) => PolicyServices & { activate?: () => void };
  audit: AuditSink;
  /** Lines for stderr. */
  log?: (line: string) => void;
}

/** The running policy and its services, swapped as a whole by a reload. */
export class PolicyHolder {
  #state: PolicyState;
  readonly #path: string;
  readonly #build: PolicyHolderOptions['build'];
  readonly #audit: AuditSink;
  readonly #log: (line: string) => void;
  /** Reloads run one at a time, in order. */
  #queue: Promise<unknown> = Promise.resolve();
  #watcher: FSWatcher | undefined;
  #debounce: ReturnType<typeof setTimeout> | undefined;
  #closed = false;

  constructor(options: PolicyHolderOptions) {
    this.#path = options.path;
    this.#build = options.build;
    this.#audit = options.audit;
    this.#log = options.log ?? ((line) => process.stderr.write(`broker: ${line}\n`));
    const services = this.#build(options.policy);
    services.activate?.();
    this.#state = { policy: options.policy, sha256: sha256Hex(options.text), tasks: services.tasks, approvals: services.approvals, authenticators: services.authenticators };
  }

  get policy(): Policy {
    return this.#state.policy;
  }
  get sha256(): string {
    return this.#state.sha256;
  }
  get tasks(): TaskService {
    return this.#state.tasks;
  }
  get approvals(): ApprovalService {
    return this.#state.approvals;
  }
  get authenticators(): Authenticator[] {
    return this.#state.authenticators;
  }

  /** Reads the policy file again and, if it changed and is valid, swaps it in. One reload at a time. */
  reload(trigger: ReloadTrigger): Promise<ReloadResult> {
    const run = this.#queue.then(() => this.#reload(trigger));
    this.#queue = run.catch(() => undefined);
    return run;
  }

  async #reload(trigger: ReloadTrigger): Promise<ReloadResult> {
    const running = this.#state;
    if (this.#closed) return { outcome: 'unchanged', sha256: running.sha256 }; // the broker is stopping
    let text: string;
    try {
      text = await readFile(this.#path, 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      return this.#refuse(trigger, undefined, [`cannot read ${this.#path}: ${code === 'ENOENT' ? 'no such file' : (err as Error).message}`]);
    }
    const sha256 = sha256Hex(text);
    if (sha256 === running.sha256) {
      if (trigger === 'SIGHUP') this.#log(`policy ${this.#path} unchanged (sha256 ${sha256.slice(0, 12)}): nothing to reload`);
      return { outcome: 'unchanged', sha256 };
    }
    let policy: Policy;
    try {
      policy = parsePolicy(text, this.#path);
    } catch (err) {
      const issues = (err as { issues?: PolicyIssue[] }).issues;
      const problems = issues ? issues.map((i) => `${this.#path}:${i.line}: ${i.path ? `${i.path}: ` : ''}${i.message}`) : [(err as Error).message];
      return this.#refuse(trigger, sha256, problems);
    }
    const restart = restartNeeded(running.policy, policy);
    if (restart.length > 0) return this.#refuse(trigger, sha256, restart);
    let services: ReturnType<PolicyHolderOptions['build']>;
    try {
      services = this.#build(policy);
    } catch (err) {
      return this.#refuse(trigger, sha256, [err instanceof Error ? err.message : String(err)]);
    }
    const diff = diffPolicies(running.policy, policy);
    // On record before it takes effect: an unwritable log keeps the running policy.
    try {
      await this.#audit.append({
        type: 'policy.reloaded',
        actor: 'system:broker',
        outcome: 'ok',
        reason: `${trigger}: ${describeDiff(diff)}`,
        details: { policySha256: sha256, previousSha256: running.sha256, trigger, path: this.#path, templates: policy.templates.length, ...cap(diff) },
      });
    } catch (err) {
      this.#log(`policy reload not applied: it could not be recorded: ${(err as Error).message}`);
      return { outcome: 'refused', sha256: running.sha256, problems: [(err as Error).message] };
    }
    services.activate?.();
    this.#state = { policy, sha256, tasks: services.tasks, approvals: services.approvals, authenticators: services.authenticators };
    this.#log(`policy reloaded (${trigger}): sha256 ${sha256}, ${policy.templates.length} templates; ${describeDiff(diff)}; running tasks keep their grant until they end`);
    return { outcome: 'reloaded', sha256, diff };
  }

  async #refuse(trigger: ReloadTrigger, sha256: string | undefined, problems: string[]): Promise<ReloadResult> {
    const running = this.#state.sha256;
    const shown = problems.slice(0, 20).map((p) => (p.length > 300 ? `${p.slice(0, 297)}...` : p));
    await this.#audit
      .append({
        type: 'policy.reload_refused',
        actor: 'system:broker',
        outcome: 'denied',
        reason: `${trigger}: ${shown[0] ?? 'invalid'}${problems.length > 1 ? ` (and ${problems.length - 1} more)` : ''}`,
        details: { ...(sha256 ? { policySha256: sha256 } : {}), runningSha256: running, trigger, path: this.#path, problems: shown },
      })
      .catch((err: unknown) => this.#log(`the refused reload could not be recorded: ${(err as Error).message}`));
    this.#log(`policy reload refused (${trigger}); still running sha256 ${running}:\n${shown.map((p) => `  ${p}`).join('\n')}`);
    return { outcome: 'refused', sha256: running, problems };
  }

  /** Reloads when the policy file changes (its directory is watched; events are debounced by `debounceMs`). */
  watch(debounceMs = 300): void {
    if (this.#watcher || this.#closed) return;
    const name = basename(this.#path);
    try {
      this.#watcher = watch(dirname(this.#path), { persistent: false }, (_event, file) => {
        // The file itself, or a ConfigMap volume's `..data` swap; other files in the directory (an audit log) are ignored.
        if (file !== null && file !== name && !String(file).startsWith('..')) return;
        clearTimeout(this.#debounce);
        this.#debounce = setTimeout(() => void this.reload('file changed'), debounceMs);
        this.#debounce.unref();
      });
      this.#watcher.on('error', (err) => this.#log(`watching ${this.#path} failed (${err.message}): reload with SIGHUP`));
    } catch (err) {
      this.#log(`cannot watch ${this.#path} (${(err as Error).message}): reload with SIGHUP`);
    }
  }

  /** Stops watching and waits for a reload in progress. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#debounce);
    this.#watcher?.close();
    this.#watcher = undefined;
    await this.#queue;
  }
}

function describeDiff(d: PolicyDiff): string {
  const parts = [
    d.templatesAdded.length ? `templates added: ${d.templatesAdded.join(', ')}` : '',
    d.templatesRemoved.length ? `templates removed: ${d.templatesRemoved.join(', ')}` : '',
    d.templatesChanged.length ? `templates changed: ${d.templatesChanged.join(', ')}` : '',
    d.changed.length ? `changed: ${d.changed.join(', ')}` : '',
  ].filter(Boolean);
  return parts.length ? parts.join('; ') : 'no change in effect (formatting or comments)';
}

/** The diff for a record's details, each list cut to 50 names (details stay far below 8 KiB). */
function cap(d: PolicyDiff): PolicyDiff {
  const c = (l: string[]) => l.slice(0, 50);
  return { templatesAdded: c(d.templatesAdded), templatesRemoved: c(d.templatesRemoved), templatesChanged: c(d.templatesChanged), changed: c(d.changed) };
}

