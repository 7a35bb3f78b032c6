/**
 * The PostgreSQL audit store (`broker serve --audit-store postgres://...`, docs/audit.md): the same
 * records, the same hash chain and the same canonical lines as the file log (log.ts, verify.ts), kept
 * in one table that every broker replica appends to.
 *
 * - One chain across all replicas. A batch is appended in one transaction that first takes a
 *   transaction-scoped advisory lock (AUDIT_LOCK_KEY), reads the last row and chains onto it: the
 *   replicas' batches are serialised, each process's concurrent appends share one transaction
 *   (group commit, as the file log shares an fdatasync). A process that appended the last records
 *   itself (no other writer seen since) commits a batch in one round trip, one transaction at a time
 *   (the fast way, #commit); otherwise two round trips (begin, lock and head read; insert and
 *   commit), and up to two transactions in flight. Either way the rows go in through one function,
 *   AUDIT_APPEND (created by `broker audit migrate`, SECURITY INVOKER: the broker's own INSERT
 *   right applies), that takes the lock, checks the head and inserts the batch from arrays: one
 *   statement prepared once per connection, instead of a VALUES list the server parses and plans
 *   every time. An advisory lock needs no UPDATE right, so the broker's role keeps only SELECT and
 *   INSERT, and EXECUTE on that function (`broker audit migrate --grant`).
 * - Durable: `append` resolves once COMMIT has returned, with synchronous_commit on for the session
 *   (a startup parameter of every connection, whatever the server's default), so the WAL is flushed.
 *   Read committed likewise: what is read after the lock sees every batch committed before.
 * - Fail closed, and back: a failed batch rejects every pending append with audit_unavailable and
 *   makes the store unhealthy; a probe (SELECT 1, every 500 ms) makes it healthy again once the
 *   database answers. Unlike a file, a database that was away has lost nothing that was committed.
 * - Recorded once: an API server audit event (`k8s.request`) carries its event key (kube-events.ts
 *   recordedKey) in a unique column; an event already in the table, appended by any replica, is not
 *   appended again (its existing record is returned).
 * - The last row is checked before anything is chained onto it: an altered head stops appends
 *   (audit_chain_broken), as the file log refuses to open a broken file.
 * - Never a secret: the URL's password is never in a message or a record (redactUrl).
 */
import pg from 'pg';
import type { PoolClient } from 'pg';
import { BrokerError, errText } from '../errors.ts';
import { recordedKey } from './kube-events.ts';
import { checkEvent } from './log.ts';
import type { AuditSink } from './sink.ts';
import { GENESIS_HASH, OPTIONAL_STRING_FIELDS, type AuditEventInput, type AuditRecord, type VerifyResult } from './types.ts';
import { canonicalRecordJson, ChainVerifier, recordLine, sha256Hex, type VerifyOptions } from './verify.ts';
import { usedProofsMigration } from '../identity/proof-replay.ts';
import { AUDIT_APPEND, AUDIT_APPEND_SIGNATURE, AUDIT_SCHEMA, AUDIT_TABLE, lacksMigration } from './store-schema.ts';
import { consoleMigration } from '../console/migration.ts';

/** Schema, table and append function (created by `broker audit migrate`). */
export { AUDIT_APPEND, AUDIT_SCHEMA, AUDIT_TABLE };
/** The advisory lock that serialises appends to the one chain ("tbaudit1" as a 64-bit integer). */
export const AUDIT_LOCK_KEY = '8386102735580079409';
const PROBE_MS = 500;
/** Careful-way transactions of one process in flight at once (the second queues on the chain's lock in the database); the fast way has one. */
const MAX_IN_FLIGHT = 2;
/** Rows read at a time by verify and show. */
const READ_CHUNK = 10_000;


/** The URL without its password (and without a password=... parameter), for every message. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    if (u.searchParams.has('password')) u.searchParams.set('password', '***');
    return u.toString();
  } catch {
    return 'postgres://(unparsable URL)';
  }
}

export interface PostgresStoreOptions {
  /** @internal For tests: the clock. */
  now?: () => Date;
  /** How long a connection attempt may take (default 3000 ms). */
  connectTimeoutMs?: number;
  /** How long one statement may take (default 5000 ms): a database that hangs fails closed in that time. */
  statementTimeoutMs?: number;
}

/** The chain's last record (null: the chain is empty). */
type Head = { seq: number; line: string; hash: string } | null;

