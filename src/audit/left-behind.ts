/**
 * What a task leaves behind (issue 11, item 2; DESIGN.md section 9): the objects its identity created
 * or changed that can hold or grant access, read from the `k8s.request` records of its requests
 * (the API server's audit webhook, src/audit/kube-events.ts). Used by the broker at task end
 * (src/server/kube-audit.ts, this replica's records so far) and by `broker audit show --task` (the
 * whole log). Pure: no I/O, no clock.
 *
 * A request counts when it was allowed and succeeded (a 2xx answer, or none recorded), was no dry
 * run, and is one of:
 * - `create`, `update` or `patch` of a ServiceAccount, a Secret (a `kubernetes.io/service-account-token`
 *   Secret is a standing token; at Metadata level the type is not recorded, so every Secret counts),
 *   a Role, RoleBinding, ClusterRole or ClusterRoleBinding, a CertificateSigningRequest, a validating
 *   or mutating webhook configuration, a Pod, or a workload that runs pods (Deployment, StatefulSet,
 *   DaemonSet, ReplicaSet, Job, CronJob);
 * - `create` of `serviceaccounts/token` (a token minted for a ServiceAccount: it is valid until its
 *   own expiry, whatever becomes of the task);
 * - `update`/`patch` of `certificatesigningrequests/approval` (a CSR approved) and of
 *   `pods/ephemeralcontainers` (a container added to a running pod, which runs as its ServiceAccount).
 *
 * Only what remains: a later allowed `delete` of the same object (by name) takes it off the list, and
 * the deletion of a ServiceAccount takes the tokens minted for it too (they stop working with it).
 * One entry per object (its first change: `created` rather than a later `patched`); every token
 * minted is an entry of its own.
 */
import type { JsonValue } from './types.ts';

/** One object left behind, as `task end` and `audit show` report it (JSON: these fields). */
export interface LeftBehind {
  /** `create`, `update` or `patch`, as the API server recorded it. */
  verb: string;
  /** The resource, with its subresource when there is one: `serviceaccounts`, `serviceaccounts/token`, `rolebindings`. */
  resource: string;
  /** The kind of the object: `ServiceAccount`, `RoleBinding`, ... (for a token: `ServiceAccount`, the account it was minted for). */
  kind: string;
  /** Absent for a cluster-scoped object. */
  namespace?: string;
  /** Absent when the API server recorded none (an object created with `generateName`). */
  name?: string;
  /** Why it matters, in a few words. */
  why: string;
  /** When the API server received the request (its requestReceivedTimestamp), else when it was recorded. */
  at: string;
  /** The API server's audit ID of the request. */
  auditID: string;
}

/** What `DELETE /v1/tasks/{ref}` adds to its answer: what the task left behind (docs/recording.md). */
export interface LeftBehindReport {
  /** `webhook`: this broker records the API server's audit events; `none`: it receives none, so nothing is known. */
  recording: 'webhook' | 'none';
  /**
   * Always false: the API server sends its events in batches, up to its batch wait after each request
   * (and to any replica), so requests made just before the end may not be recorded here yet.
   */
  complete: false;
  /** What this replica has recorded so far (empty when `recording` is `none`: unknown, not nothing). */
  leftBehind: LeftBehind[];
  /** What the list is, and where the final one is found. */
  hint: string;
}

/** The parts of a `k8s.request` record read here (an AuditRecord, or the AuditEventInput before it is appended). */
export interface RequestRecordLike {
  type: string;
  outcome?: string | undefined;
  namespace?: string | undefined;
  time?: string | undefined;
  details?: { [key: string]: JsonValue } | undefined;
}

interface Kind {
  kind: string;
  /** What the object can do once it is there (for a `created`/`updated`/`patched` line). */
  why: string;
}

const RUNS_PODS = 'runs pods as any ServiceAccount of its namespace, after the task ends';

