/**
 * The Kubernetes API proxy (`broker serve --proxy-listen`): the agent connects to the broker, the
 * broker connects to the cluster. kubectl comes with a session token (src/proxy/session.ts); the proxy
 * checks it and that its task is still active on every request, drops the client's credential,
 * refuses impersonation, and forwards with the task's TokenRequest token, which never leaves broker
 * memory. RBAC still decides upstream.
 *
 * Recording: one `k8s.request` record per request (src/proxy/record.ts), durable before the answer is
 * relayed, so the agent never sees a result that was not recorded. An answer that is a stream (watch,
 * `logs -f`) or too big to hold (over `bufferBytes`) is recorded at its start, with its status, and
 * again at its end, with the bytes and the duration. WebSocket upgrades (exec, attach, cp,
 * port-forward) go to src/proxy/stream-session.ts, which records what crosses them.
 *
 * Plumbing: node:http(s) parses requests (llhttp, with its header size bound and its request-smuggling
 * checks), undici carries them upstream (a pool per API server, streaming both ways), ws does the
 * WebSocket handshakes and framing. Nothing here parses HTTP by hand. The proxy is not a fastify
 * route: it shares the task store, the task service and the audit log with the broker API, not its
 * hooks (DESIGN.md section 9).
 */
import { once } from 'node:events';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Socket } from 'node:net';
import { pipeline, Transform, type Duplex } from 'node:stream';
import { Pool, errors as undiciErrors, type Dispatcher } from 'undici';
import type { AuditEventInput } from '../audit/types.ts';
import { isBrokerError } from '../errors.ts';
import { AuthFailureLog } from '../server/auth-failures.ts';
import { Budget, sourceOf, type Rate } from '../server/limits.ts';
import { headerValue, outcomeOfStatus, proxyRecord, statusBody, statusMessage, statusReason, upstreamFailure, type ProxiedRequest, type SessionTask } from './record.ts';
import { isStreaming, requestInfo, targetProblem } from './request-info.ts';
import type { SessionTokens } from './session.ts';
import { relayWebSocket, writeRaw } from './stream-session.ts';

/** What the proxy needs of tasks: the active task by id, and its upstream token (src/tasks/service.ts). */
export interface ProxyTasks {
  active(id: string): { id: string; agent: string; name: string; template: string; expiresAt: Date } | undefined;
  upstreamToken(id: string): Promise<string | undefined>;
}

/** What the proxy needs of the audit log. */
export interface ProxyAudit {
  readonly healthy: boolean;
  append(event: AuditEventInput): Promise<unknown>;
}

export interface ProxyOptions {
  /** The API server: its URL and the CA that verifies it (PEM). */
  upstream: { server: string; ca?: string | Buffer | undefined };
  /** TLS for the listener; absent: plain HTTP (the caller allows that on loopback only). */
  https?: { key: Buffer; cert: Buffer } | undefined;
  sessions: SessionTokens;
  tasks: ProxyTasks;
  audit: ProxyAudit;
  /** Where exec and attach session recordings go (a directory, made 0700). */
  recordings: string;
  /** An upstream answer's headers must come within this; default 60 s. A request body or a non-stream answer may pause this long. */
  upstreamTimeoutMs?: number | undefined;
  /** Request headers larger than this are refused (431); default 16 KiB. */
  maxHeaderBytes?: number | undefined;
  /** Answers up to this size are recorded once, complete; larger ones at start and end. Default 1 MiB. */
  bufferBytes?: number | undefined;
  /** An exec or attach session is closed when its recording would pass this; default 64 MiB. */
  maxRecordingBytes?: number | undefined;
  /** Where failures the client does not see are logged. */
  log?: (line: string) => void;
  /** Requests wait for this before anything is checked (the broker's start being on the log). */
  ready?: Promise<void> | undefined;
  /** Prometheus metrics (src/server/metrics.ts): requests by outcome and duration, open streams. */
  metrics?: ProxyMetrics | undefined;
  /** Rate budgets: per source address before anything is checked, per agent once its session is; beyond, 429 with Retry-After. */
  limits?: { perSource?: Rate | undefined; perAgent?: Rate | undefined; failureLogIntervalMs?: number | undefined } | undefined;
}