interface Built {
  values: Array<{ seq: number; time: string; type: string; task: string | null; key: string | null; line: string }>;
  outcome: AuditRecord[];
  /** The last record after the batch. */
  tail: Head;
  duplicates: number;
}

interface Pending {
  event: AuditEventInput;
  key: string | undefined;
  resolve: (record: AuditRecord) => void;
  reject: (err: unknown) => void;
}

export interface AuditStoreStats {
  records: number;
  /** Transactions committed (one per batch). */
  flushes: number;
  /** Events found already recorded (by any replica) and not appended again. */
  duplicates: number;
  /** Transactions that went the fast way (one round trip: #commit), and those that tried and found another writer's record. */
  fast: number;
  fastMissed: number;
}

function newPool(url: string, options: PostgresStoreOptions): pg.Pool {
  const statementTimeout = options.statementTimeoutMs ?? 5000;
  const pool = new pg.Pool({
    connectionString: url,
    max: 4,
    connectionTimeoutMillis: options.connectTimeoutMs ?? 3000,
    idleTimeoutMillis: 10_000,
    statement_timeout: statementTimeout,
    query_timeout: statementTimeout + 1000,
    application_name: 'task-broker',
    // Durable at COMMIT whatever the server's or the role's default (a startup parameter: no extra query).
    // Read committed whatever the database's default: a statement after the chain's lock must see every
    // batch committed before it (with repeatable read the snapshot predates the lock: a stale head, and
    // the next seq already taken).
    options: '-c synchronous_commit=on -c default_transaction_isolation=read\\ committed',
  });
  // An idle client whose server went away emits here; without a listener it would end the process.
  pool.on('error', () => undefined);
  return pool;
}

/** Translates a driver error into what the broker says, never with the URL's password. */
function storeError(where: string, doing: string, err: unknown): BrokerError {
  if (err instanceof BrokerError) return err;
  if (lacksMigration(err)) {
    const what = (err as { code?: unknown }).code === '42883' ? `no function ${AUDIT_APPEND}` : 'no audit table';
    return new BrokerError('audit_unavailable', `the audit store ${where} has ${what}: run \`broker audit migrate ${where}\` first`, { cause: err });
  }
  return new BrokerError('audit_unavailable', `the audit store ${where} cannot ${doing}: ${errText(err)}`, { cause: err });
}

export class PostgresAuditStore implements AuditSink {
  /** The URL without its password. */
  readonly where: string;
  readonly #pool: pg.Pool;
  readonly #now: () => Date;
  #queue: Pending[] = [];
  /** Transactions in flight (at most MAX_IN_FLIGHT). */
  #inFlight = 0;
  #scheduled = false;
  #idle: (() => void)[] = [];
  #down: BrokerError | undefined;
  #probe: ReturnType<typeof setInterval> | undefined;
  #closed = false;
  #closing: Promise<void> | undefined;
  #nextSeq: number;
  #stats: AuditStoreStats = { records: 0, flushes: 0, duplicates: 0, fast: 0, fastMissed: 0 };
  /**
   * The fast way's prediction: the chain's last record once every batch this process has sent
   * commits, if no other writer appends meanwhile (null: empty). Undefined: unknown, and batches go
   * the careful way. Each fast batch is built on it and moves it on, so two in flight chain in order.
   */
  #tail: Head | undefined;
  /** The latest record this process committed or found as the head (by seq): what a careful batch compares the head it reads with. */
  #own: Head | undefined;
  /** The lines of this process's recent batch tails (committed or in flight) and of the head found at open: a head read that is one of them was written by no one else. */
  readonly #ownLines = new Set<string>();
  /**
   * The last careful batch to commit found the head this process knew (no other writer since): no
   * new batch starts until those in flight are done; then the fast way resumes from #own.
   */
  #settling = false;

  private constructor(where: string, pool: pg.Pool, head: Head | undefined, nextSeq: number, options: PostgresStoreOptions) {
    this.where = where;
    this.#pool = pool;
    this.#nextSeq = nextSeq;
    this.#now = options.now ?? (() => new Date());
    // The head at open: if the first batch (careful) finds it still there, nobody else is writing.
    this.#own = head;
    if (head) this.#ownLines.add(head.line);
  }

