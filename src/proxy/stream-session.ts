/**
 * WebSocket sessions through the proxy: exec, attach (and so cp), port-forward, and any other
 * WebSocket request the API server takes. The proxy opens the upstream WebSocket first, with the
 * protocols kubectl offered and the task's token; only once the API server has accepted it (and the
 * start is on the log) does it complete kubectl's handshake, with the protocol the API server chose.
 * A refusal upstream (403 from RBAC) is relayed as the API server gave it, and recorded.
 *
 * Exec and attach: every message of Kubernetes' channel protocol (`v5.channel.k8s.io` and its
 * predecessors: one channel byte, then data; the `base64.` variants as text) is written to the
 * session's recording, what the agent sent (stdin, resize) and what came back (stdout, stderr, the
 * error channel), before it is passed on. The recording is a JSON Lines file of its own, 0600 in a 0700
 * directory; at the end it is synced and its SHA-256 and size go into the session's end record, on the
 * hash chain, so `broker audit verify` covers it and `broker audit show` can replay it. A session whose
 * recording cannot be written, or would pass its bound, is closed. Port-forward: bytes each way only.
 *
 * The session ends when either side closes, or at once when its task ends.
 */
import { createHash, randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { request as httpRequest, STATUS_CODES, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import type { AuditEventInput, JsonValue } from '../audit/types.ts';
import { cut, MAX } from '../audit/kube-events.ts';
import { headerValue, outcomeOfStatus, proxyRecord, statusBody, statusMessage, statusReason, upstreamFailure, type ProxiedRequest, type SessionTask } from './record.ts';

export interface RelayOptions {
  req: IncomingMessage;
  socket: Duplex;
  head: Buffer;
  upstream: { url: URL; ca?: string | Buffer | undefined; token: string; timeoutMs: number };
  /** The client's headers to pass on (kubectl's command headers, user agent, ...). */
  headers: Record<string, string>;
  task: SessionTask;
  request: ProxiedRequest;
  started: number;
  /** Appends a record durably; false when it could not be written. */
  append: (event: AuditEventInput) => Promise<boolean>;
  recordings: string;
  maxRecordingBytes: number;
  isActive: () => boolean;
  /** Calls `cut` once the task has ended (the proxy checks its open streams every 250 ms); returns the unregistering. */
  onTaskEnd: (cut: () => void) => () => void;
  log: (line: string) => void;
}

/** Channel names of Kubernetes' remote command protocol. */
const CHANNELS: Record<number, string> = { 0: 'stdin', 1: 'stdout', 2: 'stderr', 3: 'error', 4: 'resize', 255: 'close' };
const HIGH_WATER = 8 * 1024 * 1024;
const LOW_WATER = 1024 * 1024;

type Kind = 'exec' | 'attach' | 'portforward' | 'other';

export async function relayWebSocket(o: RelayOptions): Promise<void> {
  const info = o.request.info;
  const kind: Kind = info.resource === 'pods' && (info.subresource === 'exec' || info.subresource === 'attach' || info.subresource === 'portforward') ? info.subresource : 'other';
  // Only exec and attach are read message by message (their recording); the rest is a tunnel whose
  // bytes are counted. (Port-forward's `SPDY/3.1+portforward.k8s.io` is not even a valid WebSocket
  // subprotocol token, which ws rightly refuses: a tunnel does not need to understand it.)
  if (kind !== 'exec' && kind !== 'attach') return tunnel(o, kind);
  const offered = (headerValue(o.req.headers['sec-websocket-protocol']) ?? '')
    .split(',')
    .map((p) => p.trim())
    .filter((p) => p !== '');
  const target = new URL(o.request.url, o.upstream.url);
  target.protocol = o.upstream.url.protocol === 'https:' ? 'wss:' : 'ws:';
  const up = new WebSocket(target, offered, {
    headers: { ...o.headers, authorization: `Bearer ${o.upstream.token}` },
    ...(o.upstream.ca ? { ca: o.upstream.ca } : {}),
    perMessageDeflate: false,
    handshakeTimeout: o.upstream.timeoutMs,
    maxPayload: 16 * 1024 * 1024,
    followRedirects: false,
  });
  up.on('error', () => undefined);
  let auditID: string | undefined;
  up.once('upgrade', (res: IncomingMessage) => (auditID = headerValue(res.headers['audit-id'])));
  const opened = await new Promise<{ ok: true } | { ok: false; code: number; body: string; reason: string; auditID?: string | undefined }>((resolve) => {
    up.once('open', () => {
      // Nothing the API server sends is read until the relay is in place (and the start recorded).
      up.pause();
      resolve({ ok: true });
    });
    up.once('unexpected-response', (_r, res: IncomingMessage) => {
      void refusalOf(res).then((r) => resolve({ ok: false, ...r }));
    });
    up.once('error', (err: NodeJS.ErrnoException) => {
      const { code, reason } = upstreamFailure(/handshake has timed out/i.test(err.message), err, o.upstream.timeoutMs);
      resolve({ ok: false, code, body: statusBody(code, statusReason(code), reason), reason });
    });
  });
  if (!opened.ok) {
    up.terminate();
    const recorded = await o.append(
      proxyRecord(o.task, o.request, { code: opened.code, auditID: opened.auditID, outcome: outcomeOfStatus(opened.code), reason: opened.reason, durationMs: performance.now() - o.started }),
    );
    if (recorded) writeRaw(o.socket, opened.code, opened.body);
    else writeRaw(o.socket, 503, statusBody(503, 'ServiceUnavailable', 'the broker cannot record requests now: the answer is not relayed'));
    return;
  }
  if (!o.isActive()) {
    up.terminate();
    writeRaw(o.socket, 401, statusBody(401, 'Unauthorized', `task ${o.task.id} is not active: it has ended`));
    return;
  }
  const protocol = up.protocol;
  const id = randomUUID();
  const facts = sessionFacts(kind, o.request, protocol, id);
  let recording: Recording | undefined;
  if (kind === 'exec' || kind === 'attach') {
    try {
      recording = await Recording.create(o.recordings, id, o.maxRecordingBytes, { v: 1, session: id, task: o.task.id, agent: o.task.agent, ...facts, started: new Date().toISOString() });
    } catch (err) {
      up.terminate();
      o.log(`proxy: cannot write the recording of session ${id}: ${(err as Error).message}`);
      const message = 'the broker cannot record this session (its recording cannot be written): it is not relayed';
      await o.append(proxyRecord(o.task, o.request, { code: 503, auditID, outcome: 'error', reason: message, extra: { stream: facts } }));
      writeRaw(o.socket, 503, statusBody(503, 'ServiceUnavailable', message));
      return;
    }
  }
  const startRecorded = await o.append(proxyRecord(o.task, o.request, { code: 101, auditID, outcome: 'allowed', phase: 'start', extra: { stream: facts } }));
  if (!startRecorded) {
    up.terminate();
    await recording?.discard();
    writeRaw(o.socket, 503, statusBody(503, 'ServiceUnavailable', 'the broker cannot record requests now: the session is not opened'));
    return;
  }
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 16 * 1024 * 1024, handleProtocols: () => protocol || false });
  const client = await new Promise<WebSocket>((resolve) =>
    wss.handleUpgrade(o.req, o.socket, o.head, (ws) => {
      ws.pause();
      resolve(ws);
    }),
  );
  client.on('error', () => undefined);

  const counts = { in: 0, out: 0, stdin: 0, stdout: 0, stderr: 0 };
  let endReason: string | undefined;
  let finished: Promise<void> | undefined;
  const closeBoth = (code: number, reason: string) => {
    endReason ??= reason;
    for (const ws of [client, up]) if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(code, reason.slice(0, 120));
    setTimeout(() => {
      client.terminate();
      up.terminate();
    }, 2_000).unref();
  };
  const relay = (from: WebSocket, to: WebSocket, direction: 'in' | 'out') => {
    from.on('message', (data: RawData, isBinary: boolean) => {
      const buf = toBuffer(data);
      counts[direction] += buf.length;
      if (recording) {
        const frame = decodeFrame(protocol, buf, isBinary);
        if (frame.channel === 0) counts.stdin += frame.data.length;
        else if (frame.channel === 1) counts.stdout += frame.data.length;
        else if (frame.channel === 2) counts.stderr += frame.data.length;
        if (!recording.add(direction, frame)) {
          closeBoth(1011, recording.failure ?? 'the recording could not be written');
          return;
        }
      }
      if (to.readyState !== WebSocket.OPEN) return;
      to.send(buf, { binary: isBinary }, () => {
        if (from.isPaused && to.bufferedAmount < LOW_WATER) from.resume();
      });
      if (to.bufferedAmount > HIGH_WATER) from.pause();
    });
    from.on('close', (code: number, reason: Buffer) => {
      if (to.readyState === WebSocket.OPEN) {
        if (sendableCode(code)) to.close(code, reason);
        else to.close();
      }
      setTimeout(() => to.terminate(), 2_000).unref();
      finished ??= finish();
    });
  };
  const unwatch = o.onTaskEnd(() => closeBoth(1008, `task ${o.task.id} has ended`));
  const finish = async () => {
    // Both sides closed (or given up on), then the end record with what crossed.
    await Promise.all([client, up].map((ws) => (ws.readyState === WebSocket.CLOSED ? undefined : new Promise((r) => ws.once('close', r)))));
    unwatch();
    const sealed = recording ? await recording.seal() : undefined;
    const extra: Record<string, JsonValue> = {
      stream: facts,
      ...(kind === 'exec' || kind === 'attach' ? { stdinBytes: counts.stdin, stdoutBytes: counts.stdout, stderrBytes: counts.stderr } : {}),
      ...(sealed ? { recording: sealed } : {}),
    };
    const ok = await o.append(
      proxyRecord(o.task, o.request, {
        code: 101,
        auditID,
        outcome: endReason && !endReason.startsWith('task ') ? 'error' : 'allowed',
        reason: endReason,
        bytesIn: counts.in,
        bytesOut: counts.out,
        durationMs: performance.now() - o.started,
        phase: 'end',
        extra,
      }),
    );
    if (!ok) o.log(`proxy: the end of session ${id} (task ${o.task.id}) could not be recorded`);
  };
  relay(client, up, 'in');
  relay(up, client, 'out');
  client.resume();
  up.resume();
  if (!o.isActive()) closeBoth(1008, `task ${o.task.id} has ended`);
}