/** `group|resource` of the objects that can hold or grant access. */
const KINDS: ReadonlyMap<string, Kind> = new Map([
  ['|serviceaccounts', { kind: 'ServiceAccount', why: 'can hold tokens' }],
  ['|secrets', { kind: 'Secret', why: 'may hold a ServiceAccount token (a standing token) or other credentials' }],
  ['|pods', { kind: 'Pod', why: 'runs as a ServiceAccount of its namespace, with its access' }],
  ['rbac.authorization.k8s.io|roles', { kind: 'Role', why: 'grants its rules to every subject bound to it' }],
  ['rbac.authorization.k8s.io|rolebindings', { kind: 'RoleBinding', why: 'grants access to any subject it names' }],
  ['rbac.authorization.k8s.io|clusterroles', { kind: 'ClusterRole', why: 'grants its rules to every subject bound to it' }],
  ['rbac.authorization.k8s.io|clusterrolebindings', { kind: 'ClusterRoleBinding', why: 'grants access, in every namespace, to any subject it names' }],
  ['certificates.k8s.io|certificatesigningrequests', { kind: 'CertificateSigningRequest', why: 'once approved, a client certificate that outlives the task' }],
  ['admissionregistration.k8s.io|validatingwebhookconfigurations', { kind: 'ValidatingWebhookConfiguration', why: 'sends API requests, with their objects, to a server of its choosing' }],
  ['admissionregistration.k8s.io|mutatingwebhookconfigurations', { kind: 'MutatingWebhookConfiguration', why: "can rewrite objects as they are created (a pod's ServiceAccount, its image)" }],
  ['apps|deployments', { kind: 'Deployment', why: RUNS_PODS }],
  ['apps|statefulsets', { kind: 'StatefulSet', why: RUNS_PODS }],
  ['apps|daemonsets', { kind: 'DaemonSet', why: RUNS_PODS }],
  ['apps|replicasets', { kind: 'ReplicaSet', why: RUNS_PODS }],
  ['batch|jobs', { kind: 'Job', why: RUNS_PODS }],
  ['batch|cronjobs', { kind: 'CronJob', why: 'runs pods on a schedule as any ServiceAccount of its namespace, after the task ends' }],
]);

/** The subresources that count: `group|resource/subresource` -> the verbs and why. */
const SUBRESOURCES: ReadonlyMap<string, { verbs: ReadonlySet<string>; why: string }> = new Map([
  ['|serviceaccounts/token', { verbs: new Set(['create']), why: 'valid until its own expiry, outlives the task' }],
  ['certificates.k8s.io|certificatesigningrequests/approval', { verbs: new Set(['update', 'patch']), why: 'its certificate, once signed, outlives the task' }],
  ['|pods/ephemeralcontainers', { verbs: new Set(['update', 'patch']), why: "runs as the pod's ServiceAccount, with its access" }],
]);

const CHANGES: ReadonlySet<string> = new Set(['create', 'update', 'patch']);
const PAST: Readonly<Record<string, string>> = { create: 'created', update: 'updated', patch: 'patched' };

function text(details: RequestRecordLike['details'], key: string): string | undefined {
  const v = details?.[key];
  return typeof v === 'string' && v !== '' ? v : undefined;
}

/** Allowed, answered 2xx (or no code recorded), and not a dry run (`?dryRun=All`). */
function tookEffect(r: RequestRecordLike): boolean {
  if (r.type !== 'k8s.request' || r.outcome !== 'allowed') return false;
  const code = r.details?.['code'];
  if (typeof code === 'number' && (code < 200 || code > 299)) return false;
  const uri = text(r.details, 'requestURI') ?? '';
  const query = uri.includes('?') ? uri.slice(uri.indexOf('?') + 1) : '';
  return !query.split('&').some((p) => p.split('=', 1)[0] === 'dryRun');
}

/**
 * Whether a record could bear on what a task leaves behind: a change (create, update, patch) or a
 * deletion of one of the resources above, allowed. What the broker keeps per task at its webhook.
 */