  /**
   * Connects and checks that the table is there and that this role may read and append to it.
   * Rejects with audit_unavailable otherwise (naming `broker audit migrate` when the table is missing).
   */
  static async open(url: string, options: PostgresStoreOptions = {}): Promise<PostgresAuditStore> {
    const where = redactUrl(url);
    const pool = newPool(url, options);
    try {
      const rights = await pool.query<{ select: boolean; insert: boolean; fn: boolean; execute: boolean }>(
        `SELECT has_table_privilege($1, 'SELECT') AS select, has_table_privilege($1, 'INSERT') AS insert,
          to_regprocedure($2) IS NOT NULL AS fn, CASE WHEN to_regprocedure($2) IS NULL THEN false ELSE has_function_privilege(to_regprocedure($2), 'EXECUTE') END AS execute`,
        [AUDIT_TABLE, AUDIT_APPEND_SIGNATURE],
      );
      const r = rights.rows[0];
      if (!r?.select || !r.insert) {
        throw new BrokerError('audit_unavailable', `the audit store ${where}: this role may not ${!r?.select ? 'read' : 'append to'} ${AUDIT_TABLE} (\`broker audit migrate --grant ROLE\`)`);
      }
      // A store migrated by an older version: its table is there, the function this version appends with is not.
      if (!r.fn) {
        throw new BrokerError('audit_unavailable', `the audit store ${where} has no function ${AUDIT_APPEND}, which this version of the broker appends with: run \`broker audit migrate ${where}\` of this version first`);
      }
      if (!r.execute) {
        throw new BrokerError('audit_unavailable', `the audit store ${where}: this role may not execute ${AUDIT_APPEND} (\`broker audit migrate --grant ROLE\`)`);
      }
      const row = (await pool.query<{ seq: string; line: string }>(`SELECT seq, line FROM ${AUDIT_TABLE} ORDER BY seq DESC LIMIT 1`)).rows[0];
      let head: Head | undefined = null;
      if (row) {
        // An altered head is refused by the first batch, which reads and checks it under the chain's lock; here it is only not known.
        try {
          head = { seq: Number(row.seq), line: row.line, hash: headHash(row.line, Number(row.seq), where) };
        } catch {
          head = undefined;
        }
      }
      return new PostgresAuditStore(where, pool, head, row ? Number(row.seq) + 1 : 0, options);
    } catch (err) {
      await pool.end().catch(() => undefined);
      throw storeError(where, 'be opened', err);
    }
  }

  get healthy(): boolean {
    return this.#down === undefined && !this.#closed;
  }

  /** The seq the next record of this process would get, as far as it knows (other replicas append too). */
  get nextSeq(): number {
    return this.#nextSeq;
  }

  /** A query on the store's pool, for the table of used agent proofs (src/identity/proof-replay.ts), never the audit table. */
  proofLedgerQuery(text: string, values?: unknown[]): Promise<pg.QueryResult> {
    return this.#pool.query(text, values);
  }