/** The proxy's budget per agent: kubectl's discovery alone can make dozens of requests at once. */
export const PROXY_PER_AGENT: Rate = { max: 1000, windowMs: 1000 };
/** Connections one source may hold open to the proxy (each watch holds one). */
export const PROXY_CONNECTIONS_PER_SOURCE = 1024;

/** The metrics the proxy feeds (Metrics in src/server/metrics.ts has them). */
export interface ProxyMetrics {
  proxyRequests: { observe(labels: { outcome: string }, seconds: number): void };
  proxyOpenStreams: { inc(): void; dec(): void };
}

/** Request headers never forwarded: hop-by-hop ones, and the client's own credential. */
const DROPPED_REQUEST_HEADERS = new Set(['authorization', 'connection', 'keep-alive', 'proxy-authorization', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'host', 'expect']);
/** Answer headers never relayed: hop-by-hop ones. */
const DROPPED_RESPONSE_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'trailer', 'te']);

/** A request the proxy accepted: whose it is, what it is, and the token to forward it with. */
interface Admitted {
  task: SessionTask;
  req: ProxiedRequest;
  token: string;
  started: number;
}

/** A refusal: the answer, and how it is recorded (`record`: one k8s.request record; else counted in the summary). */
interface Refusal {
  code: number;
  message: string;
  record?: { task: SessionTask; req: ProxiedRequest } | undefined;
  summary?: { category: 'no_credential' | 'rejected' | 'rate_limited'; actor?: string | undefined; agent?: string | undefined } | undefined;
  /** Seconds, for a 429. */
  retryAfter?: number | undefined;
}

export class KubeProxy {
  readonly #o: ProxyOptions;
  readonly #server: Server;
  readonly #pool: Pool;
  /** What every Relay (one proxied answer) needs of the proxy. */
  readonly #relayContext: RelayContext;
  readonly #failures: AuthFailureLog;
  readonly #upstreamTimeoutMs: number;
  readonly #bufferBytes: number;
  readonly #upstreamUrl: URL;
  readonly #sockets = new Set<Socket | Duplex>();
  #url: string | undefined;
  #ready = false;
  readonly #sourceBudget: Budget | undefined;
  readonly #agentBudget: Budget | undefined;
  /** Streams relayed now (watch, logs -f, large answers, WebSocket sessions and tunnels): cut when their task ends. */
  readonly #streams = new Set<{ task: string; cut: () => void }>();
  #streamCheck: NodeJS.Timeout | undefined;

