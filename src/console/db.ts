/**
 * The console's own small connection pool to a PostgreSQL audit store (`broker serve --ui
 * --audit-store postgres://...`): two connections, so the console's reads never queue behind the
 * audit appends, nor they behind it. The tables and indexes it reads are made by `broker audit
 * migrate` (src/console/migration.ts).
 */
import pg from 'pg';
import { BrokerError, errText } from '../errors.ts';
import { redactUrl } from '../audit/postgres.ts';
import { lacksMigration } from '../audit/store-schema.ts';

/** The console's connections to the store. */
export class ConsoleDatabase {
  readonly where: string;
  readonly #pool: pg.Pool;

  constructor(url: string, options: { statementTimeoutMs?: number } = {}) {
    this.where = redactUrl(url);
    const statementTimeout = options.statementTimeoutMs ?? 5000;
    this.#pool = new pg.Pool({
      connectionString: url,
      max: 2,
      connectionTimeoutMillis: 3000,
      idleTimeoutMillis: 10_000,
      statement_timeout: statementTimeout,
      query_timeout: statementTimeout + 1000,
      application_name: 'task-broker console',
    });
    // An idle client whose server went away emits here; without a listener it would end the process.
    this.#pool.on('error', () => undefined);
  }

  /** A query; a failure is audit_unavailable (the store's URL without its password in the message), a missing table names migrate. */
  async query<R extends pg.QueryResultRow>(text: string, values?: unknown[]): Promise<pg.QueryResult<R>> {
    try {
      return await this.#pool.query<R>(text, values);
    } catch (err) {
      if (lacksMigration(err)) {
        throw new BrokerError('audit_unavailable', `the audit store ${this.where} lacks the console's tables: run \`broker audit migrate\` (this broker's version) first`, { cause: err });
      }
      throw new BrokerError('audit_unavailable', `the audit store ${this.where} cannot be read for the console: ${errText(err)}`, { cause: err });
    }
  }

  close(): Promise<void> {
    return this.#pool.end().catch(() => undefined);
  }
}
