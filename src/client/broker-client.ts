/**
 * The CLI's client for the broker API: resolves the broker URL, its CA and the caller's identity
 * once, and turns every failure into a BrokerError with the broker's own code.
 *
 * The identity token goes to the configured broker URL and nowhere else, as with the exec plugin:
 * plain http:// only to a loopback host (refused before any connection otherwise), no redirect
 * followed, no proxy, and one deadline over each whole request (connect, TLS, answer and body).
 */
import { readFileSync } from 'node:fs';
import { connect as tlsConnect } from 'node:tls';
import { Agent, request } from 'undici';
import { BrokerError, ERROR_CODES, type ErrorCode } from '../errors.ts';
import type { ApprovalView } from '../approvals/model.ts';
import type { TaskView } from '../tasks/model.ts';
import type { TaskStateView } from '../tasks/history.ts';
import type { TemplateView, WhoamiView } from '../server/routes-info.ts';

/** The whole of one request, from connecting to the last byte of the answer. */
export const REQUEST_DEADLINE_MS = 30_000;

export interface ClientOptions {
  /** --broker, else BROKER_URL. */
  broker?: string | undefined;
  /** --broker-ca, else BROKER_CA. */
  brokerCa?: string | undefined;
  env?: NodeJS.ProcessEnv;
  /** The deadline of each request. Default REQUEST_DEADLINE_MS. */
  deadlineMs?: number;
}

export interface StartTask {
  template: string;
  namespace: string;
  name?: string | undefined;
  ttl?: string | undefined;
  reason?: string | undefined;
}

export interface ClusterInfo {
  server: string;
  certificateAuthorityData?: string;
  /** The broker's Kubernetes API proxy, when it has one (`broker serve --proxy-listen`). */
  proxy?: { server: string };
}

export class BrokerClient {
  readonly url: string;
  readonly brokerCa: string | undefined;
  readonly identitySource: string;
  readonly #token: string;
  readonly #dispatcher: Agent;
  readonly #deadlineMs: number;