  constructor(options: ProxyOptions) {
    this.#o = options;
    this.#upstreamUrl = new URL(options.upstream.server);
    this.#upstreamTimeoutMs = options.upstreamTimeoutMs ?? 60_000;
    this.#bufferBytes = options.bufferBytes ?? 1024 * 1024;
    this.#sourceBudget = options.limits?.perSource ? new Budget(options.limits.perSource) : undefined;
    this.#agentBudget = options.limits?.perAgent ? new Budget(options.limits.perAgent) : undefined;
    this.#pool = new Pool(this.#upstreamUrl.origin, {
      connect: { ...(options.upstream.ca ? { ca: options.upstream.ca } : {}), rejectUnauthorized: true },
      connections: null,
      pipelining: 1,
      // HTTP/1.1, a connection per request in flight (kept alive): a GET through undici's HTTP/2 costs
      // the broker about 70 us more CPU (bench/bare-proxy.ts), and HTTP/2 saved no memory for 500
      // watches (undici opens a connection for each of a burst of requests before HTTP/2 is agreed).
      allowH2: false,
      headersTimeout: this.#upstreamTimeoutMs,
      bodyTimeout: this.#upstreamTimeoutMs,
    });
    this.#relayContext = { append: (e) => this.#append(e), internal: (res, err) => this.#internal(res, err), onTaskEnd: (task, cut) => this.#onTaskEnd(task, cut), bufferBytes: this.#bufferBytes, timeoutMs: this.#upstreamTimeoutMs };
    this.#failures = new AuthFailureLog({ append: (e) => options.audit.append({ ...e, details: { ...e.details, listener: 'proxy' } }), intervalMs: options.limits?.failureLogIntervalMs ?? 10_000, maxSources: 100 });
    const serverOptions = { maxHeaderSize: options.maxHeaderBytes ?? 16 * 1024, requestTimeout: 0, headersTimeout: 10_000, keepAliveTimeout: 5_000 };
    this.#server = options.https ? createHttpsServer({ ...serverOptions, key: options.https.key, cert: options.https.cert }) : createHttpServer(serverOptions);
    this.#server.on('request', (req: IncomingMessage, res: ServerResponse) => {
      this.#onRequest(req, res).catch((err: unknown) => this.#internal(res, err));
    });
    this.#server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      socket.on('error', () => undefined);
      this.#onUpgrade(req, socket, head).catch((err: unknown) => {
        this.#log(`proxy: upgrade failed: ${(err as Error).message}`);
        writeRaw(socket, 500, statusBody(500, 'InternalError', 'the proxy failed to relay this request'));
      });
    });
    this.#server.on('connect', (req: IncomingMessage, socket: Duplex) => {
      socket.on('error', () => undefined);
      this.#onConnect(req, socket).catch(() => socket.destroy());
    });
    this.#server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
      const source = sourceOf((socket as Socket).remoteAddress);
      if (err.code === 'HPE_HEADER_OVERFLOW') {
        this.#failures.note({ source, category: 'rejected' }, 'proxy: request headers over the size bound (431)');
        writeRaw(socket, 431, statusBody(431, 'RequestHeaderFieldsTooLarge', 'request headers are larger than the proxy accepts'));
        return;
      }
      if (err.code !== 'ECONNRESET') this.#failures.note({ source, category: 'rejected' }, `proxy: malformed request (${err.code ?? 'error'})`);
      writeRaw(socket, 400, statusBody(400, 'BadRequest', 'malformed HTTP request'));
    });
    this.#server.on('connection', (socket: Socket) => {
      this.#sockets.add(socket);
      socket.once('close', () => this.#sockets.delete(socket));
    });
  }

  /** The listening server (for connection caps: src/server/limits.ts guardConnections). */
  get server(): Server {
    return this.#server;
  }

  /** The URL clients reach the proxy at, once listening. */
  get url(): string {
    if (!this.#url) throw new Error('the proxy is not listening');
    return this.#url;
  }

  async listen(host: string, port: number): Promise<string> {
    this.#server.listen(port, host);
    await once(this.#server, 'listening');
    const address = this.#server.address();
    const actual = typeof address === 'object' && address ? address.port : port;
    const shownHost = host.includes(':') ? `[${host}]` : host;
    this.#failures.start();
    this.#streamCheck = setInterval(() => {
      for (const st of this.#streams) {
        if (this.#o.tasks.active(st.task)) continue;
        this.#streams.delete(st); // cut once
        st.cut();
      }
    }, 250).unref();
    return (this.#url = `${this.#o.https ? 'https' : 'http'}://${shownHost}:${actual}`);
  }

  async close(): Promise<void> {
    if (this.#streamCheck) clearInterval(this.#streamCheck);
    this.#server.close();
    for (const s of this.#sockets) s.destroy();
    await this.#pool.close().catch(() => undefined);
    await this.#failures.close();
  }

  #log(line: string): void {
    (this.#o.log ?? ((l: string) => process.stderr.write(`broker: ${l}\n`)))(line);
  }

  // --- admission: who, what, and whether it may go on ---

  async #admit(req: IncomingMessage): Promise<{ ok: true; admitted: Admitted } | { ok: false; refusal: Refusal }> {
    const started = performance.now();
    if (this.#o.ready && !this.#ready) {
      await this.#o.ready;
      this.#ready = true;
    }
    const bySource = this.#sourceBudget?.spend(sourceOf(req.socket.remoteAddress));
    if (bySource?.over) {
      return { ok: false, refusal: { code: 429, message: 'too many requests from this address: slow down', summary: { category: 'rate_limited' }, retryAfter: bySource.retryAfter } };
    }
    const auths: string[] = [];
    let impersonation: string | undefined;
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const name = req.rawHeaders[i]!.toLowerCase();
      if (name === 'authorization') auths.push(req.rawHeaders[i + 1]!);
      // Impersonation, and the request-header authentication of an authenticating front proxy.
      else if (name.startsWith('impersonate-') || name.startsWith('x-remote-')) impersonation ??= req.rawHeaders[i]!;
    }
    if (auths.length === 0) {
      return { ok: false, refusal: { code: 401, message: 'no session token: the proxy takes the token `broker credential --via proxy` hands kubectl (use a kubeconfig from `broker kubeconfig --via proxy`)', summary: { category: 'no_credential' } } };
    }
    const bearer = /^Bearer\s+(\S+)\s*$/i.exec(auths[0]!)?.[1];
    let claims = bearer === undefined ? undefined : this.#o.sessions.known(bearer);
    if (!claims) {
      try {
        if (!bearer) throw new Error('not a bearer token');
        claims = await this.#o.sessions.verify(bearer);
      } catch (err) {
        const why = isBrokerError(err) ? err.message : 'the Authorization header is not a bearer session token';
        return { ok: false, refusal: { code: 401, message: `the proxy did not accept the session token: ${why}`, summary: { category: 'rejected' } } };
      }
    }
    const task = this.#o.tasks.active(claims.task);
    if (!task || task.agent !== claims.agent) {
      return {
        ok: false,
        refusal: {
          code: 401,
          message: `task ${claims.task} is not active: it has ended, expired or been revoked (start a task, and kubectl asks the exec plugin again)`,
          summary: { category: 'rejected', actor: `agent:${claims.agent}`, agent: claims.agent },
        },
      };
    }
    const byAgent = this.#agentBudget?.spend(task.agent);
    if (byAgent?.over) {
      return {
        ok: false,
        refusal: { code: 429, message: `agent "${task.agent}" is over the proxy's request budget: slow down`, summary: { category: 'rate_limited', actor: `agent:${task.agent}`, agent: task.agent }, retryAfter: byAgent.retryAfter },
      };
    }
    const url = req.url ?? '';
    const problem = targetProblem(url);
    const info = requestInfo(req.method ?? 'GET', problem ? '/' : url);
    const s: SessionTask = { id: task.id, agent: task.agent, name: task.name, template: task.template, sid: claims.sid };
    const proxied: ProxiedRequest = {
      method: req.method ?? 'GET',
      url,
      info,
      userAgent: headerValue(req.headers['user-agent']),
      // The address itself for the record (as the webhook's sourceIPs has it), IPv4-mapped as IPv4.
      source: normalise(req.socket.remoteAddress ?? 'unknown'),
      kubectlCommand: headerValue(req.headers['kubectl-command']),
      kubectlSession: headerValue(req.headers['kubectl-session']),
    };
    const refuse = (code: number, message: string) => ({ ok: false as const, refusal: { code, message, record: { task: s, req: proxied } } });
    if (auths.length > 1) return refuse(400, 'more than one Authorization header: refused, nothing was forwarded');
    if (impersonation) return refuse(403, `${impersonation} headers are refused: through the proxy a request acts only as its task`);
    if (req.method === 'CONNECT') return refuse(405, 'CONNECT is refused: the proxy forwards Kubernetes API requests only');
    if (problem) return refuse(400, `refused: ${problem}; the proxy forwards plain API paths only`);
    if (!this.#o.audit.healthy) return { ok: false, refusal: { code: 503, message: 'the broker cannot record requests now (its audit log cannot be written): nothing is forwarded' } };
    let token: string | undefined;
    try {
      token = await this.#o.tasks.upstreamToken(task.id);
    } catch (err) {
      this.#log(`proxy: no upstream token for task ${task.id}: ${(err as Error).message}`);
      return refuse(503, 'the broker could not get this task\'s credential from the API server: try again');
    }
    if (!token) return { ok: false, refusal: { code: 401, message: `task ${task.id} is not active: it has ended`, summary: { category: 'rejected', actor: `agent:${task.agent}`, agent: task.agent } } };
    return { ok: true, admitted: { task: s, req: proxied, token, started } };
  }

  /**
   * Records a refusal (durably when it is a k8s.request record; else counted in the summary under the
   * caller's address as the API listener counts it, IPv6 by its /64); false when it could not be recorded.
   */
  async #recordRefusal(r: Refusal, address: string | undefined): Promise<boolean> {
    if (r.record) {
      if (!(await this.#append(proxyRecord(r.record.task, r.record.req, { code: r.code, outcome: r.code >= 500 ? 'error' : 'denied', reason: r.message, refused: true })))) return false;
    } else if (r.summary) {
      this.#o.metrics?.proxyRequests.observe({ outcome: r.code === 429 ? 'refused' : 'unauthenticated' }, 0);
      this.#failures.note({ source: sourceOf(address), category: r.summary.category, actor: r.summary.actor, agent: r.summary.agent }, `proxy: ${r.message}`);
    }
    return true;
  }

  async #refuse(req: IncomingMessage, res: ServerResponse, r: Refusal): Promise<void> {
    const recorded = await this.#recordRefusal(r, req.socket.remoteAddress);
    const [code, message] = recorded ? [r.code, r.message] : [503, 'the broker cannot record requests now (its audit log cannot be written): nothing is forwarded'];
    if (code === 429 && r.retryAfter !== undefined) res.setHeader('retry-after', String(Math.max(1, Math.ceil(r.retryAfter))));
    sendStatus(res, code, message);
    req.resume();
  }

  // --- plain requests ---

  async #onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const a = await this.#admit(req);
    if (!a.ok) return this.#refuse(req, res, a.refusal);
    const { admitted } = a;
    const streaming = isStreaming(admitted.req.info, admitted.req.url);
    const hasBody = req.headers['content-length'] !== undefined ? req.headers['content-length'] !== '0' : req.headers['transfer-encoding'] !== undefined;
    const relay = new Relay(this.#relayContext, res, admitted, streaming);
    // undici's dispatch with a handler of our own: no body stream, promise or AbortController per answer.
    this.#pool.dispatch(
      {
        path: admitted.req.url,
        method: req.method as Dispatcher.HttpMethod,
        headers: forwardHeaders(req.rawHeaders, admitted.token),
        body: hasBody ? counted(req, relay.counter) : null,
        headersTimeout: this.#upstreamTimeoutMs,
        bodyTimeout: streaming ? 0 : this.#upstreamTimeoutMs,
      },
      relay,
    );
  }

  /** Registers a stream of task `task` to be cut once the task is no longer active; returns the unregistering. */
  #onTaskEnd(task: string, cut: () => void): () => void {
    const stream = { task, cut };
    this.#streams.add(stream);
    return () => this.#streams.delete(stream);
  }

  /** Appends; false when the log refused (then nothing may be relayed). */
  async #append(event: AuditEventInput): Promise<boolean> {
    this.#observe(event);
    try {
      await this.#o.audit.append(event);
      return true;
    } catch {
      return false;
    }
  }

  /** The metrics of one record: a request at its end (or its only record), a stream opened or closed. */
  #observe(event: AuditEventInput): void {
    const m = this.#o.metrics;
    if (!m) return;
    const d = event.details ?? {};
    if (d['phase'] === 'start') return m.proxyOpenStreams.inc();
    if (d['phase'] === 'end') m.proxyOpenStreams.dec();
    const outcome = d['refused'] === true ? 'refused' : (event.outcome ?? 'error');
    m.proxyRequests.observe({ outcome }, typeof d['durationMs'] === 'number' ? d['durationMs'] / 1000 : 0);
  }

  #internal(res: ServerResponse, err: unknown): void {
    this.#log(`proxy: request failed: ${(err as Error).message}`);
    if (!res.headersSent) sendStatus(res, 500, 'the proxy failed to relay this request');
    else res.destroy();
  }

  // --- upgrades (exec, attach, cp, port-forward) and CONNECT ---

  async #onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const a = await this.#admit(req);
    if (!a.ok) {
      const recorded = await this.#recordRefusal(a.refusal, req.socket.remoteAddress);
      writeRaw(socket, recorded ? a.refusal.code : 503, statusBody(recorded ? a.refusal.code : 503, statusReason(a.refusal.code), a.refusal.message));
      return;
    }
    const { admitted } = a;
    const protocol = (headerValue(req.headers['upgrade']) ?? '').toLowerCase();
    if (protocol !== 'websocket') {
      const message =
        `the proxy records exec, attach and port-forward sessions over WebSocket only, and refuses the ${protocol || 'unnamed'} upgrade (SPDY) it cannot record: ` +
        'use kubectl 1.30 or newer, and do not set KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false or KUBECTL_PORT_FORWARD_WEBSOCKETS=false';
      const recorded = await this.#recordRefusal({ code: 400, message, record: { task: admitted.task, req: admitted.req } }, req.socket.remoteAddress);
      writeRaw(socket, recorded ? 400 : 503, statusBody(400, 'BadRequest', message));
      return;
    }
    await relayWebSocket({
      req,
      socket,
      head,
      upstream: { url: this.#upstreamUrl, ca: this.#o.upstream.ca, token: admitted.token, timeoutMs: this.#upstreamTimeoutMs },
      headers: forwardedPlain(req.rawHeaders),
      task: admitted.task,
      request: admitted.req,
      started: admitted.started,
      append: (e) => this.#append(e),
      recordings: this.#o.recordings,
      maxRecordingBytes: this.#o.maxRecordingBytes ?? 64 * 1024 * 1024,
      isActive: () => this.#o.tasks.active(admitted.task.id) !== undefined,
      onTaskEnd: (cut) => this.#onTaskEnd(admitted.task.id, cut),
      log: (l) => this.#log(l),
    });
  }

  async #onConnect(req: IncomingMessage, socket: Duplex): Promise<void> {
    const a = await this.#admit(req);
    const refusal = a.ok ? { code: 405, message: 'CONNECT is refused: the proxy forwards Kubernetes API requests only', record: { task: a.admitted.task, req: a.admitted.req } } : a.refusal;
    const recorded = await this.#recordRefusal(refusal, req.socket.remoteAddress);
    writeRaw(socket, recorded ? refusal.code : 503, statusBody(refusal.code, statusReason(refusal.code), refusal.message));
  }
}

