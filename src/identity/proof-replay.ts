/**
 * Agent proofs used once across every broker replica that shares a PostgreSQL audit store
 * (docs/identity.md, "Replays"). Each replica remembers the proof ids it accepted (AgentKeyStore's
 * memory); with a store, a proof's first use is also recorded in the table `task_broker.used_proofs`,
 * whose primary key makes the first INSERT of an id the only one that inserts a row: a proof accepted
 * by one replica is refused by every other (401, `it was used before (a replay)`), within its minute.
 *
 * A row is SHA-256(agent, NUL, jti) and the proof's expiry: the caller's jti, of any length, never
 * reaches the table as text. Rows past their expiry are harmless (the proof is refused for its age
 * before its id is looked at) and are pruned by `task_broker.prune_used_proofs()`: a function owned
 * by the table's owner (SECURITY DEFINER) that deletes only rows expired five minutes or more, which
 * `broker audit migrate` creates and runs, and which every broker calls at start and every ten minutes. The
 * brokers' role keeps SELECT and INSERT on the table and EXECUTE on that function: it can delete
 * nothing else, and nothing of the audit table.
 *
 * With the file log (one replica) only the memory is asked, as before.
 */
import { createHash } from 'node:crypto';
import { BrokerError, errText } from '../errors.ts';
import { AUDIT_SCHEMA, expiringTablesMigration, lacksMigration } from '../audit/store-schema.ts';

export const USED_PROOFS_TABLE = `${AUDIT_SCHEMA}.used_proofs`;
export const PRUNE_FUNCTION = `${AUDIT_SCHEMA}.prune_used_proofs()`;
/** How often each broker prunes expired rows. */
const PRUNE_EVERY_MS = 10 * 60_000;
/** INSERTs in flight at once; proofs that arrive meanwhile go together in the next (group commit). */
const MAX_IN_FLIGHT = 2;
const MAX_BATCH = 500;

interface Waiting {
  id: Buffer;
  exp: number;
  done: (first: boolean) => void;
  fail: (err: unknown) => void;
}

/** What this needs of the PostgreSQL audit store: a query on its pool (PostgresAuditStore.proofLedgerQuery). */
export interface LedgerDatabase {
  readonly where: string;
  proofLedgerQuery(text: string, values?: unknown[]): Promise<{ rowCount: number | null; rows: Array<Record<string, unknown>> }>;
}

/**
 * The statements `broker audit migrate` runs for the table (in its transaction, as the owner),
 * `roles` already quoted as identifiers.
 */
export function usedProofsMigration(roles: string[]): string[] {
  return [
    `CREATE TABLE IF NOT EXISTS ${USED_PROOFS_TABLE} (id bytea PRIMARY KEY, expires timestamptz NOT NULL)`,
    ...expiringTablesMigration([USED_PROOFS_TABLE], PRUNE_FUNCTION, roles),
  ];
}

/** The used-proof table of one store, shared by every broker on it. */
export class SharedUsedProofs {
  readonly #db: LedgerDatabase;
  #timer: NodeJS.Timeout | undefined;
  readonly #queue: Waiting[] = [];
  #inFlight = 0;

  constructor(db: LedgerDatabase) {
    this.#db = db;
  }

  /**
   * True when this is the proof's first use on any replica (its row is inserted now). Rejects with
   * audit_unavailable when the store cannot say: a proof is never taken on a guess. One statement
   * inserts every proof that arrived while the previous ones were in flight; the ids it returns are
   * those inserted, the first uses.
   */
  firstUse(agent: string, jti: string, exp: number): Promise<boolean> {
    // The authenticator took it only within a minute of now; anything else never reaches the query's text.
    if (!Number.isSafeInteger(exp) || exp <= 0) return Promise.resolve(false);
    const id = createHash('sha256').update(agent).update('\0').update(jti).digest();
    return new Promise((done, fail) => {
      this.#queue.push({ id, exp, done, fail });
      this.#flush();
    });
  }

  #flush(): void {
    if (this.#inFlight >= MAX_IN_FLIGHT || this.#queue.length === 0) return;
    const batch = this.#queue.splice(0, MAX_BATCH);
    this.#inFlight++;
    // One simple-protocol query (no Parse/Bind round of its own): every value is ours, hex and a number.
    const rows = batch.map((w) => `('\\x${w.id.toString('hex')}'::bytea, to_timestamp(${w.exp}))`).join(',');
    this.#db
      .proofLedgerQuery(`INSERT INTO ${USED_PROOFS_TABLE} (id, expires) VALUES ${rows} ON CONFLICT (id) DO NOTHING RETURNING id`)
      .then(
        (r) => {
          const inserted = new Set(r.rows.map((row) => (row['id'] as Buffer).toString('hex')));
          for (const w of batch) w.done(inserted.delete(w.id.toString('hex'))); // the same id twice in a batch: first use once
        },
        (err: unknown) => {
          const refused = ledgerError(this.#db.where, err);
          for (const w of batch) w.fail(refused);
        },
      )
      .finally(() => {
        this.#inFlight--;
        this.#flush();
      });
  }

  /** Deletes expired rows now (through the owner's function); the number deleted. */
  async prune(): Promise<number> {
    try {
      const r = await this.#db.proofLedgerQuery(`SELECT ${PRUNE_FUNCTION} AS n`);
      return Number(r.rows[0]?.['n'] ?? 0);
    } catch (err) {
      throw ledgerError(this.#db.where, err);
    }
  }

  /**
   * Prunes now and every ten minutes until stop(); a failure waits for the next time (an expired row is
   * harmless). The first one also tells a broker's log at start that the store lacks the table.
   */
  start(onError: (err: BrokerError) => void = () => undefined): void {
    if (this.#timer) return;
    const prune = () => void this.prune().catch(onError);
    this.#timer = setInterval(prune, PRUNE_EVERY_MS).unref();
    prune();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }
}

function ledgerError(where: string, err: unknown): BrokerError {
  if (lacksMigration(err)) {
    return new BrokerError('audit_unavailable', `the audit store ${where} has no table of used agent proofs: run \`broker audit migrate ${where}\` (it adds ${USED_PROOFS_TABLE})`, { cause: err });
  }
  return new BrokerError('audit_unavailable', `the audit store ${where} cannot record a used agent proof: ${errText(err)}`, { cause: err });
}

/** The shared table for a PostgreSQL audit store; undefined for the file log. */
export function sharedUsedProofs(audit: object): SharedUsedProofs | undefined {
  return 'proofLedgerQuery' in audit && 'where' in audit ? new SharedUsedProofs(audit as LedgerDatabase) : undefined;
}
