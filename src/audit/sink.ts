/**
 * What the broker's services need of an audit store: append a record (resolving only once it is
 * durable) and say whether appending can work now. The file log (log.ts, AuditLog) and the
 * PostgreSQL store (postgres.ts, PostgresAuditStore) both give it; the task service, the approvals,
 * the proxy, the routes and the webhook depend on this and nothing more.
 */
import type { AuditEventInput, AuditRecord } from './types.ts';

export interface AuditSink {
  /**
   * Resolves with the record once it is on stable storage; rejects with audit_unavailable when it
   * cannot be made so (the caller then answers 503 and acts on nothing), with internal for a
   * malformed event.
   */
  append(event: AuditEventInput): Promise<AuditRecord>;
  /** False while appends are refused (the broker refuses to mint before even trying). */
  readonly healthy: boolean;
}