/**
 * A WebSocket upgrade passed through whole (port-forward and anything else that is not exec or
 * attach): node:http(s) makes the upstream request with kubectl's own handshake headers and the
 * task's token, so the handshake is kubectl's with the API server; after the 101 the two sockets are
 * joined and their bytes counted. A refusal upstream is relayed as given, and recorded.
 */
async function tunnel(o: RelayOptions, kind: Kind): Promise<void> {
  const up = o.upstream.url;
  const headers: Record<string, string | string[]> = {};
  for (let i = 0; i < o.req.rawHeaders.length; i += 2) {
    const name = o.req.rawHeaders[i]!.toLowerCase();
    if (name === 'authorization' || name === 'host' || name === 'proxy-authorization' || name === 'content-length') continue;
    const prev = headers[name];
    headers[name] = prev === undefined ? o.req.rawHeaders[i + 1]! : [...(Array.isArray(prev) ? prev : [prev]), o.req.rawHeaders[i + 1]!];
  }
  headers['authorization'] = `Bearer ${o.upstream.token}`;
  const request = (up.protocol === 'https:' ? httpsRequest : httpRequest)({
    host: up.hostname.replace(/^\[(.*)\]$/, '$1'),
    port: up.port || (up.protocol === 'https:' ? 443 : 80),
    path: o.request.url,
    method: 'GET',
    headers,
    agent: false,
    ...(o.upstream.ca ? { ca: o.upstream.ca } : {}),
  });
  const facts = sessionFacts(kind, o.request, headerValue(o.req.headers['sec-websocket-protocol']) ?? '', randomUUID());
  const refuse = async (code: number, reason: string, body: string, auditID?: string) => {
    const recorded = await o.append(proxyRecord(o.task, o.request, { code, auditID, outcome: outcomeOfStatus(code), reason, durationMs: performance.now() - o.started, extra: { stream: facts } }));
    writeRaw(o.socket, recorded ? code : 503, recorded ? body : statusBody(503, 'ServiceUnavailable', 'the broker cannot record requests now: the answer is not relayed'));
  };
  const timer = setTimeout(() => request.destroy(new Error('timeout')), o.upstream.timeoutMs);
  request.on('response', (res: IncomingMessage) => {
    clearTimeout(timer);
    void refusalOf(res).then((r) => refuse(r.code, r.reason, r.body, r.auditID));
  });
  request.on('error', (err: NodeJS.ErrnoException) => {
    clearTimeout(timer);
    const { code, reason } = upstreamFailure(err.message === 'timeout', err, o.upstream.timeoutMs);
    void refuse(code, reason, statusBody(code, statusReason(code), reason));
  });
  request.on('upgrade', (res: IncomingMessage, upSocket: Duplex, upHead: Buffer) => {
    clearTimeout(timer);
    void (async () => {
      const auditID = headerValue(res.headers['audit-id']);
      if (!o.isActive() || !(await o.append(proxyRecord(o.task, o.request, { code: 101, auditID, outcome: 'allowed', phase: 'start', extra: { stream: facts } })))) {
        upSocket.destroy();
        const active = o.isActive();
        writeRaw(o.socket, active ? 503 : 401, statusBody(active ? 503 : 401, active ? 'ServiceUnavailable' : 'Unauthorized', active ? 'the broker cannot record requests now: the session is not opened' : `task ${o.task.id} is not active: it has ended`));
        return;
      }
      // The API server's 101, as it gave it, then the two byte streams joined.
      const lines = [`HTTP/1.1 101 ${res.statusMessage || 'Switching Protocols'}`];
      for (let i = 0; i < res.rawHeaders.length; i += 2) lines.push(`${res.rawHeaders[i]}: ${res.rawHeaders[i + 1]}`);
      o.socket.write(`${lines.join('\r\n')}\r\n\r\n`);
      const counts = { in: 0, out: 0 };
      let endReason: string | undefined;
      upSocket.on('data', (d: Buffer) => (counts.out += d.length));
      o.socket.on('data', (d: Buffer) => (counts.in += d.length));
      if (upHead.length > 0) {
        counts.out += upHead.length;
        o.socket.write(upHead);
      }
      if (o.head.length > 0) {
        counts.in += o.head.length;
        upSocket.write(o.head);
      }
      upSocket.on('error', () => undefined);
      o.socket.pipe(upSocket);
      upSocket.pipe(o.socket);
      const unwatch = o.onTaskEnd(() => {
        endReason = `task ${o.task.id} has ended`;
        upSocket.destroy();
        o.socket.destroy();
      });
      const closed = (x: Duplex) => (x.destroyed ? Promise.resolve() : new Promise<void>((r) => x.once('close', () => r())));
      // One side gone: the other is ended (what it still holds is flushed), then destroyed.
      const follow = (a: Duplex, b: Duplex) =>
        a.once('close', () => {
          b.end();
          setTimeout(() => b.destroy(), 2_000).unref();
        });
      follow(o.socket, upSocket);
      follow(upSocket, o.socket);
      await Promise.all([closed(o.socket), closed(upSocket)]);
      unwatch();
      await o.append(
        proxyRecord(o.task, o.request, { code: 101, auditID, outcome: 'allowed', reason: endReason, bytesIn: counts.in, bytesOut: counts.out, durationMs: performance.now() - o.started, phase: 'end', extra: { stream: facts } }),
      );
    })();
  });
  // Either side closing ends the other.
  o.socket.once('close', () => request.destroy());
  request.end();
}

