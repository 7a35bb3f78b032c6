/**
 * What `broker audit migrate` (src/audit/postgres.ts) adds to a PostgreSQL audit store for the web
 * console (docs/console.md), all safe to run twice:
 *
 * - Two partial expression indexes on the audit table, so that a task's page reads only rows about
 *   that task (src/console/store-timeline.ts): the task and approval records by agent and task name
 *   (those that tie a request to a task before it has an id), and the approval records that name
 *   only their approval request, by its id. The task's own rows are found by the index on `task`.
 *   Inserting a row that is neither costs one test of its type.
 * - The shared sessions (src/console/shared-sessions.ts): `console_sessions` (one row per sign-in:
 *   SHA-256 of the cookie's random id, the person as signed in, SHA-256 of the CSRF token, expiry)
 *   and `console_signouts` (one row per sign-out: SHA-256 of the id, the session's expiry). The
 *   brokers' role may only SELECT and INSERT them; expired rows are deleted by
 *   `task_broker.prune_console_sessions()`, a SECURITY DEFINER function owned by the migrating role
 *   that deletes only rows expired five minutes or more, which migrate runs and each broker calls
 *   every 10 minutes. Rows left there are harmless anyway: every read asks for an unexpired session.
 *
 * No import from src/audit/postgres.ts (which imports this module): the names from src/audit/store-schema.ts.
 */
import { AUDIT_SCHEMA, AUDIT_TABLE, expiringTablesMigration } from '../audit/store-schema.ts';

export const SESSIONS_TABLE = `${AUDIT_SCHEMA}.console_sessions`;
export const SIGNOUTS_TABLE = `${AUDIT_SCHEMA}.console_signouts`;
export const PRUNE_SESSIONS = `${AUDIT_SCHEMA}.prune_console_sessions()`;

/** The records that may tie a request to a task (show.ts buildStories): task and approval records. */
export const LIFECYCLE = `(type LIKE 'task.%' OR type LIKE 'approval.%')`;
/** The key's first two parts (agent, task name; a refused start without a name asked for the template's). Index expressions: the queries repeat them exactly. */
export const AGENT_EXPR = `((line::jsonb) ->> 'agent')`;
export const NAME_EXPR = `(COALESCE((line::jsonb) ->> 'taskName', CASE WHEN type = 'task.refused' THEN (line::jsonb) ->> 'template' END))`;
/** The approval request an approval record names (show.ts approvalIdOf). */
export const APPROVAL_EXPR = `(COALESCE((line::jsonb) -> 'details' ->> 'approvalRequest', (line::jsonb) -> 'details' ->> 'approvalId'))`;

/** The statements `broker audit migrate` runs for the console (roles already quoted as identifiers). Each is safe to run twice. */
export function consoleMigration(roles: string[]): string[] {
  return [
    `CREATE INDEX IF NOT EXISTS audit_story_key ON ${AUDIT_TABLE} (${AGENT_EXPR}, ${NAME_EXPR}, seq) WHERE ${LIFECYCLE}`,
    `CREATE INDEX IF NOT EXISTS audit_approval ON ${AUDIT_TABLE} (${APPROVAL_EXPR}, seq) WHERE task IS NULL AND type LIKE 'approval.%'`,
    `CREATE TABLE IF NOT EXISTS ${SESSIONS_TABLE} (
      id bytea PRIMARY KEY,
      caller jsonb NOT NULL,
      issuer text NOT NULL,
      csrf bytea NOT NULL,
      created timestamptz NOT NULL DEFAULT now(),
      expires timestamptz NOT NULL
    )`,
    `CREATE TABLE IF NOT EXISTS ${SIGNOUTS_TABLE} (id bytea PRIMARY KEY, expires timestamptz NOT NULL, at timestamptz NOT NULL DEFAULT now())`,
    ...expiringTablesMigration([SESSIONS_TABLE, SIGNOUTS_TABLE], PRUNE_SESSIONS, roles),
  ];
}

