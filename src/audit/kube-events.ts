/**
 * The API server's audit events (audit.k8s.io/v1 EventList, posted by its audit webhook) as the broker
 * records them: which batches are well formed, which events belong to a task, and the one
 * `k8s.request` record each kept event becomes. Pure: no I/O, no clock (src/server/kube-audit.ts does
 * the rest).
 *
 * An event is kept when its user is a task ServiceAccount
 * (`system:serviceaccount:<broker.taskNamespace>:task-<id>`) or when its credential id
 * (`user.extra["authentication.kubernetes.io/credential-id"]`, `JTI=<jti>`, set by the API server since
 * 1.30 for TokenRequest tokens) is a JTI the broker minted; and only at stage `ResponseComplete` or
 * `Panic`, the two that carry the answer (`RequestReceived` and `ResponseStarted` describe the same
 * request earlier).
 */
import { createHash } from 'node:crypto';
import { BrokerError } from '../errors.ts';
import type { AuditEventInput, AuditOutcome } from './types.ts';

export const EVENT_LIST_API_VERSION = 'audit.k8s.io/v1';
export const EVENT_LIST_KIND = 'EventList';
/** The record type of one API request seen by the API server (shared with the proxy, DESIGN.md section 9). */
export const K8S_REQUEST = 'k8s.request';
export const CREDENTIAL_ID_KEY = 'authentication.kubernetes.io/credential-id';
export const DECISION_ANNOTATION = 'authorization.k8s.io/decision';
export const REASON_ANNOTATION = 'authorization.k8s.io/reason';
export const KEPT_STAGES: ReadonlySet<string> = new Set(['ResponseComplete', 'Panic']);
/** The actor of a record whose agent the broker does not know (any more). */
export const APISERVER_ACTOR = 'system:apiserver';

/** String values are cut to these lengths in a record, so one record stays far below the log's 8 KiB `details` bound. */
export const MAX = { uri: 2048, userAgent: 256, name: 253, short: 128, reason: 512, sourceIPs: 8 } as const;

/** The parts of an audit.k8s.io/v1 Event the broker reads (the API server sends more). */
export interface KubeAuditEvent {
  auditID: string;
  stage: string;
  verb: string;
  requestURI: string;
  user: { username: string; extra?: Record<string, string[]> };
  objectRef?: { resource?: string; subresource?: string; apiGroup?: string; apiVersion?: string; namespace?: string; name?: string };
  sourceIPs?: string[];
  userAgent?: string;
  responseStatus?: { code?: number; message?: string; reason?: string };
  annotations?: Record<string, string>;
  requestReceivedTimestamp?: string;
  stageTimestamp?: string;
}

/** What the broker knows of a task when an event of it arrives (active, or ended recently). */
export interface TaskInfo {
  id: string;
  agent: string;
  name: string;
  template: string;
  namespace: string;
}

/** Why an event of a batch was not recorded (the label of `broker_kube_audit_events_total`). */
export type Disposition = 'recorded' | 'duplicate' | 'other_user' | 'stage';

/**
 * The events of a posted body, or BrokerError `bad_request` (nothing is recorded from a batch that
 * does not hold): not an object, another apiVersion or kind, `items` not an array, or an item without
 * the fields every audit event has (auditID, stage, verb, requestURI, user.username).
 */
export function parseEventList(body: unknown): KubeAuditEvent[] {
  const bad = (message: string) => new BrokerError('bad_request', message);
  if (!isObject(body)) throw bad(`the body must be an ${EVENT_LIST_API_VERSION} ${EVENT_LIST_KIND} object`);
  if (body['apiVersion'] !== EVENT_LIST_API_VERSION || body['kind'] !== EVENT_LIST_KIND) {
    throw bad(`expected apiVersion ${EVENT_LIST_API_VERSION} and kind ${EVENT_LIST_KIND}, got ${short(body['apiVersion'])} and ${short(body['kind'])}`);
  }
  const items = body['items'] ?? [];
  if (!Array.isArray(items)) throw bad('"items" must be an array');
  items.forEach((item, i) => {
    const problem = eventProblem(item);
    if (problem) throw bad(`items[${i}]: ${problem}`);
  });
  return items as KubeAuditEvent[];
}

