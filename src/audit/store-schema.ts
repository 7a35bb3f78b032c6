/**
 * The PostgreSQL audit store's names, and the shape `broker audit migrate` gives the insert-only
 * tables whose rows expire (the used agent proofs, src/identity/proof-replay.ts; the web console's
 * sessions, src/console/migration.ts): nothing for PUBLIC; the brokers' roles may SELECT and INSERT,
 * never UPDATE, DELETE or TRUNCATE, and may EXECUTE one function, owned by the migrating role
 * (SECURITY DEFINER), that deletes only rows expired five minutes or more.
 *
 * No imports: src/audit/postgres.ts and the modules whose migrations it runs all use it.
 */
export const AUDIT_SCHEMA = 'task_broker';
export const AUDIT_TABLE = `${AUDIT_SCHEMA}.audit`;
/** The function the brokers append a batch with (src/audit/postgres.ts appendFunctionSql), and its argument types. */
export const AUDIT_APPEND = `${AUDIT_SCHEMA}.append_audit`;
export const AUDIT_APPEND_SIGNATURE = `${AUDIT_APPEND}(bigint, text, timestamptz, text[], text[], text[], text)`;

/** Whether a command's argument names a PostgreSQL audit store (postgres:// or postgresql://) rather than a file. */
export function isPostgresUrl(value: string): boolean {
  return /^postgres(ql)?:\/\//i.test(value);
}

/** Whether a driver error says the store lacks a schema, table or function that `broker audit migrate` makes. */
export function lacksMigration(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === '42P01' || code === '42883' || code === '3F000';
}

/**
 * The statements after the tables' CREATE TABLE (each with an `expires timestamptz` column): their
 * grants, and the function `prune` that deletes their expired rows and returns how many, run once
 * now. `roles` already quoted as identifiers. Safe to run twice.
 */
export function expiringTablesMigration(tables: string[], prune: string, roles: string[]): string[] {
  const deletes = tables.map((t, i) => `d${i} AS (DELETE FROM ${t} WHERE expires < now() - interval '5 minutes' RETURNING 1)`);
  return [
    ...tables.map((t) => `REVOKE ALL ON ${t} FROM PUBLIC`),
    // Deletes only what no broker accepts any more (expired; five minutes for clocks that differ).
    `CREATE OR REPLACE FUNCTION ${prune} RETURNS bigint LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
      WITH ${deletes.join(', ')} SELECT ${tables.map((_, i) => `(SELECT count(*) FROM d${i})`).join(' + ')}
    $$`,
    `REVOKE ALL ON FUNCTION ${prune} FROM PUBLIC`,
    ...roles.flatMap((r) => [
      `REVOKE UPDATE, DELETE, TRUNCATE ON ${tables.join(', ')} FROM ${r}`,
      `GRANT SELECT, INSERT ON ${tables.join(', ')} TO ${r}`,
      `GRANT EXECUTE ON FUNCTION ${prune} TO ${r}`,
    ]),
    `SELECT ${prune}`,
  ];
}
