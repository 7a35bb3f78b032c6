/**
 * The audit record: its fields, their order on the line, and the values they take. docs/audit.md
 * describes the same format for people and outside tools; keep the two in step.
 */

/** `prev` of the first record: 64 zeros. */
export const GENESIS_HASH = '0'.repeat(64);

/**
 * What happened. An open union: the listed types are the ones the broker writes today; `approval.*`
 * covers the approval workflow (requested, granted, denied, ...). Any other dotted string is allowed.
 */
export type AuditEventType =
  | 'task.started'
  | 'task.refused'
  | 'credential.minted'
  | 'credential.served'
  | 'credential.refused'
  | 'session.issued'
  | 'task.ended'
  | 'task.expired'
  | 'auth.failed'
  | 'policy.applied'
  | `approval.${string}`
  | 'k8s.request'
  | (string & {});

export type AuditOutcome = 'allowed' | 'denied' | 'error' | 'ok';

export const AUDIT_OUTCOMES: readonly AuditOutcome[] = ['allowed', 'denied', 'error', 'ok'];

export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** What a caller of `AuditLog.append` supplies; the log adds `seq`, `time`, `prev` and `hash`. */
export interface AuditEventInput {
  type: AuditEventType;
  /** Who asked: `agent:NAME`, `user:NAME`, `system:sweeper`, ... */
  actor: string;
  /** The agent the event is about (may differ from the actor, e.g. the sweeper expiring a task). */
  agent?: string | undefined;
  /** Task id. */
  task?: string | undefined;
  taskName?: string | undefined;
  template?: string | undefined;
  namespace?: string | undefined;
  outcome?: AuditOutcome | undefined;
  /** Why (a refusal's error code and message, an expiry, ...). Free text, never a secret. */
  reason?: string | undefined;
  /** The minted token's JWT ID: the token itself is never recorded. */
  jti?: string | undefined;
  /** ISO 8601 expiry of the credential or task. */
  expiresAt?: string | undefined;
  /** The broker API request the event belongs to. */
  requestId?: string | undefined;
  /** A small JSON object of further facts (at most 8 KiB serialized). */
  details?: { [key: string]: JsonValue } | undefined;
}

/** A record as written: one JSON line. */
export interface AuditRecord {
  seq: number;
  /** ISO 8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.000Z. */
  time: string;
  type: AuditEventType;
  actor: string;
  agent?: string;
  task?: string;
  taskName?: string;
  template?: string;
  namespace?: string;
  outcome?: AuditOutcome;
  reason?: string;
  jti?: string;
  expiresAt?: string;
  requestId?: string;
  details?: { [key: string]: JsonValue };
  /** `hash` of the previous record, or GENESIS_HASH for the first. */
  prev: string;
  /** SHA-256 (lowercase hex) of the canonical JSON of this record without `hash`. */
  hash: string;
}

/**
 * The canonical order of a record's fields, which is also the order on the line. Fields not listed
 * here (the broker writes none) come after `details` in code-unit order, then `prev`; `hash` is last
 * on the line and not part of the hashed text.
 */
export const RECORD_FIELD_ORDER = [
  'seq',
  'time',
  'type',
  'actor',
  'agent',
  'task',
  'taskName',
  'template',
  'namespace',
  'outcome',
  'reason',
  'jti',
  'expiresAt',
  'requestId',
  'details',
] as const;

type OptionalStringField = Exclude<(typeof RECORD_FIELD_ORDER)[number], 'seq' | 'time' | 'type' | 'actor' | 'details'>;
const REQUIRED_OR_OBJECT: readonly string[] = ['seq', 'time', 'type', 'actor', 'details'];

/** The optional string fields of an event, in record order: RECORD_FIELD_ORDER less the others. */
export const OPTIONAL_STRING_FIELDS: readonly (OptionalStringField & keyof AuditEventInput)[] = RECORD_FIELD_ORDER.filter(
  (k): k is OptionalStringField => !REQUIRED_OR_OBJECT.includes(k),
);

/** The result of walking a chain (verify.ts). */
export type VerifyResult =
  | { ok: true; records: number; lastHash: string }
  | {
      ok: false;
      /** Valid records before the break. */
      records: number;
      /** 1-based line of the first record that does not hold. */
      line: number;
      seq?: number;
      reason: string;
    };