/** The API server's answer to an upgrade it did not accept (a 403 from RBAC, ...): its first 64 KiB, its reason and Audit-Id. */
function refusalOf(res: IncomingMessage): Promise<{ code: number; body: string; reason: string; auditID?: string | undefined }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    res.on('data', (c: Buffer) => {
      if (size < 64 * 1024) chunks.push(c);
      size += c.length;
    });
    res.on('end', () => {
      const body = Buffer.concat(chunks);
      const code = res.statusCode ?? 502;
      resolve({ code, body: body.toString('utf8'), reason: statusMessage(body) ?? `the API server answered ${code}`, auditID: headerValue(res.headers['audit-id']) });
    });
    res.on('error', () => resolve({ code: 502, body: statusBody(502, 'BadGateway', "the API server's answer broke off"), reason: "the API server's answer broke off" }));
  });
}

/** What a session is: kind, pod, container, command, protocol (each value cut to its bound). */
function sessionFacts(kind: Kind, req: ProxiedRequest, protocol: string, id: string): Record<string, JsonValue> {
  const q = req.url.indexOf('?');
  const query = new URLSearchParams(q < 0 ? '' : req.url.slice(q + 1));
  const facts: Record<string, JsonValue> = { id, kind, protocol: cut(protocol, MAX.short), pod: cut(req.info.name, MAX.name) };
  const container = query.get('container');
  if (container) facts['container'] = cut(container, MAX.name);
  if (kind === 'exec') facts['command'] = query.getAll('command').slice(0, 32).map((c) => cut(c, 256));
  if (kind === 'exec' || kind === 'attach') {
    facts['stdin'] = ['true', '1'].includes(query.get('stdin') ?? '');
    facts['tty'] = ['true', '1'].includes(query.get('tty') ?? '');
  }
  if (kind === 'portforward') facts['ports'] = query.getAll('ports').slice(0, 16).map((p) => cut(p, 16));
  return facts;
}