export function bearsOnLeftBehind(r: RequestRecordLike): boolean {
  if (r.type !== 'k8s.request' || r.outcome !== 'allowed') return false;
  const verb = text(r.details, 'verb');
  const resource = text(r.details, 'resource');
  if (verb === undefined || resource === undefined) return false;
  const key = `${text(r.details, 'apiGroup') ?? ''}|${resource}`;
  if (!KINDS.has(key)) return false;
  const sub = text(r.details, 'subresource');
  if (sub === undefined) return CHANGES.has(verb) || verb === 'delete';
  return SUBRESOURCES.get(`${key}/${sub}`)?.verbs.has(verb) ?? false;
}

/** The entry one record makes, if it makes one (no deletions here: see leftBehind). */
export function leftBehindOf(r: RequestRecordLike): LeftBehind | undefined {
  if (!bearsOnLeftBehind(r) || !tookEffect(r)) return undefined;
  const d = r.details;
  const verb = text(d, 'verb')!;
  if (verb === 'delete') return undefined;
  const group = text(d, 'apiGroup') ?? '';
  const resource = text(d, 'resource')!;
  const sub = text(d, 'subresource');
  const kind = KINDS.get(`${group}|${resource}`)!;
  const why = sub === undefined ? kind.why : SUBRESOURCES.get(`${group}|${resource}/${sub}`)!.why;
  const name = text(d, 'name');
  const namespace = r.namespace !== undefined && r.namespace !== '' ? r.namespace : undefined;
  return {
    verb,
    resource: sub === undefined ? resource : `${resource}/${sub}`,
    kind: kind.kind,
    ...(namespace === undefined ? {} : { namespace }),
    ...(name === undefined ? {} : { name }),
    why,
    at: text(d, 'requestReceivedTimestamp') ?? r.time ?? '',
    auditID: text(d, 'auditID') ?? '',
  };
}

/** What identifies an object: group, resource, namespace, name. */
function objectKey(group: string, resource: string, namespace: string | undefined, name: string): string {
  return JSON.stringify([group, resource, namespace ?? '', name]);
}

/**
 * What the requests of one task leave behind, in request order: one entry per object (its first
 * change), one per token minted; objects the task deleted afterwards (and the tokens of a
 * ServiceAccount it deleted) are not listed. `records` may hold anything (only allowed `k8s.request`
 * records are read), in any order: they are taken by when the API server received them.
 */
export function leftBehind(records: readonly RequestRecordLike[]): LeftBehind[] {
  const relevant = records
    .map((r, i) => ({ r, i, at: text(r.details, 'requestReceivedTimestamp') ?? r.time ?? '' }))
    .filter((x) => bearsOnLeftBehind(x.r) && tookEffect(x.r))
    // RFC 3339 times of one API server sort as text; the given order among equals.
    .sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : a.i - b.i));
  /** `object`: the object's key (a deletion removes it); `dedupe`: one entry per object and change kind; `account`: a token's ServiceAccount. */
  type Held = { entry: LeftBehind; object?: string; dedupe?: string; account?: string };
  let held: Held[] = [];
  for (const { r } of relevant) {
    const d = r.details;
    const group = text(d, 'apiGroup') ?? '';
    const resource = text(d, 'resource')!;
    const name = text(d, 'name');
    const namespace = r.namespace !== undefined && r.namespace !== '' ? r.namespace : undefined;
    const object = name === undefined ? undefined : objectKey(group, resource, namespace, name);
    if (text(d, 'verb') === 'delete') {
      if (object === undefined) continue;
      held = held.filter((h) => h.object !== object && h.account !== object);
      continue;
    }
    const entry = leftBehindOf(r)!;
    if (entry.resource === 'serviceaccounts/token') {
      // Each token is one; it stops working with its ServiceAccount.
      held.push({ entry, ...(object === undefined ? {} : { account: object }) });
      continue;
    }
    if (object === undefined) {
      held.push({ entry });
      continue;
    }
    // A subresource change (a CSR approved, an ephemeral container added) is an entry of its own.
    const dedupe = objectKey(group, entry.resource, namespace, name!);
    if (held.some((h) => h.dedupe === dedupe)) continue;
    held.push({ entry, object, dedupe });
  }
  return held.map((h) => h.entry);
}