function eventProblem(item: unknown): string | undefined {
  if (!isObject(item)) return 'not an object';
  const id = item['auditID'];
  // No upper bound: a client may choose its request's Audit-ID, and no agent may get a batch refused.
  if (typeof id !== 'string' || id === '') return '"auditID" must be a non-empty string';
  for (const key of ['stage', 'verb', 'requestURI'] as const) if (typeof item[key] !== 'string') return `"${key}" must be a string`;
  const user = item['user'];
  if (!isObject(user) || typeof user['username'] !== 'string') return '"user.username" must be a string';
  if (user['extra'] !== undefined && !isObject(user['extra'])) return '"user.extra" must be an object';
  for (const key of ['objectRef', 'responseStatus', 'annotations'] as const) {
    if (item[key] !== undefined && !isObject(item[key])) return `"${key}" must be an object`;
  }
  if (item['sourceIPs'] !== undefined && !Array.isArray(item['sourceIPs'])) return '"sourceIPs" must be an array';
  return undefined;
}

/** The task id of a task ServiceAccount's username in `taskNamespace`, else undefined. */
export function taskIdOfUser(username: string, taskNamespace: string): string | undefined {
  const prefix = `system:serviceaccount:${taskNamespace}:task-`;
  if (!username.startsWith(prefix)) return undefined;
  const id = username.slice(prefix.length);
  return /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(id) ? id : undefined;
}

/** The JTI of the credential the request was made with (`JTI=<jti>` in user.extra), else undefined. */
export function jtiOf(event: KubeAuditEvent): string | undefined {
  const values = event.user.extra?.[CREDENTIAL_ID_KEY];
  if (!Array.isArray(values)) return undefined;
  for (const v of values) if (typeof v === 'string' && v.startsWith('JTI=') && v.length > 4) return v.slice(4);
  return undefined;
}

export interface Classified {
  event: KubeAuditEvent;
  /** The task id, from the username or from the minted JTI. */
  taskId: string;
  jti: string | undefined;
}

/**
 * Sorts a batch's events into those to record and those to ignore (by reason), keeping the batch's
 * order. `taskOfJti` answers for JTIs the broker minted.
 */
export function classify(
  events: readonly KubeAuditEvent[],
  taskNamespace: string,
  taskOfJti: (jti: string) => string | undefined,
): { kept: Classified[]; ignored: Record<'other_user' | 'stage', number> } {
  const kept: Classified[] = [];
  const ignored = { other_user: 0, stage: 0 };
  for (const event of events) {
    const jti = jtiOf(event);
    const taskId = taskIdOfUser(event.user.username, taskNamespace) ?? (jti === undefined ? undefined : taskOfJti(jti));
    if (taskId === undefined) ignored.other_user++;
    else if (!KEPT_STAGES.has(event.stage)) ignored.stage++;
    else kept.push({ event, taskId, jti });
  }
  return { kept, ignored };
}

/**
 * The outcome of a request: `denied` when authorization forbade it (or, without a decision, when it
 * was answered 401 or 403), `error` when the API server failed it (5xx or a panic), `allowed` when
 * authorization allowed it (whatever came after: admission, validation and not-found answers are in
 * `details.code`).
 */
export function outcomeOf(event: KubeAuditEvent): AuditOutcome {
  const decision = event.annotations?.[DECISION_ANNOTATION];
  const code = event.responseStatus?.code;
  if (decision === 'forbid') return 'denied';
  if (event.stage === 'Panic' || (typeof code === 'number' && code >= 500)) return 'error';
  if (decision === 'allow') return 'allowed';
  if (code === 401 || code === 403) return 'denied';
  if (typeof code === 'number' && code >= 400) return 'error';
  return 'allowed';
}

/**
 * The `k8s.request` record of one kept event. `task` is what the broker knows of it (undefined when
 * nothing is: then only the task id, from the username or JTI, is recorded, and the actor is the API
 * server). For a denial, `reason` is the authorizer's reason annotation, or the API server's status
 * message when the authorizer gave none (RBAC gives none).
 */