interface Frame {
  channel: number | undefined;
  data: Buffer;
}

/** One message of the remote command protocol: its channel and data (base64 variants decoded). */
export function decodeFrame(protocol: string, buf: Buffer, isBinary: boolean): Frame {
  if (protocol.includes('base64.channel.k8s.io') && !isBinary) {
    const text = buf.toString('latin1');
    const channel = text.charCodeAt(0) - 48;
    return channel >= 0 && channel <= 9 ? { channel, data: Buffer.from(text.slice(1), 'base64') } : { channel: undefined, data: buf };
  }
  if (protocol.includes('channel.k8s.io') && buf.length > 0) return { channel: buf[0]!, data: buf.subarray(1) };
  return { channel: undefined, data: buf };
}

/**
 * A session's recording: JSON Lines, a header line then one line per message
 * (`{"t":ms,"d":"in"|"out","ch":"stdin"|...,"b64":data}`), hashed as written.
 */
export class Recording {
  readonly #fh: FileHandle;
  readonly #file: string;
  readonly #hash = createHash('sha256');
  readonly #max: number;
  readonly #t0 = performance.now();
  #bytes = 0;
  #tail: Promise<unknown> = Promise.resolve();
  failure: string | undefined;

  private constructor(fh: FileHandle, file: string, max: number) {
    this.#fh = fh;
    this.#file = file;
    this.#max = max;
  }

