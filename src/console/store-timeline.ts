/**
 * The task page's story and chain verdict from a PostgreSQL audit store: the same story as
 * `broker audit show --task ID` builds (src/audit/show.ts buildStories, fed the rows that can belong
 * to the task), read through indexes so that a page costs the task's own rows, not the table's:
 *
 * 1. the task's rows (the audit table's index on `task`);
 * 2. the task and approval records of the same agent and task name (index audit_story_key, db.ts)
 *    from the last record of another task of that key before this task's first record (where the
 *    requests and refusals that came before this task begin) to this task's last record; the walk
 *    back stops after MAX_WALK such rows (the records before then are not shown on the page;
 *    `broker audit show` still has them);
 * 3. the approval records that name only an approval request this task's records name (index
 *    audit_approval).
 *
 * Then buildStories over those rows in seq order, as over the file's lines. A task's story is kept
 * (8 tasks) while the chain has no new row, for pages 2..N and reloads.
 *
 * The chain's verdict: PostgresAuditReader (as `broker audit verify`), incrementally: each check reads
 * only the rows appended since the last one, and keeps nothing but the verdict.
 */
import { buildStories, summarize, type Story, type Summary } from '../audit/show.ts';
import { AUDIT_TABLE, PostgresAuditReader } from '../audit/postgres.ts';
import type { AuditRecord } from '../audit/types.ts';
import type { ConsoleDatabase } from './db.ts';
import { ChainStatus } from './timeline.ts';
import { AGENT_EXPR, APPROVAL_EXPR, LIFECYCLE, NAME_EXPR } from './migration.ts';

/** Rows of the same agent and task name read back before the task's first record, at most. */
export const MAX_WALK = 5000;
const WALK_CHUNK = 500;

type Row = { seq: string; line: string };
export type Found = { story: Story; summary: Summary };

/** The chain's verdict over the whole table, brought up to date on each call (one reader, incremental). */
export function storeChainStatus(url: string): ChainStatus {
  const reader = new PostgresAuditReader(url);
  return new ChainStatus(async () => {
    await reader.read({ keep: false });
    return reader.result(false);
  });
}

export class StoreStories {
  readonly #db: ConsoleDatabase;
  readonly #recent = new Map<string, { last: string | null; result: Promise<Found | undefined> }>();

  constructor(db: ConsoleDatabase) {
    this.#db = db;
  }

  /** The story of task `id`, or undefined when the store has no record of it. */
  async taskStory(id: string): Promise<Found | undefined> {
    const last = (await this.#db.query<{ seq: string | null }>(`SELECT max(seq)::text AS seq FROM ${AUDIT_TABLE}`)).rows[0]?.seq ?? null;
    const hit = this.#recent.get(id);
    if (hit && hit.last === last) return hit.result;
    const result = this.#read(id);
    this.#recent.delete(id);
    this.#recent.set(id, { last, result });
    while (this.#recent.size > 8) this.#recent.delete(this.#recent.keys().next().value!);
    result.catch(() => this.#recent.delete(id));
    return result;
  }

  async #read(id: string): Promise<Found | undefined> {
    const rows = new Map<string, string>();
    const own = (await this.#db.query<Row>(`SELECT seq, line FROM ${AUDIT_TABLE} WHERE task = $1 ORDER BY seq`, [id])).rows;
    if (own.length === 0) return undefined;
    for (const r of own) rows.set(r.seq, r.line);
    const first = own[0]!.seq;
    const lastOwn = own.at(-1)!.seq;
    // The task's key, as buildStories takes it: from its records in order, each field from the first that has it.
    const key: { agent?: string | undefined; name?: string | undefined; template?: string | undefined; namespace?: string | undefined } = {};
    for (const r of own) {
      const rec = JSON.parse(r.line) as AuditRecord;
      key.name ??= rec.taskName;
      key.agent ??= rec.agent;
      key.template ??= rec.template;
      key.namespace ??= rec.namespace;
    }
    if (key.agent !== undefined && key.name !== undefined) {
      // Back from the first record: stop at another task of the same key (what came before it is that task's).
      let before = first;
      for (let walked = 0; walked < MAX_WALK; ) {
        const chunk = (
          await this.#db.query<Row & { task: string | null }>(
            `SELECT seq, line, task FROM ${AUDIT_TABLE} WHERE ${LIFECYCLE} AND ${AGENT_EXPR} = $1 AND ${NAME_EXPR} = $2 AND seq < $3 ORDER BY seq DESC LIMIT ${WALK_CHUNK}`,
            [key.agent, key.name, before],
          )
        ).rows;
        let boundary = false;
        for (const r of chunk) {
          if (r.task !== null && r.task !== id) {
            const rec = JSON.parse(r.line) as AuditRecord;
            if (rec.template === key.template && rec.namespace === key.namespace) {
              boundary = true;
              rows.set(r.seq, r.line); // it claims what came before it
              break;
            }
          }
          rows.set(r.seq, r.line);
        }
        walked += chunk.length;
        if (boundary || chunk.length < WALK_CHUNK) break;
        before = chunk.at(-1)!.seq;
      }
      // Between the task's first and last records: requests of the same key that its later records claim (or another task's).
      const between = await this.#db.query<Row>(
        `SELECT seq, line FROM ${AUDIT_TABLE} WHERE ${LIFECYCLE} AND ${AGENT_EXPR} = $1 AND ${NAME_EXPR} = $2 AND seq > $3 AND seq < $4`,
        [key.agent, key.name, first, lastOwn],
      );
      for (const r of between.rows) rows.set(r.seq, r.line);
    }
    const story = storyOf(rows, id);
    if (!story) return undefined;
    // Approval records that name only their request: those of requests this task's story names.
    const approvals = new Set<string>();
    for (const r of story.records) {
      for (const k of ['approvalRequest', 'approvalId']) {
        const v = r.details?.[k];
        if (typeof v === 'string') approvals.add(v);
      }
    }
    if (approvals.size > 0) {
      const named = await this.#db.query<Row>(
        `SELECT seq, line FROM ${AUDIT_TABLE} WHERE task IS NULL AND type LIKE 'approval.%' AND ${APPROVAL_EXPR} = ANY($1::text[])`,
        [[...approvals]],
      );
      let added = false;
      for (const r of named.rows) if (!rows.has(r.seq)) (rows.set(r.seq, r.line), (added = true));
      if (added) {
        const whole = storyOf(rows, id);
        if (whole) return { story: whole, summary: summarize(whole.records) };
      }
    }
    return { story, summary: summarize(story.records) };
  }
}

function storyOf(rows: Map<string, string>, id: string): Story | undefined {
  const records = [...rows.entries()].sort((a, b) => Number(a[0]) - Number(b[0])).map(([, line]) => JSON.parse(line) as AuditRecord);
  return buildStories(records).stories.find((s) => s.id === id);
}
