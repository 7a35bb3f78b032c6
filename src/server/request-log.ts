/**
 * The broker's request log: one line per answered request on stderr, with the method, the route (its
 * pattern, `/v1/tasks/:ref/credential`, not the raw URL), the status, the duration, the caller
 * (subject and agent) and the task id when the request is about one. Never a token, a header, a query
 * string or a body: the line is built from those fields only, and fastify's own serializers are
 * replaced by ones that keep the same few fields.
 *
 * It is fastify's request-log hook (a LogController whose requestCompleted writes this line instead
 * of fastify's two default ones), in the JSON of fastify's own logger (pino), which writes every other
 * line: JSON lines by default, for log collectors; on a terminal a readable one-line form
 * (`--log-format text`), written by `formatLogLine` from the same JSON.
 *
 * Cheap on the request path (docs/benchmarks.md, "Speed margins"): the request line is built here,
 * not by pino; a request's pino child logger is made only if something logs through it; and request
 * lines to stderr leave in batches, one write(2) for what arrives within 10 ms, not one each.
 */
import { hostname } from 'node:os';
import { LogController, type FastifyReply, type FastifyRequest } from 'fastify';
import { actorOf } from '../identity/types.ts';
import type { TaskStore } from '../tasks/store.ts';

declare module 'fastify' {
  interface FastifyRequest {
    /** The task the request started, ended or was served for, noted by its handler for the request log. */
    taskId: string | undefined;
  }
}

export type LogFormat = 'json' | 'text';
export const LOG_FORMATS: readonly LogFormat[] = ['json', 'text'];
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** pino's level numbers, and the names the text form prints. */
const LEVEL_NAMES: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };

export interface LoggerConfig {
  format: LogFormat;
  level: LogLevel;
  /** Where lines go; default stderr. */
  write?: (line: string) => void;
}

/** What one request line holds (besides pino's level, time, pid, hostname and fastify's reqId). */
export interface RequestLogFields {
  method: string;
  route: string;
  status: number;
  /** Milliseconds, one decimal. */
  ms: number;
  /** The caller's identity (a ServiceAccount username), when authenticated. */
  subject?: string;
  /** `agent:NAME`, `person:NAME`, ... */
  actor?: string;
  agent?: string;
  /** The task's id, when the request names or creates one. */
  task?: string;
}

/** The default format: readable on a terminal, JSON otherwise. */
export function defaultLogFormat(stream: { isTTY?: boolean } = process.stderr): LogFormat {
  return stream.isTTY ? 'text' : 'json';
}

/**
 * fastify's `logger` and `logController` options: pino writing to `write` (stderr), as JSON or through
 * formatLogLine, with serializers that keep method and route of a request, status of a reply, type
 * and message of an error, whatever fastify itself logs; and the request log (RequestLog).
 */
export function fastifyLogging(
  config: LoggerConfig,
  store: Pick<TaskStore, 'get' | 'findByName'>,
): { logger: Record<string, unknown>; logController: RequestLog; childLoggerFactory: typeof lazyChildLogger } {
  const write = config.write ?? stderrLines.write;
  // The request lines to stderr are batched; every other line, and any other destination, at once.
  const queue = write === stderrLines.write ? stderrLines.queue : write;
  return {
    logger: {
      level: config.level,
      stream: { write: config.format === 'text' ? (line: string) => write(formatLogLine(line) + '\n') : write },
      serializers: {
        req: (req: { method?: string; routeOptions?: { url?: string } }) => ({ method: req.method, route: req.routeOptions?.url ?? 'unmatched' }),
        res: (reply: { statusCode?: number }) => ({ status: reply.statusCode }),
        err: (err: Error & { code?: string }) => ({ type: err.name, message: err.message, ...(err.code ? { code: err.code } : {}) }),
      },
    },
    childLoggerFactory: lazyChildLogger,
    logController: new RequestLog(store, { ...config, write: queue }),
  };
}

