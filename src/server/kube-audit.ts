/**
 * `POST /v1/audit/kubernetes`: the API server's audit webhook (DESIGN.md section 7). The API server
 * posts audit.k8s.io/v1 EventLists; the events of task ServiceAccounts (and of JTIs the broker minted)
 * become `k8s.request` records of the hash-chained audit log (src/audit/kube-events.ts), the rest are
 * counted and dropped.
 *
 * - Only the API server may post: a bearer token, compared in constant time with the one read at start
 *   from `--audit-webhook-token-file`. Not the agents' authentication (app.ts leaves this path alone),
 *   so no TokenReview and no per-identity budget; the per-source budget and the failed-authentication
 *   budget and summary (limits.ts, auth-failures.ts) apply as to every caller. Without a token file the
 *   route answers 404.
 * - Durable before the 200: every record of the batch is fdatasync'd before the answer, so a batch the
 *   broker could not record is retried by the API server (it retries on any error). An unwritable log
 *   answers 503.
 * - Recorded once: by event (auditID, stage and the API server's timestamps: kube-events.ts eventKey;
 *   not the auditID alone, which a client may choose), over a bounded set of recent ones, seeded at
 *   start from the tail of the log, so a batch posted again (a retry after a lost answer, a broker
 *   killed before it answered) adds nothing. Per log file: replicas each keep their own log, and a
 *   batch retried to another replica is recorded in that replica's log too. With the PostgreSQL store
 *   (src/audit/postgres.ts) the replicas share one table, which records an event key once whichever
 *   replica the batch reaches.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { AuditSink } from '../audit/sink.ts';
import { classify, eventKey, inRequestOrder, K8S_REQUEST, parseEventList, recordedKey, toRecord, type Disposition, type TaskInfo } from '../audit/kube-events.ts';
import { leftBehind, LeftBehindStore, type LeftBehindReport } from '../audit/left-behind.ts';
import { BrokerError, isBrokerError } from '../errors.ts';
import { failpoint } from '../failpoint.ts';
import { bearerToken, type Caller } from '../identity/types.ts';
import type { TaskStore } from '../tasks/store.ts';
import { RecentTasks } from '../tasks/recent.ts';
import type { RequestGuard } from './limits.ts';
import type { Metrics } from './metrics.ts';

export const KUBE_AUDIT_PATH = '/v1/audit/kubernetes';
/** The largest batch accepted. The API server's default batch is 400 events (a few hundred KiB at Metadata level). */
export const KUBE_AUDIT_BODY_LIMIT = 32 * 1024 * 1024;
/** Events remembered for deduplication, and records of the log's tail read at start. */
export const DEDUP_IDS = 200_000;
/** Shortest token accepted in the token file. */
const MIN_TOKEN_CHARS = 16;

/** What the route needs once the broker takes the webhook (serve.ts builds it with prepareKubeAudit). */
export interface KubeAuditConfig {
  /** SHA-256 of the API server's bearer token. */
  tokenDigest: Buffer;
  taskNamespace: string;
  recent: RecentTasks;
  seen: SeenEvents;
  /** Per task, the recorded requests that bear on what it leaves behind (reported at task end). */
  leftBehind: LeftBehindStore;
}

export interface KubeAuditDeps {
  audit: AuditSink;
  metrics: Metrics;
  guard: RequestGuard;
  /** undefined: this broker takes no webhook (the route answers 404). */
  config: KubeAuditConfig | undefined;
}

/**
 * The token in `path`, trimmed. Refused (invalid_argument, naming the flag) when the file cannot be
 * read, grants any access to group or others, or holds fewer than 16 characters.
 */