  static async create(dir: string, id: string, max: number, header: Record<string, JsonValue>): Promise<Recording> {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = `${id}.jsonl`;
    const fh = await open(join(dir, file), 'wx', 0o600);
    const r = new Recording(fh, file, max);
    r.#write(`${JSON.stringify(header)}\n`);
    return r;
  }

  /** Adds a message; false when the recording failed or is full (the session must close). */
  add(direction: 'in' | 'out', frame: Frame): boolean {
    if (this.failure) return false;
    const line = `${JSON.stringify({ t: Math.round(performance.now() - this.#t0), d: direction, ch: frame.channel === undefined ? null : (CHANNELS[frame.channel] ?? String(frame.channel)), b64: frame.data.toString('base64') })}\n`;
    if (this.#bytes + line.length > this.#max) {
      this.failure = `the session's recording reached its bound (${this.#max} bytes): the session is closed`;
      return false;
    }
    this.#write(line);
    return true;
  }

  #write(line: string): void {
    const buf = Buffer.from(line, 'utf8');
    this.#bytes += buf.length;
    this.#hash.update(buf);
    this.#tail = this.#tail.then(() => this.#fh.write(buf)).catch((err: Error) => (this.failure ??= `the recording could not be written: ${err.message}`));
  }

  /** Synced and closed: its name, size and SHA-256, for the end record. */
  async seal(): Promise<{ file: string; bytes: number; sha256: string; complete: boolean }> {
    await this.#tail;
    await this.#fh.datasync().catch((err: Error) => (this.failure ??= `the recording could not be synced: ${err.message}`));
    await this.#fh.close().catch(() => undefined);
    return { file: this.#file, bytes: this.#bytes, sha256: this.#hash.digest('hex'), complete: this.failure === undefined };
  }

  async discard(): Promise<void> {
    await this.#tail;
    await this.#fh.close().catch(() => undefined);
  }
}

function toBuffer(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  if (Array.isArray(data)) return Buffer.concat(data);
  return Buffer.from(data);
}

function sendableCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}


/** An HTTP answer on a socket that was to be upgraded (or CONNECTed): written whole, then closed. */
export function writeRaw(socket: Duplex, code: number, body: string): void {
  if (socket.destroyed) return;
  socket.end(
    `HTTP/1.1 ${code} ${STATUS_CODES[code] ?? 'Error'}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n${body}`,
  );
}