/**
 * Lines to stderr. `write` writes at once (what is queued first); `queue`, for the request lines,
 * writes in batches: what arrives within 10 ms (at most 16 KiB) goes out in one write(2), not one
 * each. Each write wakes whoever reads the pipe (journald, a container runtime) and, under load,
 * cost the broker more than building its line (docs/benchmarks.md, "Speed margins"). What is queued
 * is written when the process exits (stderr is synchronous for files and pipes on Linux), so only a
 * SIGKILL loses the request lines of its last 10 ms. One per process.
 */
export const stderrLines: { write(line: string): void; queue(line: string): void } = (() => {
  let pending = '';
  let timer: ReturnType<typeof setTimeout> | undefined;
  const flush = () => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    if (pending === '') return;
    const text = pending;
    pending = '';
    process.stderr.write(text);
  };
  let hooked = false;
  return {
    write(line: string): void {
      flush();
      process.stderr.write(line);
    },
    queue(line: string): void {
      pending += line;
      if (pending.length >= 16_384) return flush();
      if (timer) return;
      timer = setTimeout(flush, 10);
      timer.unref();
      if (!hooked) {
        hooked = true;
        process.once('exit', flush);
      }
    },
  };
})();

type PinoLike = Record<'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace', (...args: unknown[]) => void> & { child(bindings: object, options?: object): PinoLike };

/**
 * fastify's childLoggerFactory: a request's logger (`request.log`, bound to its reqId) that makes
 * pino's child only when something logs through it. The request line does not (RequestLog writes
 * it), so most requests never make one: pino's child() was 1.2 % of the broker's busy time.
 */
export function lazyChildLogger(this: unknown, parent: PinoLike, bindings: object, options: object): PinoLike {
  return new LazyChild(parent, bindings, options) as unknown as PinoLike;
}

class LazyChild {
  readonly #parent: PinoLike;
  readonly #bindings: object;
  readonly #options: object;
  #child: PinoLike | undefined;

  constructor(parent: PinoLike, bindings: object, options: object) {
    this.#parent = parent;
    this.#bindings = bindings;
    this.#options = options;
  }

  get #real(): PinoLike {
    return (this.#child ??= this.#parent.child(this.#bindings, this.#options));
  }

  fatal(...args: unknown[]): void {
    this.#real.fatal(...args);
  }
  error(...args: unknown[]): void {
    this.#real.error(...args);
  }
  warn(...args: unknown[]): void {
    this.#real.warn(...args);
  }
  info(...args: unknown[]): void {
    this.#real.info(...args);
  }
  debug(...args: unknown[]): void {
    this.#real.debug(...args);
  }
  trace(...args: unknown[]): void {
    this.#real.trace(...args);
  }
  child(bindings: object, options?: object): PinoLike {
    return this.#real.child(bindings, options);
  }
}

/**
 * One log line (pino's JSON) in the readable form: `09:30:12.345 INFO  POST /v1/tasks 201 12.3ms
 * agent:deployer task t-8f3a req 5c1e…`; other records as `time LEVEL message key=value ...`.
 * Control characters in values are escaped, so no value can rewrite the terminal. Pure.
 */
export function formatLogLine(line: string | Record<string, unknown>): string {
  let o: Record<string, unknown>;
  try {
    o = typeof line === 'string' ? (JSON.parse(line) as Record<string, unknown>) : line;
  } catch {
    return clean(String(line).trimEnd());
  }
  const time = typeof o['time'] === 'number' ? new Date(o['time']).toISOString().slice(11, 23) : '';
  const level = (LEVEL_NAMES[o['level'] as number] ?? String(o['level'] ?? '')).padEnd(5);
  const skip = new Set(['level', 'time', 'pid', 'hostname', 'msg', 'reqId']);
  const parts = [time, level];
  if (o['msg'] === 'request') {
    const f = o as unknown as RequestLogFields & { reqId?: string };
    for (const k of ['method', 'route', 'status', 'ms', 'subject', 'actor', 'agent', 'task']) skip.add(k);
    parts.push(`${clean(String(f.method))} ${clean(String(f.route))} ${f.status} ${f.ms}ms`);
    if (f.actor) parts.push(clean(f.actor));
    else if (f.subject) parts.push(clean(f.subject));
    if (f.task) parts.push(`task ${clean(f.task)}`);
    if (f.reqId) parts.push(`req ${clean(String(f.reqId)).slice(0, 8)}`);
  } else {
    parts.push(clean(String(o['msg'] ?? '')));
    if (o['reqId']) skip.delete('reqId');
  }
  for (const [k, v] of Object.entries(o)) {
    if (skip.has(k) || v === undefined) continue;
    parts.push(`${k}=${clean(typeof v === 'string' ? v : JSON.stringify(v))}`);
  }
  return parts.filter((p) => p !== '').join(' ');
}