/**
 * One line of text: `ServiceAccount web/ci-bot created: can hold tokens`, `token minted for
 * ServiceAccount web/ci-bot: valid until its own expiry, outlives the task`. Not escaped: callers
 * print it through their escaping (audit show's `printable`, the CLI's `safe`).
 */
export function leftBehindLine(e: LeftBehind): string {
  const where = `${e.namespace === undefined ? '' : `${e.namespace}/`}${e.name ?? '(a generated name)'}`;
  const [, sub] = e.resource.split('/', 2);
  if (sub === 'token') return `token minted for ${e.kind} ${where}: ${e.why}`;
  if (sub === 'approval') return `${e.kind} ${where} approved: ${e.why}`;
  if (sub === 'ephemeralcontainers') return `${e.kind} ${where} given an ephemeral container: ${e.why}`;
  return `${e.kind} ${where} ${PAST[e.verb] ?? e.verb}: ${e.why}`;
}

/** What the broker's webhook holds of one task's requests that bear on what it leaves behind. */
export interface TaskRequests {
  records: RequestRecordLike[];
  /** More such requests arrived than are kept: the list may be incomplete. */
  truncated: boolean;
  /** The task's requests were dropped to keep the store bounded: the list is unknown. */
  forgotten: boolean;
}

const KEPT_DETAILS = ['verb', 'apiGroup', 'resource', 'subresource', 'name', 'code', 'requestReceivedTimestamp', 'auditID'] as const;

/**
 * Per task, the recorded requests that bear on what it leaves behind (bearsOnLeftBehind), as the
 * broker's webhook records them: this replica's view. Bounded: `maxPerTask` requests per task (later
 * ones only mark the task truncated) and `maxTasks` tasks (the oldest dropped first, and remembered as
 * forgotten, among the last `maxTasks` * 10 dropped, so that no report claims nothing was left).
 */
export class LeftBehindStore {
  readonly #maxTasks: number;
  readonly #maxPerTask: number;
  readonly #tasks = new Map<string, { records: RequestRecordLike[]; truncated: boolean }>();
  readonly #forgotten = new Set<string>();

  constructor(options: { maxTasks?: number; maxPerTask?: number } = {}) {
    this.#maxTasks = options.maxTasks ?? 2000;
    this.#maxPerTask = options.maxPerTask ?? 100;
  }

  /** A recorded request of task `r.task` (others are ignored). */
  add(r: RequestRecordLike & { task?: string | undefined }): void {
    if (r.task === undefined || !bearsOnLeftBehind(r) || !tookEffect(r)) return;
    let held = this.#tasks.get(r.task);
    if (!held) {
      held = { records: [], truncated: false };
      this.#tasks.set(r.task, held);
      if (this.#tasks.size > this.#maxTasks) {
        const oldest = this.#tasks.keys().next().value!;
        this.#tasks.delete(oldest);
        this.#forgotten.add(oldest);
        if (this.#forgotten.size > this.#maxTasks * 10) this.#forgotten.delete(this.#forgotten.values().next().value!);
      }
    }
    if (held.records.length >= this.#maxPerTask) held.truncated = true;
    else {
      // Only what leftBehind reads (no URI, no user agent): small, whatever the agent sent.
      const details: { [key: string]: JsonValue } = {};
      for (const key of KEPT_DETAILS) if (r.details?.[key] !== undefined) details[key] = r.details[key]!;
      held.records.push({ type: r.type, outcome: r.outcome, namespace: r.namespace, time: r.time, details });
    }
  }

  of(taskId: string): TaskRequests {
    const held = this.#tasks.get(taskId);
    return { records: held?.records ?? [], truncated: held?.truncated ?? false, forgotten: !held && this.#forgotten.has(taskId) };
  }

  get size(): number {
    return this.#tasks.size;
  }
}