export function toRecord(c: Classified, task: TaskInfo | undefined): AuditEventInput {
  const e = c.event;
  const ref = e.objectRef ?? {};
  const outcome = outcomeOf(e);
  const decision = e.annotations?.[DECISION_ANNOTATION];
  const reason = outcome === 'denied' ? e.annotations?.[REASON_ANNOTATION] || e.responseStatus?.message || undefined : undefined;
  const details: Record<string, string | number | string[]> = { auditID: cut(e.auditID, MAX.short), verb: cut(e.verb, MAX.short), requestURI: cut(e.requestURI, MAX.uri) };
  const put = (key: string, value: unknown, max: number) => {
    if (typeof value === 'string' && value !== '') details[key] = cut(value, max);
  };
  put('resource', ref.resource, MAX.short);
  put('subresource', ref.subresource, MAX.short);
  put('apiGroup', ref.apiGroup, MAX.name);
  put('apiVersion', ref.apiVersion, MAX.short);
  put('name', ref.name, MAX.name);
  put('userAgent', e.userAgent, MAX.userAgent);
  if (Array.isArray(e.sourceIPs)) {
    const ips = e.sourceIPs.filter((ip): ip is string => typeof ip === 'string').slice(0, MAX.sourceIPs).map((ip) => cut(ip, MAX.short));
    if (ips.length) details['sourceIPs'] = ips;
  }
  if (typeof e.responseStatus?.code === 'number' && Number.isInteger(e.responseStatus.code)) details['code'] = e.responseStatus.code;
  put('decision', decision, MAX.short);
  put('stage', e.stage, MAX.short);
  put('requestReceivedTimestamp', e.requestReceivedTimestamp, MAX.short);
  put('stageTimestamp', e.stageTimestamp, MAX.short);
  put('username', e.user.username, MAX.name);
  const namespace = typeof ref.namespace === 'string' && ref.namespace !== '' ? cut(ref.namespace, MAX.name) : undefined;
  return {
    type: K8S_REQUEST,
    actor: task ? `agent:${task.agent}` : APISERVER_ACTOR,
    ...(task ? { agent: task.agent } : {}),
    task: task?.id ?? c.taskId,
    ...(task ? { taskName: task.name, template: task.template } : {}),
    ...(namespace === undefined ? {} : { namespace }),
    outcome,
    ...(reason ? { reason: cut(reason, MAX.reason) } : {}),
    ...(c.jti === undefined ? {} : { jti: cut(c.jti, MAX.short) }),
    details,
  };
}

/**
 * What makes an event the same event again (a batch posted twice): its auditID, stage and the API
 * server's two timestamps (microseconds), as they are recorded (cut as in the record), hashed (128
 * bits). Not the auditID alone: a client chooses its request's `Audit-ID` header, and the API server
 * takes it as is, so an agent could otherwise give a new request the auditID of a recorded one and
 * have it dropped as a duplicate; the timestamps are the API server's own.
 */
export function eventKey(e: Pick<KubeAuditEvent, 'auditID' | 'stage' | 'requestReceivedTimestamp' | 'stageTimestamp'>): string {
  return recordedKey(cut(e.auditID, MAX.short), cut(e.stage, MAX.short), cutMaybe(e.requestReceivedTimestamp), cutMaybe(e.stageTimestamp));
}

/** eventKey of a k8s.request record, from its details (the values as recorded). */
export function recordedKey(auditID: string, stage: string, requestReceivedTimestamp: string | undefined, stageTimestamp: string | undefined): string {
  return createHash('sha256')
    .update(JSON.stringify([auditID, stage, requestReceivedTimestamp ?? '', stageTimestamp ?? '']))
    .digest('base64url')
    .slice(0, 22);
}

function cutMaybe(value: unknown): string | undefined {
  return typeof value === 'string' && value !== '' ? cut(value, MAX.short) : undefined;
}

/**
 * The kept events in request order: by requestReceivedTimestamp (RFC 3339 with microseconds, so the
 * text sorts as the time does), the batch's order among equals. The API server queues events as
 * requests complete, so a long request can otherwise come after a later, shorter one.
 */
export function inRequestOrder<T extends { event: KubeAuditEvent }>(kept: readonly T[]): T[] {
  return kept
    .map((c, i) => ({ c, i, t: typeof c.event.requestReceivedTimestamp === 'string' ? Date.parse(c.event.requestReceivedTimestamp) : NaN }))
    .sort((a, b) => (Number.isNaN(a.t) || Number.isNaN(b.t) || a.t === b.t ? a.i - b.i : a.t - b.t))
    .map((x) => x.c);
}

/**
 * `value` cut so that its JSON text in UTF-8 (escapes included: a `"` or a control character takes 2
 * to 6 bytes there, a non-ASCII character 2 to 4) is at most `max` bytes, so no value an agent chose (a
 * request URI) can push a record past the log's 8 KiB `details` bound, and so out of the log.
 */
export function cut(value: string, max: number): string {
  // No character takes more than 6 bytes in JSON text (`\u001f`; a UTF-16 unit of non-ASCII at most 3):
  // a value that short needs no measuring (the common case, on every recorded request).
  if (value.length * 6 <= max) return value;
  const size = (v: string) => Buffer.byteLength(JSON.stringify(v)) - 2;
  if (value.length <= max && size(value) <= max) return value;
  // The mark `…` takes 3 bytes.
  let n = Math.min(value.length, max - 3);
  while (n > 0 && size(value.slice(0, n)) > max - 3) n = Math.max(0, Math.min(n - 1, Math.floor(n * 0.9)));
  return `${value.slice(0, n)}…`;
}

function short(value: unknown): string {
  return value === undefined ? 'nothing' : JSON.stringify(value).slice(0, 64);
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
