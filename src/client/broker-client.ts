/**
 * The CLI's client for the broker API: resolves the broker URL, its CA and the caller's identity
 * once, and turns every failure into a BrokerError with the broker's own code.
 */
import { readFileSync } from 'node:fs';
import { Agent, request } from 'undici';
import { BrokerError, ERROR_CODES, type ErrorCode } from '../errors.ts';
import type { ApprovalView } from '../approvals/model.ts';
import type { TaskView } from '../tasks/model.ts';

export interface ClientOptions {
  /** --broker, else BROKER_URL. */
  broker?: string | undefined;
  /** --broker-ca, else BROKER_CA. */
  brokerCa?: string | undefined;
  env?: NodeJS.ProcessEnv;
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
}

export class BrokerClient {
  readonly url: string;
  readonly brokerCa: string | undefined;
  readonly identitySource: string;
  readonly #token: string;
  readonly #dispatcher: Agent;

  constructor(options: ClientOptions = {}) {
    const env = options.env ?? process.env;
    const url = options.broker ?? env['BROKER_URL'];
    if (!url) throw new BrokerError('invalid_argument', 'no broker: pass --broker URL or set BROKER_URL', { field: '--broker' });
    try {
      new URL(url);
    } catch {
      throw new BrokerError('invalid_argument', `${JSON.stringify(url)} is not a URL`, { field: '--broker' });
    }
    this.url = url.replace(/\/+$/, '');
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

  getTask(ref: string): Promise<TaskView> {
    return this.#call<TaskView>('GET', `/v1/tasks/${encodeURIComponent(ref)}`);
  }

  async listTasks(): Promise<TaskView[]> {
    return (await this.#call<{ tasks: TaskView[] }>('GET', '/v1/tasks')).tasks;
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
    let res;
    try {
      res = await request(this.url + path, {
        method,
        dispatcher: this.#dispatcher,
        headers: {
          authorization: `Bearer ${this.#token}`,
          accept: 'application/json',
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        headersTimeout: 30_000,
        bodyTimeout: 30_000,
      });
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      throw new BrokerError('broker_unreachable', `the broker is unreachable at ${this.url}: ${e.code ?? e.message}`, { cause: err });
    }
    const text = await res.body.text();
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new BrokerError('broker_unreachable', `${this.url} answered ${res.statusCode} without JSON: is it a task-broker?`);
    }
    if (res.statusCode >= 200 && res.statusCode < 300) return parsed as T;
    const error = (parsed as { error?: { code?: string; message?: string; field?: string; requestId?: string } }).error ?? {};
    const code: ErrorCode = error.code && error.code in ERROR_CODES ? (error.code as ErrorCode) : 'internal';
    let message = error.message ?? `the broker answered ${res.statusCode}`;
    if (code === 'unauthenticated') message += ` (identity from ${this.identitySource})`;
    throw new BrokerApiError(code, message, error.field, error.requestId);
  }
}

/** A refusal from the broker, with the approval request id when the code is approval_required. */
export class BrokerApiError extends BrokerError {
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
      throw new BrokerError('unauthenticated', `cannot read BROKER_IDENTITY_TOKEN_FILE=${file}: ${(err as NodeJS.ErrnoException).code}`);
    }
    if (!token) throw new BrokerError('unauthenticated', `BROKER_IDENTITY_TOKEN_FILE=${file} is empty`);
    return { token, source: `BROKER_IDENTITY_TOKEN_FILE=${file}` };
  }
  const token = env['BROKER_IDENTITY_TOKEN']?.trim();
  if (token) return { token, source: 'BROKER_IDENTITY_TOKEN' };
  throw new BrokerError('unauthenticated', 'no identity: set BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN');
}