  get stats(): Readonly<AuditStoreStats> {
    return { ...this.#stats };
  }

  async append(event: AuditEventInput): Promise<AuditRecord> {
    if (this.#closed) throw new BrokerError('audit_unavailable', `the audit store ${this.where} is closed`);
    if (this.#down) throw this.#down;
    const clean = checkEvent(event);
    return new Promise<AuditRecord>((resolve, reject) => {
      this.#queue.push({ event: clean, key: eventKeyOf(clean), resolve, reject });
      this.#schedule();
    });
  }

  /** The last `max` lines, oldest first (the webhook's start-up view of what is recorded). */
  async tailLines(max: number): Promise<string[]> {
    try {
      const r = await this.#pool.query<{ line: string }>(`SELECT line FROM (SELECT seq, line FROM ${AUDIT_TABLE} ORDER BY seq DESC LIMIT $1) t ORDER BY seq`, [max]);
      return r.rows.map((row) => row.line);
    } catch (err) {
      throw storeError(this.where, 'be read', err);
    }
  }

  /** Waits for pending appends to commit (or fail), then closes the connections. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#closed = true;
      if (this.#probe) clearInterval(this.#probe);
      while (this.#inFlight > 0 || this.#scheduled) await new Promise<void>((done) => this.#idle.push(done));
      await this.#pool.end().catch(() => undefined);
    })();
    return this.#closing;
  }

  /** As AuditLog.discard: nothing to remove in a shared table, so this closes. */
  discard(): Promise<void> {
    return this.close();
  }

  #schedule(): void {
    // The fast way one transaction at a time: a second one's lock request may reach the database
    // first, and then it inserts nothing (it was built on the first's tail) and takes the careful way.
    const max = this.#tail === undefined ? MAX_IN_FLIGHT : 1;
    if (this.#inFlight >= max || this.#scheduled || this.#queue.length === 0) return;
    if (this.#settling && this.#inFlight > 0) return; // the batch in flight decides the way of the next
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      void this.#run();
    });
  }

  /**
   * One batch: everything queued, in one transaction. The careful way, up to MAX_IN_FLIGHT run at
   * once: the second waits for the chain's lock in the database, not here, so it starts as soon as the
   * first commits (and it reads the head after the first, so the chain holds whatever order they
   * commit in). The fast way, one at a time.
   */
  async #run(): Promise<void> {
    if (this.#queue.length === 0) return this.#wake();
    const batch = this.#queue.splice(0, this.#queue.length);
    this.#inFlight++;
    try {
      await this.#commit(batch);
    } catch (err) {
      const failure = storeError(this.where, 'be written', err);
      this.#fail(failure);
      for (const p of [...batch, ...this.#queue.splice(0)]) p.reject(failure);
    } finally {
      this.#inFlight--;
      this.#schedule();
      this.#wake();
    }
  }

  #wake(): void {
    if (this.#inFlight === 0 && !this.#scheduled) for (const wake of this.#idle.splice(0)) wake();
  }

  /**
   * One batch, committed. The fast way, while this process has appended the chain's last records as
   * far as it knows (#tail: no other writer seen since): one round trip that inserts only if the head
   * is still exactly the predicted line and no event key of the batch is recorded; one such batch at
   * a time (#schedule). Otherwise, or when that inserts nothing: lock, read and check the head, drop
   * recorded event keys, insert, commit (two round trips; two such batches may be in flight), and back
   * to the fast way once a careful batch found only this process's record as the head and nothing
   * else of it is in flight.
   */
  async #commit(batch: Pending[]): Promise<void> {
    let client: PoolClient;
    try {
      client = await this.#pool.connect();
    } catch (err) {
      throw storeError(this.where, 'be reached', err);
    }
    let broken = false;
    try {
      const tail = this.#tail;
      if (tail !== undefined) {
        const built = this.#build(batch, tail, new Map());
        this.#tail = built.tail; // the next batch builds on this one while it is in flight
        this.#noteOwn(built.tail);
        if (await this.#insertIf(client, built, tail)) {
          this.#stats.fast++;
          this.#committed(built.tail);
          return this.#done(batch, built);
        }
        // Another writer appended, or a key of the batch is recorded: the careful way, and no more
        // fast batches until the head is known again.
        this.#stats.fastMissed++;
        this.#tail = undefined;
        this.#settling = false;
      }
      const results = (await client.query(
        `BEGIN; SELECT pg_advisory_xact_lock(${AUDIT_LOCK_KEY}); SELECT seq, line FROM ${AUDIT_TABLE} ORDER BY seq DESC LIMIT 1`,
      )) as unknown as Array<pg.QueryResult<{ seq: string; line: string }>>;
      const row = results[2]!.rows[0];
      const head: Head = row ? { seq: Number(row.seq), line: row.line, hash: headHash(row.line, Number(row.seq), this.where) } : null;
      // Written by this process (or found at open), or the chain is as empty as this process found it.
      const ownHead = head === null ? this.#own === null : this.#ownLines.has(head.line);
      const keys = [...new Set(batch.map((p) => p.key).filter((k): k is string => k !== undefined))];
      const existing = new Map<string, AuditRecord>();
      if (keys.length > 0) {
        const found = await client.query<{ event_key: string; line: string }>(`SELECT event_key, line FROM ${AUDIT_TABLE} WHERE event_key = ANY($1::text[])`, [keys]);
        for (const r of found.rows) existing.set(r.event_key, JSON.parse(r.line) as AuditRecord);
      }
      const built = this.#build(batch, head, existing);
      this.#noteOwn(built.tail);
      if (built.values.length > 0) {
        // The function's own lock and head check pass (this transaction holds the lock and read the head): its rows and COMMIT in one round trip.
        const results = (await client.query(`SELECT * FROM ${appendCall(appendArgs(built, head).map(literalArg))}; COMMIT`)) as unknown as pg.QueryResult[];
        if (results[0]!.rows.length > 0) throw new BrokerError('audit_unavailable', `the audit store ${this.where}: the chain moved under its lock`);
      } else await client.query('COMMIT');
      this.#committed(built.tail);
      // Nobody else wrote since this process's last batch: once nothing else of it is in flight, the fast way.
      this.#settling = ownHead && this.#tail === undefined;
      this.#done(batch, built);
    } catch (err) {
      broken = true;
      this.#tail = undefined;
      this.#settling = false;
      await client.query('ROLLBACK').catch(() => undefined);
      throw err;
    } finally {
      // A client that saw an error is not reused: its connection may be half-gone.
      client.release(broken);
      if (this.#inFlight === 1 && this.#tail === undefined) {
        // The last batch in flight: the fast way resumes from the latest record if the last careful one found only this process's.
        if (this.#settling && !broken && this.#own !== undefined) this.#tail = this.#own;
        this.#settling = false;
      }
    }
  }

  /** A batch tail of this process (in flight or committed): a head read that equals it is this process's own record. */
  #noteOwn(tail: Head): void {
    if (tail === null) return;
    this.#ownLines.add(tail.line);
    // A few are enough: at most MAX_IN_FLIGHT batches are in flight, and the oldest go first.
    if (this.#ownLines.size > 8) this.#ownLines.delete(this.#ownLines.values().next().value!);
  }

  /** The latest record this process knows it committed (the higher seq of two batches that commit out of order). */
  #committed(tail: Head): void {
    if (tail !== null && (this.#own == null || tail.seq >= this.#own.seq)) this.#own = tail;
  }

  /** The batch's records after `head` (null: an empty chain), those whose event key is recorded left out. */
  #build(batch: Pending[], head: Head, existing: Map<string, AuditRecord>): Built {
    let seq = head ? head.seq + 1 : 0;
    let prev = head ? head.hash : GENESIS_HASH;
    let tail: Head = head;
    const time = this.#now().toISOString();
    const values: Built['values'] = [];
    const outcome: AuditRecord[] = [];
    let duplicates = 0;
    for (const p of batch) {
      const had = p.key === undefined ? undefined : existing.get(p.key);
      if (had) {
        outcome.push(had);
        duplicates++;
        continue;
      }
      const { record, line, hash } = buildRecord(p.event, seq, time, prev);
      // PostgreSQL text holds no NUL; the line has it escaped (JSON), the task index column drops it.
      values.push({ seq, time, type: record.type, task: record.task?.replaceAll('\0', '') ?? null, key: p.key ?? null, line });
      if (p.key !== undefined) existing.set(p.key, record);
      outcome.push(record);
      tail = { seq, line, hash };
      seq++;
      prev = hash;
    }
    return { values, outcome, tail, duplicates };
  }

  /**
   * The fast way: one statement, prepared once per connection, in a transaction of its own (the
   * extended protocol commits at its Sync): AUDIT_APPEND inserts only if the head is still `expected`
   * and none of the keys is recorded, and otherwise returns what it found (the careful way follows).
   */
  async #insertIf(client: PoolClient, built: Built, expected: Head): Promise<boolean> {
    if (built.values.length === 0) return true;
    const found = await client.query({ name: 'task-broker-append', text: `SELECT * FROM ${appendCall(['$1', '$2', '$3', '$4', '$5', '$6', '$7'])}`, values: appendArgs(built, expected) });
    return found.rows.length === 0;
  }

  #done(batch: Pending[], built: Built): void {
    if (built.tail) this.#nextSeq = built.tail.seq + 1;
    this.#stats.flushes++;
    this.#stats.records += built.values.length;
    this.#stats.duplicates += built.duplicates;
    batch.forEach((p, i) => p.resolve(built.outcome[i]!));
  }

  #fail(failure: BrokerError): void {
    this.#down = failure;
    if (this.#probe || this.#closed) return;
    this.#probe = setInterval(() => {
      void this.#pool.query('SELECT 1').then(
        () => {
          if (this.#probe) clearInterval(this.#probe);
          this.#probe = undefined;
          this.#down = undefined;
        },
        () => undefined,
      );
    }, PROBE_MS);
    this.#probe.unref();
  }
}