/** What a Relay needs of the proxy. */
interface RelayContext {
  append(event: AuditEventInput): Promise<boolean>;
  /** A failure of the proxy's own (a bug): logged, the client answered 500 or cut off. */
  internal(res: ServerResponse, err: unknown): void;
  onTaskEnd(task: string, cut: () => void): () => void;
  bufferBytes: number;
  timeoutMs: number;
}

/**
 * One proxied answer, as undici hands it over (a dispatch handler): held until it ends or passes the
 * bound, so a complete answer is recorded once, with its size, before it is relayed; a stream, or an
 * answer over the bound, is recorded at its start (the API server paused meanwhile), relayed as it
 * comes with the client's backpressure, and recorded again at its end.
 */
class Relay implements Dispatcher.DispatchHandler {
  readonly counter = { bytesIn: 0 };
  readonly #ctx: RelayContext;
  readonly #res: ServerResponse;
  readonly #a: Admitted;
  readonly #streaming: boolean;
  #controller: Dispatcher.DispatchController | undefined;
  /** waiting: no answer yet; holding: a complete answer being held; opening: its start being recorded; relaying; done. */
  #state: 'waiting' | 'holding' | 'opening' | 'relaying' | 'done' = 'waiting';
  #code = 0;
  #auditID: string | undefined;
  #headers: Record<string, string | string[]> = {};
  #held: Buffer[] = [];
  #heldBytes = 0;
  #bytesOut = 0;
  /** The upstream ended (true) or failed (an error) while the start was being recorded. */
  #endWhileOpening: true | Error | undefined;
  #clientGone = false;
  #taskEnded = false;
  #unwatch: (() => void) | undefined;