  constructor(options: ClientOptions = {}) {
    const env = options.env ?? process.env;
    const url = options.broker ?? env['BROKER_URL'];
    const from = options.broker ? '--broker' : 'BROKER_URL';
    if (!url) throw new BrokerError('invalid_argument', 'no broker: pass --broker URL or set BROKER_URL', { field: '--broker' });
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new BrokerError('invalid_argument', `${JSON.stringify(url)} (from ${from}) is not a URL`, { field: from });
    }
    if (parsed.protocol !== 'https:' && parsed.protocol !== 'http:') {
      throw new BrokerError('invalid_argument', `the broker URL from ${from} must be https:// (or http:// to loopback), not ${parsed.protocol}//`, { field: from });
    }
    if (parsed.protocol === 'http:' && !isLoopback(parsed.hostname)) {
      throw new BrokerError(
        'invalid_argument',
        `the broker URL from ${from} is plain http:// to ${parsed.host}, which is not loopback: use https:// (http:// is allowed only to 127.0.0.0/8, ::1 and localhost, so that the identity token never crosses a network in clear)`,
        { field: from },
      );
    }
    this.url = url.replace(/\/+$/, '');
    this.#deadlineMs = options.deadlineMs ?? REQUEST_DEADLINE_MS;
    this.brokerCa = options.brokerCa ?? env['BROKER_CA'];
    let ca: Buffer | undefined;
    if (this.brokerCa) {
      try {
        ca = readFileSync(this.brokerCa);
      } catch (err) {
        throw new BrokerError('invalid_argument', `cannot read ${this.brokerCa}: ${(err as NodeJS.ErrnoException).code}`, { field: '--broker-ca' });
      }
    }
    const { token, source } = readIdentity(env);
    this.#token = token;
    this.identitySource = source;
    this.#dispatcher = new Agent({ connect: ca ? { ca } : {} });
  }

  /** Who the broker takes the caller for. */
  whoami(): Promise<WhoamiView> {
    return this.#call<WhoamiView>('GET', '/v1/whoami');
  }

  /** The templates the caller may start. */
  async templates(): Promise<TemplateView[]> {
    return (await this.#call<{ templates: TemplateView[] }>('GET', '/v1/templates')).templates;
  }

  async close(): Promise<void> {
    await this.#dispatcher.close();
  }

  startTask(req: StartTask, approvalToken?: string): Promise<TaskView> {
    const body: Record<string, string> = { template: req.template, namespace: req.namespace };
    if (req.name) body['name'] = req.name;
    if (req.ttl) body['ttl'] = req.ttl;
    if (req.reason) body['reason'] = req.reason;
    if (approvalToken) body['approvalToken'] = approvalToken;
    return this.#call<TaskView>('POST', '/v1/tasks', body);
  }

  endTask(ref: string): Promise<TaskView> {
    return this.#call<TaskView>('DELETE', `/v1/tasks/${encodeURIComponent(ref)}`);
  }

  /** An active task, or an ended one from the history (with its state). */
  getTask(ref: string): Promise<TaskStateView> {
    return this.#call<TaskStateView>('GET', `/v1/tasks/${encodeURIComponent(ref)}`);
  }

  /** The active tasks; with `all`, the ended ones still in the history too (each with its state). */
  async listTasks(all = false): Promise<TaskStateView[]> {
    return (await this.#call<{ tasks: TaskStateView[] }>('GET', `/v1/tasks${all ? '?all=true' : ''}`)).tasks;
  }

  async listApprovals(pending: boolean): Promise<ApprovalView[]> {
    return (await this.#call<{ approvals: ApprovalView[] }>('GET', `/v1/approvals${pending ? '?pending=true' : ''}`)).approvals;
  }

  /** An approval request; with `approvalToken` when it is approved and the caller requested it. */
  getApproval(id: string): Promise<ApprovalView & { approvalToken?: string }> {
    return this.#call('GET', `/v1/approvals/${encodeURIComponent(id)}`);
  }

  decide(id: string, decision: 'approve' | 'deny', reason?: string): Promise<ApprovalView & { approvalToken?: string }> {
    return this.#call('POST', `/v1/approvals/${encodeURIComponent(id)}/${decision}`, reason ? { reason } : {});
  }

  cluster(): Promise<ClusterInfo> {
    return this.#call<ClusterInfo>('GET', '/v1/cluster');
  }

  async #call<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
    const signal = AbortSignal.timeout(this.#deadlineMs);
    let res;
    let text: string;
    try {
      // undici's request follows no redirect; a 3xx is refused below, its Location never used.
      res = await request(this.url + path, {
        method,
        dispatcher: this.#dispatcher,
        signal,
        headers: {
          authorization: `Bearer ${this.#token}`,
          accept: 'application/json',
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
      text = await res.body.text();
    } catch (err) {
      throw await this.#unreachable(err, signal);
    }
    if (res.statusCode >= 300 && res.statusCode < 400) {
      throw new BrokerError(
        'broker_unreachable',
        `the broker at ${this.url} answered ${res.statusCode}, a redirect: redirects are refused, the identity token goes only to the configured broker URL (check --broker / BROKER_URL)`,
      );
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new BrokerError('broker_unreachable', `${this.url} answered ${res.statusCode} without JSON: is it a task-broker?`);
    }
    if (res.statusCode >= 200 && res.statusCode < 300) return parsed as T;
    const error = (parsed as { error?: { code?: string; message?: string; field?: string; requestId?: string; hint?: string } }).error ?? {};
    const code: ErrorCode = error.code && error.code in ERROR_CODES ? (error.code as ErrorCode) : 'internal';
    let message = error.message ?? `the broker answered ${res.statusCode}`;
    if (code === 'unauthenticated') message += ` (identity from ${this.identitySource})${error.hint ? `; ${error.hint}` : ''}`;
    throw new BrokerApiError(code, message, error.field, error.requestId);
  }

  /** Why a request got no answer, in the user's terms: the deadline, TLS spoken to plain HTTP or the reverse, or the network's code. */
  async #unreachable(err: unknown, signal: AbortSignal): Promise<BrokerError> {
    if (signal.aborted) {
      return new BrokerError('broker_unreachable', `the broker at ${this.url} gave no complete answer: timed out after ${Math.round(this.#deadlineMs / 1000)} s`, { cause: err });
    }
    const e = err as NodeJS.ErrnoException;
    const url = new URL(this.url);
    if (url.protocol === 'https:' && /WRONG_VERSION_NUMBER|wrong version number|packet length too long/i.test(`${e.code} ${e.message}`)) {
      return new BrokerError('broker_unreachable', `the broker at ${this.url} speaks plain HTTP: use http:// (loopback only)`, { cause: err });
    }
    if (url.protocol === 'http:' && (e.code === 'UND_ERR_SOCKET' || e.code === 'ECONNRESET') && (await speaksTls(url))) {
      return new BrokerError('broker_unreachable', `the broker at ${this.url} speaks TLS: use https://${url.host}`, { cause: err });
    }
    return new BrokerError('broker_unreachable', `the broker is unreachable at ${this.url}: ${e.code ?? e.message}`, { cause: err });
  }
}

/** The only hosts plain http:// may reach: 127.0.0.0/8, ::1, localhost (as URL normalises them). */
export function isLoopback(hostname: string): boolean {
  return hostname === 'localhost' || hostname === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(hostname);
}

/** Whether a TLS handshake succeeds at `url`'s host and port (a loopback host: plain http is only allowed there). Sends nothing else. */
function speaksTls(url: URL): Promise<boolean> {
  return new Promise((done) => {
    const host = url.hostname.replace(/^\[|\]$/g, '');
    const socket = tlsConnect({ host, port: Number(url.port || 80), rejectUnauthorized: false, ...(host === 'localhost' ? { servername: host } : {}) });
    const finish = (ok: boolean) => {
      socket.destroy();
      done(ok);
    };
    socket.setTimeout(2_000, () => finish(false));
    socket.once('secureConnect', () => finish(true));
    socket.once('error', () => finish(false));
  });
}

/** A refusal from the broker, with the approval request id when the code is approval_required. */
export class BrokerApiError extends BrokerError {
  /** Its message and field came from the broker (escape them before a terminal sees them). */
  readonly fromBroker = true;
  readonly requestId: string | undefined;
  constructor(code: ErrorCode, message: string, field: string | undefined, requestId: string | undefined) {
    super(code, message, field ? { field } : {});
    this.requestId = requestId;
  }
}

/** BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token), else BROKER_IDENTITY_TOKEN. */
export function readIdentity(env: NodeJS.ProcessEnv): { token: string; source: string } {
  const file = env['BROKER_IDENTITY_TOKEN_FILE'];
  if (file) {
    let token: string;
    try {
      token = readFileSync(file, 'utf8').trim();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const what = code === 'ENOENT' ? 'which does not exist' : code === 'EACCES' ? 'which you may not read' : `which cannot be read (${code})`;
      throw new BrokerError('unauthenticated', `BROKER_IDENTITY_TOKEN_FILE points at ${file}, ${what}; ${GET_IDENTITY}`);
    }
    if (!token) throw new BrokerError('unauthenticated', `BROKER_IDENTITY_TOKEN_FILE points at ${file}, which is empty; ${GET_IDENTITY}`);
    return { token, source: `BROKER_IDENTITY_TOKEN_FILE=${file}` };
  }
  const token = env['BROKER_IDENTITY_TOKEN']?.trim();
  if (token) return { token, source: 'BROKER_IDENTITY_TOKEN' };
  throw new BrokerError('unauthenticated', `no identity: set BROKER_IDENTITY_TOKEN_FILE to a file holding a token, or BROKER_IDENTITY_TOKEN; ${GET_IDENTITY}`);
}

const GET_IDENTITY =
  "an identity is a ServiceAccount token with the broker's audience for a ServiceAccount the policy names: in a pod, a projected token (serviceAccountToken volume, audience = the policy's broker.identityAudience); elsewhere ask your administrator for one (kubectl create token NAME --namespace NS --audience AUDIENCE > FILE)";
