/**
 * The audit log's checkpoint in the cluster: the head of the chain (seq and hash of the last durable
 * record) kept in a ConfigMap in the broker's own namespace, so that a log removed, replaced or cut
 * while the broker was down is caught when it starts again. The chain alone cannot show this: a
 * missing file starts a new, valid chain at seq 0, and a file cut to its first lines still verifies.
 *
 * - Object: ConfigMap `task-broker-audit-head-<id>` in `policy.broker.namespace`, data
 *   `{seq, hash, path, host, updatedAt}` (strings). `id` is a short hash of the broker's hostname and
 *   the log's absolute path: each replica writes a file of its own today, so each file has its own
 *   head (a store shared by replicas is a later issue). The same host and path find the same object
 *   again across restarts.
 * - Written by the broker when the head moves, at most once a second from an unref'd timer (never in
 *   a request's path), and once more on close. It records only records already on stable storage
 *   (AuditLog.durableHead), so it is never ahead of the file.
 * - Checked at start, before anything is appended: the log must hold record `seq` with exactly
 *   `hash`. Otherwise the broker refuses to start (audit_checkpoint_mismatch, naming expected and
 *   found), unless started with `--accept-audit-reset`: then the first record it appends is
 *   `audit.reset`, holding the old head and what was found, so the reset itself is on record.
 *
 * RBAC: get, create and update on configmaps in the broker's namespace.
 */
import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import type * as k8s from '@kubernetes/client-node';
import { BrokerError } from '../errors.ts';
import { apiStatus, clusterError, isConflict, isNotFound } from '../kube/config.ts';
import { LABEL, MANAGED_BY } from '../tasks/model.ts';
import { AuditLog, type AuditLogOptions } from './log.ts';

export const AUDIT_HEAD_PREFIX = 'task-broker-audit-head-';
const COMPONENT_LABEL = 'task-broker.dev/component';
const HEX64 = /^[0-9a-f]{64}$/;

/** The checkpoint as the ConfigMap holds it. */
export interface AuditHead {
  seq: number;
  hash: string;
  /** The log's absolute path, on `host`. */
  path: string;
  host: string;
  /** ISO 8601, when the broker wrote it. */
  updatedAt: string;
}

/** What the checkpoint needs of the CoreV1Api (a fake in unit tests). */
export type ConfigMapApi = Pick<k8s.CoreV1Api, 'readNamespacedConfigMap' | 'createNamespacedConfigMap' | 'replaceNamespacedConfigMap'>;

/**
 * The ConfigMap name for a log: a short hash (16 hex digits) of the host name and the log's absolute
 * path. Per host and path because each replica keeps its own file today.
 */
export function auditHeadName(host: string, absPath: string): string {
  return AUDIT_HEAD_PREFIX + createHash('sha256').update(`${host}\n${absPath}`).digest('hex').slice(0, 16);
}

/** Reads and writes one checkpoint object. */
export class AuditHeadStore {
  readonly namespace: string;
  readonly name: string;
  readonly #api: ConfigMapApi;
  #resourceVersion: string | undefined;
  #exists = false;

  constructor(api: ConfigMapApi, namespace: string, name: string) {
    this.#api = api;
    this.namespace = namespace;
    this.name = name;
  }

  /** `NAMESPACE/NAME`, for messages. */
  get ref(): string {
    return `ConfigMap ${this.namespace}/${this.name}`;
  }

  /**
   * The checkpoint, undefined when there is none, or `{ malformed }` when the object exists but its
   * data is not a checkpoint. A failed read is cluster_unavailable: without it nothing can be checked.
   */
  async read(): Promise<AuditHead | { malformed: string } | undefined> {
    let cm: k8s.V1ConfigMap;
    try {
      cm = await this.#api.readNamespacedConfigMap({ name: this.name, namespace: this.namespace });
    } catch (err) {
      if (isNotFound(err)) {
        this.#exists = false;
        this.#resourceVersion = undefined;
        return undefined;
      }
      const e = clusterError(`reading the audit checkpoint ${this.ref}`, err);
      if (apiStatus(err) !== 403) throw e;
      throw new BrokerError('cluster_unavailable', `${e.message}: the broker needs get, create and update on configmaps in namespace ${this.namespace} (run \`broker policy apply\`)`, { cause: err });
    }
    this.#exists = true;
    this.#resourceVersion = cm.metadata?.resourceVersion;
    return parseHead(cm.data ?? {});
  }