/**
 * A string as an SQL literal, as pg's escapeLiteral writes it (quotes doubled; with a backslash, an
 * E'' literal with backslashes doubled): that one builds it a character at a time, which for the
 * ~500-character lines of a batch cost more than the rest of the INSERT's text (docs/benchmarks.md).
 */
export function literal(value: string): string {
  return value.includes('\\') ? ` E'${value.replaceAll('\\', '\\\\').replaceAll("'", "''")}'` : `'${value.replaceAll("'", "''")}'`;
}

/** The append function's arguments for a batch built on `head` (store-schema.ts AUDIT_APPEND_SIGNATURE). */
function appendArgs(built: Built, head: Head): Array<string | null | Array<string | null>> {
  const keys = built.values.some((v) => v.key !== null) ? built.values.map((v) => v.key) : null;
  // One text of lines joined by newlines (a canonical line has none: JSON escapes it): split by the function, no array quoting either side.
  const lines = built.values.map((v) => v.line).join('\n');
  return [head === null ? null : String(head.seq), head?.line ?? null, built.values[0]!.time, built.values.map((v) => v.type), built.values.map((v) => v.task), keys, lines];
}

function appendCall(args: string[]): string {
  const [seq, line, at, types, tasks, keys, lines] = args;
  return `${AUDIT_APPEND}(${seq}::bigint, ${line}::text, ${at}::timestamptz, ${types}::text[], ${tasks}::text[], ${keys}::text[], ${lines}::text)`;
}

