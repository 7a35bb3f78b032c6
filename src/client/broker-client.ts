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
import { resolveIdentity, type ClientIdentity } from '../identity/client-identity.ts';

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
  /** The identity to present; default: the environment's, else the keychain's. null: none. */
  identity?: ClientIdentity | null;
}

export interface StartTask {
  template: string;
  namespace: string;
  name?: string | undefined;
  ttl?: string | undefined;
  reason?: string | undefined;
}

export interface AgentView {
  name: string;
  key: { fingerprint: string; enrolledAt: string } | null;
  enrolment: { expiresAt: string; createdBy: string } | null;
  activeTasks: number;
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
  readonly #identity: ClientIdentity | null;
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
    // null: no identity at all (`broker agent enroll` authenticates with its code alone).
    this.#identity = options.identity === undefined ? readIdentity(env, this.url) : options.identity;
    this.identitySource = this.#identity?.source ?? 'none';
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

  /** Administrators: a one-time enrolment code for agent `name`. */
  registerAgent(name: string): Promise<{ agent: string; code: string; expiresAt: string }> {
    return this.#call('POST', `/v1/agents/${encodeURIComponent(name)}/enrolment`, {});
  }

  /** Enrols `publicKey` (raw Ed25519, base64url) with an enrolment code, which is used up. */
  enrolAgent(code: string, publicKey: string): Promise<{ agent: string; fingerprint: string; enrolledAt: string }> {
    return this.#call('POST', '/v1/agents/enroll', { publicKey }, `Enrolment ${code}`);
  }

  listAgents(): Promise<{ agents: AgentView[] }> {
    return this.#call('GET', '/v1/agents');
  }

  /** Administrators: removes the agent's key at once and ends its tasks. */
  revokeAgent(name: string): Promise<{ agent: string; fingerprint: string; tasksEnded: TaskView[] }> {
    return this.#call('DELETE', `/v1/agents/${encodeURIComponent(name)}/key`);
  }

  /** Where people sign in (`GET /v1/login`, asked without a credential: '' sends none). */
  loginIssuers(): Promise<{ issuers: Array<{ issuer: string; clientId: string }> }> {
    return this.#call('GET', '/v1/login', undefined, '');
  }

  cluster(): Promise<ClusterInfo> {
    return this.#call<ClusterInfo>('GET', '/v1/cluster');
  }

  async #call<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown, authorization?: string): Promise<T> {
    // An agent proof is made for exactly this method and URL; a login may refresh its token first.
    authorization ??= this.#identity ? await this.#identity.authorization(method, this.url + path) : undefined;
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
          ...(authorization ? { authorization } : {}),
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

/** The identity the CLI presents to `brokerUrl` (src/identity/client-identity.ts: environment, then keychain). */
export function readIdentity(env: NodeJS.ProcessEnv, brokerUrl = env['BROKER_URL'] ?? ''): ClientIdentity {
  return resolveIdentity(env, brokerUrl);
}