  constructor(ctx: RelayContext, res: ServerResponse, admitted: Admitted, streaming: boolean) {
    this.#ctx = ctx;
    this.#res = res;
    this.#a = admitted;
    this.#streaming = streaming;
    res.on('close', () => {
      if (res.writableFinished) return;
      this.#clientGone = true;
      this.#controller?.abort(new Error('the client closed the connection'));
    });
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller;
    if (this.#clientGone) controller.abort(new Error('the client closed the connection'));
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: Record<string, string | string[] | undefined>): void {
    this.#code = statusCode;
    this.#auditID = headerValue(headers['audit-id']);
    this.#headers = relayHeaders(headers);
    if (this.#streaming) this.#open(controller);
    else this.#state = 'holding';
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (this.#state === 'relaying') {
      this.#bytesOut += chunk.length;
      if (!this.#res.write(chunk)) {
        controller.pause();
        this.#res.once('drain', () => controller.resume());
      }
      return;
    }
    this.#held.push(chunk);
    this.#heldBytes += chunk.length;
    if (this.#state === 'holding' && this.#heldBytes > this.#ctx.bufferBytes) this.#open(controller);
  }

  onResponseEnd(): void {
    if (this.#state === 'holding') this.#whole().catch((err: unknown) => this.#internal(err));
    else if (this.#state === 'opening') this.#endWhileOpening = true;
    else if (this.#state === 'relaying') this.#finish(undefined);
  }

  onResponseError(_controller: Dispatcher.DispatchController, err: Error): void {
    const state = this.#state;
    if (state === 'opening') this.#endWhileOpening = err;
    else if (state === 'relaying') this.#finish(err);
    else if (state !== 'done') this.#failed(state, err).catch((e: unknown) => this.#internal(e));
  }

  /** What a bug of ours leaves: nothing more relayed, the upstream answer dropped, the client told (500) or cut off. */
  #internal(err: unknown): void {
    this.#state = 'done';
    this.#unwatch?.();
    this.#controller?.abort(err instanceof Error ? err : new Error(String(err)));
    this.#ctx.internal(this.#res, err);
  }

  #durationMs(): number {
    return performance.now() - this.#a.started;
  }

  /** No answer (or no whole one) to relay: recorded, and the client answered with the failure. */
  async #failed(state: 'waiting' | 'holding', err: Error): Promise<void> {
    this.#state = 'done';
    const { task, req } = this.#a;
    const res = this.#res;
    if (this.#clientGone) {
      const reason = state === 'waiting' ? 'the client closed the connection before the API server answered' : 'the client closed the connection before the answer was relayed';
      await this.#ctx.append(proxyRecord(task, req, { code: undefined, auditID: this.#auditID, outcome: 'error', reason, bytesIn: this.counter.bytesIn, durationMs: this.#durationMs() }));
      return;
    }
    let code: number;
    let reason: string;
    if (state === 'waiting') {
      ({ code, reason } = upstreamFailure(err instanceof undiciErrors.HeadersTimeoutError, err as NodeJS.ErrnoException, this.#ctx.timeoutMs));
    } else {
      code = 502;
      reason = `the API server's answer broke off (${err.message})`;
    }
    const recorded = await this.#ctx.append(proxyRecord(task, req, { code, auditID: this.#auditID, outcome: 'error', reason, bytesIn: this.counter.bytesIn, durationMs: this.#durationMs() }));
    if (!this.#clientGone) sendStatus(res, recorded ? code : 503, recorded ? reason : 'the broker cannot record requests now: nothing is relayed');
  }

  /** A complete answer: recorded once, then relayed. */
  async #whole(): Promise<void> {
    this.#state = 'done';
    const { task, req } = this.#a;
    const held = this.#held;
    const whole = held.length === 1 ? held[0]! : Buffer.concat(held);
    this.#held = [];
    const code = this.#code;
    const outcome = outcomeOfStatus(code);
    const reason = outcome === 'allowed' ? undefined : statusMessage(whole);
    const recorded = await this.#ctx.append(
      proxyRecord(task, req, { code, auditID: this.#auditID, outcome, reason, bytesIn: this.counter.bytesIn, bytesOut: whole.length, durationMs: this.#durationMs() }),
    );
    if (this.#clientGone) return;
    if (!recorded) return sendStatus(this.#res, 503, 'the broker cannot record requests now (its audit log cannot be written): the answer is not relayed');
    this.#res.writeHead(code, this.#headers);
    this.#res.end(whole);
  }

  /** A stream, or an answer over the bound: the API server paused while its start is recorded, then relayed. */
  #open(controller: Dispatcher.DispatchController): void {
    this.#state = 'opening';
    controller.pause();
    const { task, req } = this.#a;
    void this.#ctx.append(proxyRecord(task, req, { code: this.#code, auditID: this.#auditID, outcome: outcomeOfStatus(this.#code), bytesIn: this.counter.bytesIn, phase: 'start' })).then((recorded) => this.#opened(controller, recorded)).catch((err: unknown) => this.#internal(err));
  }

  /** The start of a stream recorded (or not): the answer's head and what was held relayed, the API server resumed. */
  #opened(controller: Dispatcher.DispatchController, recorded: boolean): void {
    const { task } = this.#a;
    const res = this.#res;
    if (!recorded) {
      this.#state = 'done';
      controller.abort(new Error('the audit log cannot be written'));
      if (!this.#clientGone) sendStatus(res, 503, 'the broker cannot record requests now (its audit log cannot be written): the answer is not relayed');
      return;
    }
    if (this.#clientGone) {
      this.#state = 'relaying';
      return this.#finish(new Error('the client closed the connection'));
    }
    res.writeHead(this.#code, this.#headers);
    if (this.#streaming) res.flushHeaders();
    this.#state = 'relaying';
    this.#unwatch = this.#ctx.onTaskEnd(task.id, () => {
      this.#taskEnded = true;
      controller.abort(new Error(`task ${task.id} has ended`));
    });
    for (const chunk of this.#held) {
      this.#bytesOut += chunk.length;
      res.write(chunk);
    }
    this.#held = [];
    const ended = this.#endWhileOpening;
    if (ended === true) this.#finish(undefined);
    else if (ended) this.#finish(ended);
    else if (res.writableNeedDrain) res.once('drain', () => controller.resume());
    else controller.resume();
  }

  /** The end of a relayed stream (err: how it broke off): the client's answer ended, the end recorded. */
  #finish(err: Error | undefined): void {
    if (this.#state === 'done') return;
    this.#state = 'done';
    this.#unwatch?.();
    const { task, req } = this.#a;
    const res = this.#res;
    let failure: string | undefined;
    if (err === undefined) res.end();
    else {
      failure = this.#taskEnded ? `task ${task.id} has ended` : this.#clientGone || res.destroyed ? 'the client closed the connection' : `broke off: ${err.message}`;
      if (this.#taskEnded) res.end();
      else res.destroy();
    }
    const code = this.#code;
    const outcome = failure && !failure.startsWith('the client') && !this.#taskEnded ? 'error' : outcomeOfStatus(code);
    void this.#ctx.append(
      proxyRecord(task, req, { code, auditID: this.#auditID, outcome, reason: failure, bytesIn: this.counter.bytesIn, bytesOut: this.#bytesOut, durationMs: this.#durationMs(), phase: 'end' }),
    );
  }
}

/** The client's headers to forward: all but the hop-by-hop ones and its credential, plus the task's token. */
function forwardHeaders(raw: string[], token: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    if (!DROPPED_REQUEST_HEADERS.has(raw[i]!.toLowerCase())) out.push(raw[i]!, raw[i + 1]!);
  }
  out.push('authorization', `Bearer ${token}`);
  return out;
}

/** The client's headers a WebSocket upgrade forwards (ws makes its own handshake headers). */
function forwardedPlain(raw: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toLowerCase();
    if (DROPPED_REQUEST_HEADERS.has(name) || name.startsWith('sec-websocket-') || name === 'content-length') continue;
    out[name] = out[name] === undefined ? raw[i + 1]! : `${out[name]}, ${raw[i + 1]!}`;
  }
  return out;
}

function relayHeaders(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && !DROPPED_RESPONSE_HEADERS.has(name)) out[name] = value;
  }
  return out;
}

/** The request body as it streams upstream, counted. */
function counted(req: IncomingMessage, counter: { bytesIn: number }): Transform {
  const counting = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      counter.bytesIn += chunk.length;
      done(null, chunk);
    },
  });
  pipeline(req, counting, () => undefined);
  return counting;
}

function sendStatus(res: ServerResponse, code: number, message: string): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = statusBody(code, statusReason(code), message);
  res.writeHead(code, { 'content-type': 'application/json', 'cache-control': 'no-store', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}


/** IPv4-mapped IPv6 addresses as IPv4. */
function normalise(address: string): string {
  return address.startsWith('::ffff:') ? address.slice(7) : address;
}