/** An argument of appendArgs as an SQL literal (the careful way shares a round trip with COMMIT: simple protocol). */
function literalArg(value: string | null | Array<string | null>): string {
  if (value === null) return 'NULL';
  if (Array.isArray(value)) return `ARRAY[${value.map((v) => (v === null ? 'NULL' : literal(v))).join(',')}]`;
  return literal(value);
}

/** The event key of an API server audit event's record (the webhook's dedup key), else undefined. */
function eventKeyOf(event: AuditEventInput): string | undefined {
  if (event.type !== 'k8s.request' || !event.details) return undefined;
  const d = event.details;
  const s = (k: string) => (typeof d[k] === 'string' ? (d[k] as string) : undefined);
  const auditID = s('auditID');
  const stage = s('stage');
  return auditID !== undefined && stage !== undefined ? recordedKey(auditID, stage, s('requestReceivedTimestamp'), s('stageTimestamp')) : undefined;
}

/** A record as the file log builds it (log.ts append): same fields, same canonical line and hash. */
function buildRecord(event: AuditEventInput, seq: number, time: string, prev: string): { record: AuditRecord; line: string; hash: string } {
  const record: Record<string, unknown> = { seq, time, type: event.type, actor: event.actor };
  for (const k of OPTIONAL_STRING_FIELDS) if (event[k] !== undefined) record[k] = event[k];
  if (event.details !== undefined) record['details'] = event.details;
  record['prev'] = prev;
  const canonical = canonicalRecordJson(record);
  const hash = sha256Hex(canonical);
  record['hash'] = hash;
  return { record: Object.freeze(record) as unknown as AuditRecord, line: recordLine(canonical, hash), hash };
}

/** The hash of the chain's last row, checked: nothing is chained onto an altered record. */
function headHash(line: string, seq: number, where: string): string {
  let rec: Record<string, unknown>;
  try {
    rec = JSON.parse(line) as Record<string, unknown>;
  } catch {
    throw new BrokerError('audit_chain_broken', `the audit store ${where}: the last record (seq ${seq}) is not valid JSON; nothing is appended after it (broker audit verify)`);
  }
  const canonical = canonicalRecordJson(rec);
  const hash = sha256Hex(canonical);
  if (rec['seq'] !== seq || hash !== rec['hash'] || recordLine(canonical, hash) !== line) {
    throw new BrokerError('audit_chain_broken', `the audit store ${where}: the last record (seq ${seq}) was altered; nothing is appended after it (broker audit verify)`);
  }
  return hash;
}

// ---------------------------------------------------------------------------------------------
// Reading, verifying and migrating (the CLI)

/**
 * Reads the table in seq order from where it last stopped, verifying the chain row by row: the same
 * surface as show.ts AuditReader, so `audit show` works on a store as on a file. A row is a line.
 */
export class PostgresAuditReader {
  readonly where: string;
  readonly #url: string;
  readonly #verifier: ChainVerifier;
  #after = -1;
  #broken: Extract<VerifyResult, { ok: false }> | undefined;

  constructor(url: string, onRecord?: (seq: number, hash: string) => void) {
    this.#url = url;
    this.where = redactUrl(url);
    this.#verifier = new ChainVerifier(onRecord);
  }

  get broken(): Extract<VerifyResult, { ok: false }> | undefined {
    return this.#broken;
  }