  /**
   * Writes the checkpoint: replaces the object (at the resourceVersion last seen) or creates it. On
   * a conflict the next write starts from a fresh read.
   */
  async write(head: AuditHead): Promise<void> {
    const body: k8s.V1ConfigMap = {
      metadata: {
        name: this.name,
        namespace: this.namespace,
        labels: { [LABEL.managedBy]: MANAGED_BY, [COMPONENT_LABEL]: 'audit-head' },
        ...(this.#resourceVersion ? { resourceVersion: this.#resourceVersion } : {}),
      },
      data: { seq: String(head.seq), hash: head.hash, path: head.path, host: head.host, updatedAt: head.updatedAt },
    };
    try {
      const out = this.#exists
        ? await this.#api.replaceNamespacedConfigMap({ name: this.name, namespace: this.namespace, body })
        : await this.#api.createNamespacedConfigMap({ namespace: this.namespace, body });
      this.#exists = true;
      this.#resourceVersion = out.metadata?.resourceVersion;
    } catch (err) {
      if (isNotFound(err) && this.#exists) this.#exists = false; // removed meanwhile: create next time
      else if (isConflict(err)) await this.read().catch(() => undefined); // changed (or created) meanwhile
      throw clusterError(`writing the audit checkpoint ${this.ref}`, err);
    }
  }
}

function parseHead(data: Record<string, string>): AuditHead | { malformed: string } {
  const { seq, hash, path = '', host = '', updatedAt = '' } = data;
  if (seq === undefined || !/^\d{1,15}$/.test(seq)) return { malformed: `seq ${JSON.stringify(seq ?? null)} is not a record number` };
  if (hash === undefined || !HEX64.test(hash)) return { malformed: `hash ${JSON.stringify((hash ?? '').slice(0, 80))} is not 64 hex digits` };
  return { seq: Number(seq), hash, path, host, updatedAt };
}

/**
 * What is wrong with `log` given checkpoint `head` (opened with `checkpointSeq: head.seq`), or
 * undefined when the log holds record `head.seq` with exactly `head.hash`.
 */
export function headMismatch(head: Pick<AuditHead, 'seq' | 'hash'>, log: Pick<AuditLog, 'nextSeq' | 'lastHash' | 'created' | 'hashAtCheckpoint'>): string | undefined {
  const expected = `record seq ${head.seq} with hash ${head.hash}`;
  if (log.nextSeq <= head.seq) {
    const found =
      log.nextSeq === 0
        ? log.created
          ? 'no log at all (the file was missing)'
          : 'an empty log'
        : `a log of ${log.nextSeq} records ending at seq ${log.nextSeq - 1} with hash ${log.lastHash}`;
    return `expected ${expected}, found ${found}: the log was removed, replaced or cut`;
  }
  if (log.hashAtCheckpoint !== head.hash) {
    return `expected ${expected}, found hash ${log.hashAtCheckpoint ?? '(none)'} at seq ${head.seq}: the log was replaced or rewritten`;
  }
  return undefined;
}

export interface CheckpointerOptions {
  /** Default 1000 ms: the head is written at most this often. */
  intervalMs?: number;
  /** Where write failures are reported (once per distinct message); default stderr. */
  log?: (line: string) => void;
  /** How long close() waits for its last write. Default 5000 ms. */
  closeTimeoutMs?: number;
  host: string;
  path: string;
  now?: () => Date;
}

/** Writes the log's durable head to the store when it moves, at most once per interval, and on close. */
export class AuditCheckpointer {
  readonly #audit: AuditLog;
  readonly #store: AuditHeadStore;
  readonly #options: CheckpointerOptions;
  #timer: ReturnType<typeof setInterval> | undefined;
  #written: { seq: number; hash: string } | undefined;
  #inFlight: Promise<void> | undefined;
  #lastError: string | undefined;
  #closing: Promise<void> | undefined;

  constructor(audit: AuditLog, store: AuditHeadStore, written: { seq: number; hash: string } | undefined, options: CheckpointerOptions) {
    this.#audit = audit;
    this.#store = store;
    this.#written = written;
    this.#options = options;
  }

  /** The last head written (or found at start). */
  get written(): { seq: number; hash: string } | undefined {
    return this.#written;
  }

  /** The last write failure, until a write succeeds. */
  get lastError(): string | undefined {
    return this.#lastError;
  }

  start(): void {
    if (this.#timer || this.#closing) return;
    this.#timer = setInterval(() => void this.flush(), this.#options.intervalMs ?? 1000);
    this.#timer.unref();
  }

  /** Writes the durable head if it moved since the last write (one write at a time). Never throws. */
  flush(): Promise<void> {
    if (this.#inFlight) return this.#inFlight;
    const head = this.#audit.durableHead;
    if (!head || (this.#written && this.#written.seq === head.seq && this.#written.hash === head.hash)) return Promise.resolve();
    this.#inFlight = (async () => {
      try {
        await this.#store.write({ ...head, path: this.#options.path, host: this.#options.host, updatedAt: (this.#options.now?.() ?? new Date()).toISOString() });
        this.#written = head;
        if (this.#lastError) this.#report(`the audit checkpoint ${this.#store.ref} is written again (seq ${head.seq})`);
        this.#lastError = undefined;
      } catch (err) {
        const msg = err instanceof Error ? err.message : String(err);
        if (msg !== this.#lastError) this.#report(`${msg}; retrying every second`);
        this.#lastError = msg;
      } finally {
        this.#inFlight = undefined;
      }
    })();
    return this.#inFlight;
  }

  /** Stops the timer and writes the head a last time (after the log is closed, so it is final). Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#timer) clearInterval(this.#timer);
      this.#timer = undefined;
      const last = (async () => {
        await this.#inFlight;
        await this.flush();
      })();
      let timeout: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([last, new Promise<void>((done) => (timeout = setTimeout(done, this.#options.closeTimeoutMs ?? 5000)))]);
      clearTimeout(timeout);
    })();
    return this.#closing;
  }

  #report(line: string): void {
    (this.#options.log ?? ((l: string) => process.stderr.write(`broker: ${l}\n`)))(line);
  }
}

export interface OpenCheckedOptions {
  /** The log's path (made absolute for the checkpoint). */
  path: string;
  api: ConfigMapApi;
  /** The broker's own namespace (policy.broker.namespace). */
  namespace: string;
  /** `broker serve --accept-audit-reset`: start on a log that does not match its checkpoint, recording audit.reset. */
  acceptReset?: boolean;
  /** Default os.hostname(). */
  host?: string;
  log?: (line: string) => void;
  /** Passed to AuditLog.open (tests). */
  auditOptions?: AuditLogOptions;
  checkpointIntervalMs?: number;
}

/**
 * Opens the audit log and checks it against its cluster checkpoint before anything is appended
 * (refusing with audit_checkpoint_mismatch, or recording audit.reset with `acceptReset`), then starts
 * keeping the checkpoint. The caller closes the log, then the checkpointer.
 */
export async function openCheckedAuditLog(opts: OpenCheckedOptions): Promise<{ audit: AuditLog; checkpoint: AuditCheckpointer }> {
  const absPath = resolve(opts.path);
  const host = opts.host ?? hostname();
  const store = new AuditHeadStore(opts.api, opts.namespace, auditHeadName(host, absPath));
  const report = opts.log ?? ((l: string) => process.stderr.write(`broker: ${l}\n`));
  const head = await store.read();
  const valid = head && !('malformed' in head) ? head : undefined;
  if (head && !opts.acceptReset && !(await exists(absPath))) {
    // Refused without creating the file (AuditLog.open would): a refused start leaves nothing behind.
    const missing = { nextSeq: 0, lastHash: '', created: true, hashAtCheckpoint: undefined };
    throw mismatchError(absPath, store, valid, valid ? headMismatch(valid, missing)! : `the checkpoint is malformed: ${(head as { malformed: string }).malformed}`);
  }
  const audit = await AuditLog.open(opts.path, { ...opts.auditOptions, ...(valid ? { checkpointSeq: valid.seq } : {}) });
  try {
    let problem: string | undefined;
    if (head && 'malformed' in head) problem = `the checkpoint is malformed: ${head.malformed}`;
    else if (valid) problem = headMismatch(valid, audit);
    if (problem) {
      if (!opts.acceptReset) throw mismatchError(absPath, store, valid, problem);
      report(`${mismatchWhere(absPath, store, valid)}: ${problem}; starting anyway (--accept-audit-reset), recorded as audit.reset`);
      await audit.append({
        type: 'audit.reset',
        actor: 'system:broker',
        outcome: 'ok',
        reason: `started with --accept-audit-reset on a log that does not match its checkpoint: ${problem}`,
        details: {
          checkpoint: valid
            ? { object: `${store.namespace}/${store.name}`, seq: valid.seq, hash: valid.hash, host: valid.host, path: valid.path, updatedAt: valid.updatedAt }
            : { object: `${store.namespace}/${store.name}`, malformed: (head as { malformed: string }).malformed },
          found: {
            records: audit.nextSeq,
            lastHash: audit.lastHash,
            created: audit.created,
            ...(valid ? { hashAtSeq: audit.hashAtCheckpoint ?? null } : {}),
          },
        },
      });
    } else if (!head) {
      report(`no audit checkpoint ${store.ref} yet: starting one at ${audit.nextSeq === 0 ? 'the first record' : `seq ${audit.nextSeq - 1}`}`);
    }
    const checkpoint = new AuditCheckpointer(audit, store, valid && !problem ? { seq: valid.seq, hash: valid.hash } : undefined, {
      host,
      path: absPath,
      log: report,
      ...(opts.checkpointIntervalMs === undefined ? {} : { intervalMs: opts.checkpointIntervalMs }),
    });
    // After a reset the old checkpoint is replaced at once (not in a request's path: nothing is served yet).
    if (problem) await checkpoint.flush();
    checkpoint.start();
    return { audit, checkpoint };
  } catch (err) {
    await audit.close().catch(() => undefined);
    throw err;
  }
}

function mismatchWhere(absPath: string, store: AuditHeadStore, head: AuditHead | undefined): string {
  const by = head ? ` (written ${head.updatedAt || 'at an unknown time'} by ${head.host || 'an unknown host'})` : '';
  return `the audit log ${absPath} does not match its checkpoint ${store.ref}${by}`;
}

function mismatchError(absPath: string, store: AuditHeadStore, head: AuditHead | undefined, problem: string): BrokerError {
  return new BrokerError(
    'audit_checkpoint_mismatch',
    `${mismatchWhere(absPath, store, head)}: ${problem}. Keep what is left of the log for investigation; to start anyway on this log, run broker serve with --accept-audit-reset (the reset is recorded as audit.reset)`,
  );
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err; // AuditLog.open reports it
  }
}