/** Escapes C0/C1 control characters (and DEL), so a value cannot move the cursor or clear the screen. */
function clean(text: string): string {
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** The fields of one answered request. Reads the route pattern, never the URL, headers or body. */
export function requestFields(req: FastifyRequest, reply: FastifyReply, task: string | undefined): RequestLogFields {
  const caller = req.caller;
  return {
    method: req.method,
    route: req.routeOptions.url ?? 'unmatched',
    status: reply.statusCode,
    ms: Math.round(reply.elapsedTime * 10) / 10,
    ...(caller ? { subject: caller.subject, actor: actorOf(caller), ...(caller.agent ? { agent: caller.agent } : {}) } : {}),
    ...(task ? { task } : {}),
  };
}

const TASK_ROUTE = /^\/v1\/tasks\/:ref/;
/** pino's level numbers. */
const LEVEL_VALUES: Record<LogLevel, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };

/**
 * fastify's request logging, as this broker wants it: one line when a request completes (at `info`,
 * `error` for 5xx, `debug` for a 429 of the limits), none when it arrives, and no "route not found"
 * line with its URL. The line is pino's JSON (level, time, pid, hostname, reqId, the fields, msg),
 * built here: pino's generic serialisation of it, through a child logger made per request, cost
 * more than the rest of the line (docs/benchmarks.md). The task of a request is the one its handler
 * names (`request.taskId`: a task started, ended or served), else the one it names by `:ref` (a name
 * or an id), looked up when the request completes, for an authenticated caller.
 */
export class RequestLog extends LogController {
  readonly #store: Pick<TaskStore, 'get' | 'findByName'>;
  readonly #write: (line: string) => void;
  readonly #text: boolean;
  readonly #level: number;
  /** `,"pid":N,"hostname":"H"`, as pino writes its base bindings. */
  readonly #base = `,"pid":${process.pid},"hostname":${JSON.stringify(hostname())}`;

  constructor(store: Pick<TaskStore, 'get' | 'findByName'>, config: LoggerConfig = { format: 'json', level: 'info' }) {
    super({ disableRequestLogging: false });
    this.#store = store;
    this.#write = config.write ?? stderrLines.queue;
    this.#text = config.format === 'text';
    this.#level = LEVEL_VALUES[config.level];
  }

  override incomingRequest(): void {}

  override routeNotFound(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    // A flood refused by the limits is summarised in the audit log (auth.failed, request.throttled),
    // not written line by line: at debug only, so a flood cannot fill the disk through stderr either.
    const level = error || reply.statusCode >= 500 ? 50 : reply.statusCode === 429 ? 20 : 30;
    if (level < this.#level) return;
    const fields = requestFields(request, reply, this.#taskOf(request));
    const json = `{"level":${level},"time":${Date.now()}${this.#base},"reqId":${JSON.stringify(request.id)},${JSON.stringify(fields).slice(1, -1)},"msg":"request"}`;
    this.#write(this.#text ? formatLogLine(json) + '\n' : json + '\n');
  }

  #taskOf(req: FastifyRequest): string | undefined {
    if (req.taskId !== undefined) return req.taskId;
    const url = req.routeOptions.url;
    if (!req.caller || !url || !TASK_ROUTE.test(url)) return undefined;
    const ref = (req.params as { ref?: string } | undefined)?.ref;
    if (!ref) return undefined;
    return this.#store.get(ref)?.id ?? this.#store.findByName(req.caller.agent, ref)?.id;
  }
}