  /**
   * The records of the rows appended since the last call, verified (none once broken). Read in
   * chunks of READ_CHUNK rows: appends commit in seq order under the chain's lock, so every snapshot
   * holds a prefix of the chain and chunk after chunk reads it whole. `keep: false` (verify) returns
   * none and holds only a chunk at a time.
   */
  async read(options: { keep?: boolean } = {}): Promise<AuditRecord[]> {
    if (this.#broken) return [];
    const keep = options.keep !== false;
    const client = new pg.Client({ connectionString: this.#url, connectionTimeoutMillis: 5000, application_name: 'task-broker audit' });
    client.on('error', () => undefined);
    const out: AuditRecord[] = [];
    try {
      try {
        await client.connect();
      } catch (err) {
        throw storeError(this.where, 'be read', err);
      }
      for (;;) {
        let rows: Array<{ seq: string; line: string }>;
        try {
          rows = (await client.query<{ seq: string; line: string }>(`SELECT seq, line FROM ${AUDIT_TABLE} WHERE seq > $1 ORDER BY seq LIMIT ${READ_CHUNK}`, [String(this.#after)])).rows;
        } catch (err) {
          throw storeError(this.where, 'be read', err);
        }
        for (const row of rows) {
          this.#verifier.push(row.line);
          if (this.#verifier.broken) {
            this.#broken = this.#verifier.finish(false) as Extract<VerifyResult, { ok: false }>;
            return out;
          }
          this.#after = Number(row.seq);
          if (keep) out.push(JSON.parse(row.line) as AuditRecord);
        }
        if (rows.length < READ_CHUNK) return out;
      }
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /** The verdict so far; with `expectLast`, also whether the last record has that hash (ChainVerifier's check, as for a file). */
  result(_complete: boolean, options: Pick<VerifyOptions, 'expectLast'> = {}): VerifyResult {
    if (this.#broken) return this.#broken;
    const r = this.#verifier.finish(false);
    if (!r.ok) return (this.#broken = r);
    return options.expectLast === undefined ? r : this.#verifier.finish(false, options);
  }
}

/**
 * AUDIT_APPEND: appends one batch to the chain, built by the broker on the head it expects
 * (`expected_seq`, `expected_line`; both null: an empty chain). Under the chain's advisory lock (held
 * to the end of the caller's transaction), it reads the last row; if that is not the expected one, it
 * returns it (`row_kind` 'head'), and it returns the rows already holding any of `keys` ('recorded');
 * if it returned anything it inserts nothing. Otherwise it inserts row i with seq = expected_seq + i
 * (from 1), `at`, types[i], tasks[i], keys[i] (keys null: none) and line i of `lines` (the canonical
 * lines joined by newlines, which none holds) and returns no row. Arrays of different lengths raise an
 * error. SECURITY INVOKER: it runs with the caller's rights, so the brokers' role still needs its own
 * SELECT and INSERT (and has no more). PL/pgSQL: each statement takes a new snapshot (read committed),
 * so the head read after the lock sees every batch committed before it. `CREATE OR REPLACE`: safe to
 * run twice.
 */
function appendFunctionSql(): string {
  return `CREATE OR REPLACE FUNCTION ${AUDIT_APPEND}(expected_seq bigint, expected_line text, at timestamptz, types text[], tasks text[], keys text[], lines text)
  RETURNS TABLE (row_kind text, row_seq bigint, row_key text, row_line text)
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $fn$
DECLARE
  each_line text[] := pg_catalog.string_to_array(lines, E'\\n');
  n integer := pg_catalog.cardinality(types);
  head_seq bigint;
  head_line text;
  missed boolean := false;
BEGIN
  IF pg_catalog.cardinality(each_line) IS DISTINCT FROM n OR pg_catalog.cardinality(tasks) IS DISTINCT FROM n
      OR (keys IS NOT NULL AND pg_catalog.cardinality(keys) IS DISTINCT FROM n) THEN
    RAISE EXCEPTION 'append_audit: % lines, % types, % tasks, % keys', pg_catalog.cardinality(each_line), n, pg_catalog.cardinality(tasks), pg_catalog.cardinality(keys)
      USING ERRCODE = '22023';
  END IF;
  PERFORM pg_catalog.pg_advisory_xact_lock(${AUDIT_LOCK_KEY});
  SELECT a.seq, a.line INTO head_seq, head_line FROM ${AUDIT_TABLE} a ORDER BY a.seq DESC LIMIT 1;
  IF head_seq IS DISTINCT FROM expected_seq OR head_line IS DISTINCT FROM expected_line THEN
    row_kind := 'head'; row_seq := head_seq; row_key := NULL; row_line := head_line;
    RETURN NEXT;
    missed := true;
  END IF;
  IF keys IS NOT NULL THEN
    RETURN QUERY SELECT 'recorded'::text, a.seq, a.event_key, a.line FROM ${AUDIT_TABLE} a WHERE a.event_key = ANY (keys);
    IF FOUND THEN missed := true; END IF;
  END IF;
  IF missed THEN RETURN; END IF;
  INSERT INTO ${AUDIT_TABLE} (seq, time, type, task, event_key, line)
    SELECT COALESCE(head_seq, -1) + u.i, at, u.type_, u.task_, u.key_, u.line_
    FROM ROWS FROM (pg_catalog.unnest(types), pg_catalog.unnest(tasks), pg_catalog.unnest(keys), pg_catalog.unnest(each_line)) WITH ORDINALITY AS u(type_, task_, key_, line_, i);
END
$fn$`;
}

export interface MigrateResult {
  created: boolean;
  granted: string[];
}

/**
 * Creates the schema, the table and its indexes if missing, and grants `roles` SELECT and INSERT on
 * the table (nothing else: no UPDATE, DELETE or TRUNCATE); the same for the used agent proofs' table, whose
 * expired rows it deletes (src/identity/proof-replay.ts). Safe to run twice, and concurrently (one
 * transaction under the chain's advisory lock). Run by the table's owner, never by the broker's role.
 */
export async function migrate(url: string, roles: string[]): Promise<MigrateResult> {
  const where = redactUrl(url);
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000, application_name: 'task-broker migrate' });
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.query('BEGIN');
    await client.query(`SELECT pg_advisory_xact_lock(${AUDIT_LOCK_KEY})`);
    const had = await client.query<{ t: string | null }>(`SELECT to_regclass($1)::text AS t`, [AUDIT_TABLE]);
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${AUDIT_SCHEMA}`);
    await client.query(`CREATE TABLE IF NOT EXISTS ${AUDIT_TABLE} (
      seq bigint PRIMARY KEY CHECK (seq >= 0),
      time timestamptz NOT NULL,
      type text NOT NULL,
      task text,
      event_key text UNIQUE,
      line text NOT NULL
    )`);
    await client.query(`CREATE INDEX IF NOT EXISTS audit_task ON ${AUDIT_TABLE} (task)`);
    await client.query(`REVOKE ALL ON ${AUDIT_TABLE} FROM PUBLIC`);
    await client.query(appendFunctionSql());
    // A function is executable by PUBLIC unless revoked.
    await client.query(`REVOKE ALL ON FUNCTION ${AUDIT_APPEND_SIGNATURE} FROM PUBLIC`);
    for (const role of roles) {
      const r = client.escapeIdentifier(role);
      await client.query(`GRANT USAGE ON SCHEMA ${AUDIT_SCHEMA} TO ${r}`);
      await client.query(`REVOKE UPDATE, DELETE, TRUNCATE ON ${AUDIT_TABLE} FROM ${r}`);
      await client.query(`GRANT SELECT, INSERT ON ${AUDIT_TABLE} TO ${r}`);
      await client.query(`GRANT EXECUTE ON FUNCTION ${AUDIT_APPEND_SIGNATURE} TO ${r}`);
    }
    // The agent proofs used on any replica (src/identity/proof-replay.ts): its table, and the pruning of expired rows.
    for (const sql of usedProofsMigration(roles.map((r) => client.escapeIdentifier(r)))) await client.query(sql);
    // The web console's indexes for task pages and its sessions shared by replicas (src/console/migration.ts).
    for (const sql of consoleMigration(roles.map((r) => client.escapeIdentifier(r)))) await client.query(sql);
    await client.query('COMMIT');
    return { created: had.rows[0]?.t == null, granted: roles };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    const code = (err as { code?: string }).code;
    if (code === '42704') throw new BrokerError('invalid_argument', `the audit store ${where}: ${errText(err)} (create the role first)`, { field: '--grant', cause: err });
    throw new BrokerError('audit_unavailable', `the audit store ${where} cannot be migrated: ${errText(err)}`, { cause: err });
  } finally {
    await client.end().catch(() => undefined);
  }
}
