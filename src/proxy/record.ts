/**
 * The `k8s.request` record of a request through the proxy: the same shape as the API server's audit
 * webhook gives (src/audit/kube-events.ts), so `broker audit show --task` tells one story whichever
 * way the request was seen, plus what only the gateway knows: the session, kubectl's own command
 * headers (KEP 859: `Kubectl-Command`, `Kubectl-Session`), bytes each way and the duration. Every
 * value an agent chose is cut to a bound, so no request can push a record out of the log. Pure.
 */
import type { AuditEventInput, AuditOutcome, JsonValue } from '../audit/types.ts';
import { cut, K8S_REQUEST, MAX } from '../audit/kube-events.ts';
import type { RequestInfo } from './request-info.ts';

/** What the proxy knows of the task a session belongs to. */
export interface SessionTask {
  id: string;
  agent: string;
  name?: string | undefined;
  template?: string | undefined;
  /** The session id (the session token's JWT ID). */
  sid: string;
}

export interface ProxiedRequest {
  method: string;
  url: string;
  info: RequestInfo;
  userAgent?: string | undefined;
  source: string;
  kubectlCommand?: string | undefined;
  kubectlSession?: string | undefined;
}

export interface ProxiedResult {
  /** HTTP status the client was (or is about to be) given. */
  code?: number | undefined;
  auditID?: string | undefined;
  outcome: AuditOutcome;
  reason?: string | undefined;
  bytesIn?: number | undefined;
  bytesOut?: number | undefined;
  durationMs?: number | undefined;
  /** `start` and `end` for a stream (watch, logs -f, exec); none for a request recorded once. */
  phase?: 'start' | 'end' | undefined;
  /** Refused by the proxy itself, never forwarded. */
  refused?: boolean | undefined;
  /** Further facts (an exec session's command and recording). */
  extra?: Record<string, JsonValue> | undefined;
}

/** The outcome of an answer, as the webhook's records have it: 401/403 denied, other 4xx and 5xx error. */
export function outcomeOfStatus(code: number): AuditOutcome {
  if (code === 401 || code === 403) return 'denied';
  if (code >= 400) return 'error';
  return 'allowed';
}

export function proxyRecord(task: SessionTask, req: ProxiedRequest, res: ProxiedResult): AuditEventInput {
  const { info } = req;
  const details: Record<string, JsonValue> = { via: 'proxy', session: cut(task.sid, MAX.short), verb: cut(info.verb, MAX.short), requestURI: cut(req.url, MAX.uri) };
  const put = (key: string, value: string | undefined, max: number) => {
    if (value !== undefined && value !== '') details[key] = cut(value, max);
  };
  put('resource', info.resource, MAX.short);
  put('subresource', info.subresource, MAX.short);
  put('apiGroup', info.apiGroup, MAX.name);
  put('apiVersion', info.apiVersion, MAX.short);
  put('name', info.name, MAX.name);
  put('userAgent', req.userAgent, MAX.userAgent);
  details['sourceIPs'] = [cut(req.source, MAX.short)];
  if (res.code !== undefined) details['code'] = res.code;
  put('auditID', res.auditID, MAX.short);
  put('kubectlCommand', req.kubectlCommand, MAX.short);
  put('kubectlSession', req.kubectlSession, MAX.short);
  if (res.bytesIn !== undefined) details['bytesIn'] = res.bytesIn;
  if (res.bytesOut !== undefined) details['bytesOut'] = res.bytesOut;
  if (res.durationMs !== undefined) details['durationMs'] = Math.round(res.durationMs * 10) / 10;
  if (res.phase) details['phase'] = res.phase;
  if (res.refused) details['refused'] = true;
  if (res.extra) Object.assign(details, res.extra);
  return {
    type: K8S_REQUEST,
    actor: `agent:${task.agent}`,
    agent: task.agent,
    task: task.id,
    ...(task.name === undefined ? {} : { taskName: task.name }),
    ...(task.template === undefined ? {} : { template: task.template }),
    ...(info.namespace === '' ? {} : { namespace: cut(info.namespace, MAX.name) }),
    outcome: res.outcome,
    ...(res.reason ? { reason: cut(res.reason, MAX.reason) } : {}),
    details,
  };
}

/** An API server that could not be reached, or did not answer in time: the code and reason the proxy answers and records. */
export function upstreamFailure(timedOut: boolean, err: NodeJS.ErrnoException, timeoutMs: number): { code: 502 | 504; reason: string } {
  return timedOut
    ? { code: 504, reason: `the API server did not answer within ${timeoutMs / 1000} s` }
    : { code: 502, reason: `the proxy could not reach the API server (${err.code ?? err.message})` };
}

/** The first value of a header node:http or undici gives as a string or a list. */
export function headerValue(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

/** The message of a Kubernetes Status body (a refusal's reason), if the body is one. */
export function statusMessage(body: Buffer | undefined): string | undefined {
  if (!body || body.length === 0 || body.length > 64 * 1024 || body[0] !== 0x7b) return undefined;
  try {
    const status = JSON.parse(body.toString('utf8')) as { kind?: unknown; message?: unknown };
    return status.kind === 'Status' && typeof status.message === 'string' ? status.message : undefined;
  } catch {
    return undefined;
  }
}

/** A Kubernetes Status body, which kubectl prints as `Error from server (REASON): MESSAGE`. */
export function statusBody(code: number, reason: string, message: string): string {
  return JSON.stringify({ kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message, reason, code });
}

/** The Status reason kubectl shows for a code the proxy answers itself. */
export function statusReason(code: number): string {
  switch (code) {
    case 400:
      return 'BadRequest';
    case 401:
      return 'Unauthorized';
    case 403:
      return 'Forbidden';
    case 405:
      return 'MethodNotAllowed';
    case 429:
      return 'TooManyRequests';
    case 431:
      return 'RequestHeaderFieldsTooLarge';
    case 502:
      return 'BadGateway';
    case 503:
      return 'ServiceUnavailable';
    case 504:
      return 'Timeout';
    default:
      return 'InternalError';
  }
}