export function readWebhookToken(path: string, flag = '--audit-webhook-token-file'): string {
  let mode: number;
  let text: string;
  try {
    mode = statSync(path).mode;
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new BrokerError('invalid_argument', `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { field: flag, cause: err });
  }
  if ((mode & 0o077) !== 0) {
    throw new BrokerError('invalid_argument', `${path} is readable or writable by group or others (mode ${(mode & 0o777).toString(8)}): chmod 600 it`, { field: flag });
  }
  const token = text.trim();
  if (token.length < MIN_TOKEN_CHARS || /\s/.test(token)) {
    throw new BrokerError('invalid_argument', `${path} must hold one token of at least ${MIN_TOKEN_CHARS} characters and no whitespace`, { field: flag });
  }
  return token;
}

/**
 * Everything the route needs, built at start: the token's digest, the recent tasks (started: they
 * follow the store), and what the tail of the audit log says (the events already recorded, the tasks
 * and the JTIs minted), read once more from `auditLogPath`, its last `maxRecords` records at most.
 */
export async function prepareKubeAudit(options: {
  token: string;
  /** The audit log file whose tail is read ... */
  auditLogPath?: string;
  /** ... or how to read the last lines of another store (the PostgreSQL store's tailLines). */
  tail?: (max: number) => Promise<string[]>;
  taskNamespace: string;
  store: TaskStore;
  maxRecords?: number;
  recent?: RecentTasks;
}): Promise<KubeAuditConfig> {
  const recent = options.recent ?? new RecentTasks(options.store);
  const seen = new SeenEvents(DEDUP_IDS);
  const left = new LeftBehindStore();
  const max = options.maxRecords ?? DEDUP_IDS;
  const lines = options.tail ? await options.tail(max) : options.auditLogPath === undefined ? [] : await readTailLines(options.auditLogPath, max);
  for (const line of lines) seedFrom(line, seen, recent, left);
  recent.start();
  return { tokenDigest: digest(options.token), taskNamespace: options.taskNamespace, recent, seen, leftBehind: left };
}

/** Registers the route (app.ts calls it once). */
export function registerKubeAuditRoute(app: FastifyInstance, deps: KubeAuditDeps): void {
  const { config } = deps;
  const counted = (outcome: Disposition, n: number) => {
    if (n > 0) deps.metrics.kubeAuditEvents.inc({ outcome }, n);
  };
  if (config) app.addHook('onClose', async () => config.recent.stop());

  app.post(
    KUBE_AUDIT_PATH,
    {
      bodyLimit: KUBE_AUDIT_BODY_LIMIT,
      // Before the body is read: a caller without the token never gets a 32 MiB body parsed.
      onRequest: async (req: FastifyRequest) => {
        if (!config) throw new BrokerError('not_found', 'this broker takes no audit webhook (broker serve --audit-webhook-token-file)');
        await deps.guard.authenticate(req, async () => checkToken(req, config.tokenDigest));
      },
    },
    async (req, reply) => {
      const cfg = config!;
      const events = parseEventList(req.body);
      const { kept, ignored } = classify(events, cfg.taskNamespace, (jti) => cfg.recent.taskOfJti(jti));
      counted('other_user', ignored.other_user);
      counted('stage', ignored.stage);

      const fresh: Array<(typeof kept)[number] & { key: string }> = [];
      const waits: Promise<void>[] = [];
      const inBatch = new Set<string>();
      let duplicates = 0;
      for (const c of inRequestOrder(kept)) {
        const id = eventKey(c.event);
        const state = inBatch.has(id) ? 'done' : cfg.seen.state(id);
        if (state === 'done') duplicates++;
        else if (state instanceof Promise) {
          // Another post of the same events is being recorded right now: answer when it is durable.
          duplicates++;
          waits.push(state);
        } else fresh.push({ ...c, key: id });
        inBatch.add(id);
      }
      counted('duplicate', duplicates);

      // Appended together (one write and fdatasync for the batch), in request order.
      const recs = fresh.map((c) => {
        const task: TaskInfo | undefined = cfg.recent.get(c.taskId);
        return toRecord(c, task);
      });
      const appends = recs.map((r) => deps.audit.append(r).then(() => undefined));
      fresh.forEach((c, i) => cfg.seen.pending(c.key, appends[i]!));
      const results = await Promise.allSettled([...appends, ...waits]);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      const recorded = results.slice(0, appends.length).filter((r) => r.status === 'fulfilled').length;
      results.slice(0, appends.length).forEach((r, i) => r.status === 'fulfilled' && cfg.leftBehind.add(recs[i]!));
      counted('recorded', recorded);
      if (failed) {
        const err = failed.reason as unknown;
        throw isBrokerError(err) ? err : new BrokerError('internal', 'recording the audit events failed', { cause: err });
      }
      if (recorded > 0) failpoint('kube-audit-before-reply');
      return reply.code(200).send({ recorded, duplicates, ignored: ignored.other_user + ignored.stage });
    },
  );
}

export const NOT_RECORDED = 'not recorded: this broker receives no API server audit events; see docs/recording.md';

/** The left-behind report of a task that has just ended, from what this broker's webhook recorded. */
export function leftBehindReport(config: KubeAuditConfig | undefined, taskId: string): LeftBehindReport {
  if (!config) return { recording: 'none', complete: false, leftBehind: [], hint: NOT_RECORDED };
  const held = config.leftBehind.of(taskId);
  const show = `broker audit show --task ${taskId} AUDIT_LOG (each replica's log)`;
  const final = `the final list, once that wait has passed: ${show}`;
  const hint = held.forgotten
    ? `this broker no longer holds the task's requests (too many tasks since): ${show}`
    : `what this broker had recorded when the task ended: requests reach it in the API server's audit batches, up to its --audit-webhook-batch-max-wait later, possibly at another replica${
        held.truncated ? ', and the task made more such requests than the broker keeps in memory' : ''
      }; ${final}`;
  return { recording: 'webhook', complete: false, leftBehind: leftBehind(held.records), hint };
}

/** The events recorded (their eventKey; bounded, oldest forgotten first) and those being recorded now. */
export class SeenEvents {
  readonly #max: number;
  readonly #done = new Set<string>();
  readonly #pending = new Map<string, Promise<void>>();

  constructor(max: number) {
    this.#max = max;
  }

  /** 'done' (recorded), the promise of the append in flight, or undefined (never seen). */
  state(id: string): 'done' | Promise<void> | undefined {
    if (this.#done.has(id)) return 'done';
    return this.#pending.get(id);
  }

  /** An append of `id` is in flight: done once it is durable; forgotten if it fails (so a retry records it). */
  pending(id: string, append: Promise<void>): void {
    this.#pending.set(id, append);
    append.then(
      () => {
        this.#pending.delete(id);
        this.add(id);
      },
      () => this.#pending.delete(id),
    );
  }

  add(id: string): void {
    this.#done.add(id);
    if (this.#done.size > this.#max) this.#done.delete(this.#done.values().next().value!);
  }

  get size(): number {
    return this.#done.size;
  }
}

function digest(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}

async function checkToken(req: FastifyRequest, expected: Buffer): Promise<Caller> {
  const token = bearerToken(req);
  if (token === undefined) throw new BrokerError('unauthenticated', 'the audit webhook takes only the API server\'s bearer token: none was given');
  // Digests of equal length, compared in constant time.
  if (!timingSafeEqual(digest(token), expected)) throw new BrokerError('unauthenticated', 'the bearer token is not the audit webhook\'s');
  // Never stored on the request: the webhook is not an identity of the policy (no per-identity budget).
  return { agent: '', subject: 'system:apiserver', method: 'serviceAccount', principal: 'identity:system:apiserver' };
}

/** One line of the log's tail (oldest first) into the dedup set, the recent tasks and what tasks left behind. */
function seedFrom(line: string, seen: SeenEvents, recent: RecentTasks, left: LeftBehindStore): void {
  // Lines are in canonical form (docs/audit.md): `"type":"…"` appears once, unescaped, as the type.
  if (line.includes(`"type":"${K8S_REQUEST}"`)) {
    if (/"verb":"(create|update|patch|delete)"/.test(line)) {
      try {
        left.add(JSON.parse(line) as Parameters<LeftBehindStore['add']>[0]);
      } catch {
        // not a record: the dedup below skips it too
      }
    }
    // Unescaped quotes occur only around keys and values, and these keys only in `details`.
    const value = (key: string) => {
      const m = new RegExp(`"${key}":"((?:[^"\\\\]|\\\\.)*)"`).exec(line);
      return m ? (JSON.parse(`"${m[1]!}"`) as string) : undefined;
    };
    const auditID = value('auditID');
    const stage = value('stage');
    if (auditID !== undefined && stage !== undefined) seen.add(recordedKey(auditID, stage, value('requestReceivedTimestamp'), value('stageTimestamp')));
    return;
  }
  const started = line.includes('"type":"task.started"');
  const minted = !started && line.includes('"type":"credential.minted"');
  if (!started && !minted) return;
  let r: Record<string, unknown>;
  try {
    r = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return;
  }
  const s = (k: string) => (typeof r[k] === 'string' ? (r[k] as string) : undefined);
  const [id, agent, name, template, namespace, time] = [s('task'), s('agent'), s('taskName'), s('template'), s('namespace'), s('time')];
  if (!id || !agent || !name || !template || !namespace || !time) return;
  const jti = s('jti');
  const expiresAt = Date.parse(s('expiresAt') ?? '');
  recent.remember({ id, agent, name, template, namespace }, Date.parse(time), minted && jti && !Number.isNaN(expiresAt) ? { jti, expiresAt } : undefined);
}

/**
 * The last `max` complete lines of a file, oldest first, read backwards in 1 MiB chunks (a large log
 * is not read whole). A missing file has none.
 */
export async function readTailLines(path: string, max: number): Promise<string[]> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  try {
    const size = (await fh.stat()).size;
    const lines: string[] = [];
    const chunk = Buffer.alloc(1024 * 1024);
    let pos = size;
    let carry: Buffer = Buffer.alloc(0);
    let first = true;
    while (pos > 0 && lines.length < max) {
      const n = Math.min(chunk.length, pos);
      pos -= n;
      const { bytesRead } = await fh.read(chunk, 0, n, pos);
      let buf = Buffer.concat([chunk.subarray(0, bytesRead), carry]);
      if (first) {
        // A line still being written (no `\n` yet) is not a record.
        const end = buf.lastIndexOf(0x0a);
        buf = buf.subarray(0, end + 1);
        first = buf.length === 0;
      }
      let end = buf.length;
      if (end > 0 && buf[end - 1] === 0x0a) end--;
      // (lastIndexOf with a negative offset would count from the end: none before byte 0.)
      const before = (at: number) => (at > 0 ? buf.lastIndexOf(0x0a, at - 1) : -1);
      let nl = before(end);
      while (nl >= 0 && lines.length < max) {
        if (end > nl + 1) lines.push(buf.toString('utf8', nl + 1, end));
        end = nl;
        nl = before(end);
      }
      carry = Buffer.from(buf.subarray(0, end));
    }
    if (pos === 0 && carry.length > 0 && lines.length < max) lines.push(carry.toString('utf8'));
    return lines.reverse();
  } finally {
    await fh.close();
  }
}
