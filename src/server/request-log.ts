/**
 * The broker's request log: one line per answered request on stderr, with the method, the route (its
 * pattern, `/v1/tasks/:ref/credential`, not the raw URL), the status, the duration, the caller
 * (subject and agent) and the task id when the request is about one. Never a token, a header, a query
 * string or a body: the line is built from those fields only, and fastify's own serializers are
 * replaced by ones that keep the same few fields.
 *
 * It is fastify's own logger (pino) and its request-log hook (a LogController whose requestCompleted
 * writes this line instead of fastify's two default ones): JSON lines by default, for log collectors;
 * on a terminal a readable one-line form (`--log-format text`), written by `formatLogLine` from the
 * same JSON.
 */
import { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { actorOf } from '../identity/types.ts';
import type { TaskStore } from '../tasks/store.ts';

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
export function fastifyLogging(config: LoggerConfig, store: Pick<TaskStore, 'get' | 'findByName'>): { logger: Record<string, unknown>; logController: RequestLog } {
  const write = config.write ?? ((line: string) => process.stderr.write(line));
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
    logController: new RequestLog(store),
  };
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
const ID_IN_BODY = /^\{"id":"([a-z0-9]{1,64})"/;

/**
 * fastify's request logging, as this broker wants it: one line when a request completes (at `info`,
 * `error` for 5xx, `debug` for a 429 of the limits), none when it arrives, and no "route not found"
 * line with its URL. The task a request names by `:ref` (a name or an id) is looked up before the
 * handler runs, so a task that the request ends is still found; the id of a task just started is read
 * from the answer. `register` adds those two hooks to the app.
 */
export class RequestLog extends LogController {
  readonly #store: Pick<TaskStore, 'get' | 'findByName'>;
  readonly #task = new WeakMap<FastifyRequest, string>();

  constructor(store: Pick<TaskStore, 'get' | 'findByName'>) {
    super({ disableRequestLogging: false });
    this.#store = store;
  }

  override incomingRequest(): void {}

  override routeNotFound(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    const fields = requestFields(request, reply, this.#task.get(request));
    if (error || reply.statusCode >= 500) request.log.error(fields, 'request');
    // A flood refused by the limits is summarised in the audit log (auth.failed, request.throttled),
    // not written line by line: at debug only, so a flood cannot fill the disk through stderr either.
    else if (reply.statusCode === 429) request.log.debug(fields, 'request');
    else request.log.info(fields, 'request');
  }

  register(app: FastifyInstance): void {
    app.addHook('preHandler', (req, _reply, done) => {
      const url = req.routeOptions.url;
      if (url && TASK_ROUTE.test(url)) {
        const ref = (req.params as { ref?: string }).ref;
        if (ref) {
          const id = this.#store.get(ref)?.id ?? (req.caller ? this.#store.findByName(req.caller.agent, ref)?.id : undefined);
          if (id) this.#task.set(req, id);
        }
      }
      done();
    });
    app.addHook('onSend', (req, reply, payload, done) => {
      if (req.method === 'POST' && reply.statusCode === 201 && req.routeOptions.url === '/v1/tasks' && typeof payload === 'string') {
        const id = ID_IN_BODY.exec(payload)?.[1];
        if (id) this.#task.set(req, id);
      }
      done(null, payload);
    });
  }
}
