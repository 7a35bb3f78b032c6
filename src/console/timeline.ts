/**
 * What the console's task page shows from the audit log file: the task's story, as
 * `broker audit show --task` builds it (src/audit/show.ts: the same grouping and the same words), and
 * whether the whole chain verifies (src/audit/verify.ts, incrementally: only what was appended since
 * the last look is read, and nothing is kept but the verdict).
 *
 * A task's records are found by one pass over the file that parses only the lines that can belong to
 * it (those naming its id, and the task and approval records that tie a request to a task before it
 * has one), so a page costs one read of the file whatever the log's size, and memory only for that
 * task's records. The page shows them a page at a time.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { AuditReader, buildStories, eventMicros, summarize, type Story, type Summary } from '../audit/show.ts';
import type { AuditRecord, JsonValue, VerifyResult } from '../audit/types.ts';
import { recordingFrames } from '../audit/recordings.ts';
import { terminalText } from './html.ts';

/**
 * The chain's verdict, brought up to date on each call by one incremental reader: the file's
 * (AuditReader) or the PostgreSQL store's (PostgresAuditReader), as `broker audit verify` reads them.
 * One check at a time; callers during a check share it.
 */
export class ChainStatus {
  readonly #catchUp: () => Promise<VerifyResult>;
  #running: Promise<VerifyResult> | undefined;

  /** `catchUp` reads what was appended since its last call, keeping only the verdict, and returns it. */
  constructor(catchUp: () => Promise<VerifyResult>) {
    this.#catchUp = catchUp;
  }

  /** Over the audit log at `path`. */
  static ofFile(path: string): ChainStatus {
    const reader = new AuditReader(path);
    // The records are dropped at once: only the verdict is kept.
    return new ChainStatus(async () => {
      while ((await reader.read()).length > 0);
      return reader.result(false);
    });
  }

  /** The verdict if it is known within `ms` (the first pass over a large log takes a while), else undefined. */
  async within(ms: number): Promise<VerifyResult | undefined> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<undefined>((done) => (timer = setTimeout(() => done(undefined), ms)));
    try {
      return await Promise.race([this.check(), late]);
    } finally {
      clearTimeout(timer);
    }
  }

  check(): Promise<VerifyResult> {
    this.#running ??= this.#catchUp().finally(() => (this.#running = undefined));
    return this.#running;
  }
}

/** The last few tasks' stories, each kept while the log has not grown since (pages 2..N, reloads of an ended task's page). */
const recent = new Map<string, { path: string; size: number; mtimeMs: number; result: Promise<{ story: Story; summary: Summary } | undefined> }>();

/** The story of task `id` from the log at `path`, or undefined when the log has no record of it. */
export async function taskStory(path: string, id: string): Promise<{ story: Story; summary: Summary } | undefined> {
  const st = await stat(path);
  const hit = recent.get(id);
  if (hit && hit.path === path && hit.size === st.size && hit.mtimeMs === st.mtimeMs) return hit.result;
  const result = readStory(path, id);
  recent.delete(id);
  recent.set(id, { path, size: st.size, mtimeMs: st.mtimeMs, result });
  while (recent.size > 8) recent.delete(recent.keys().next().value!);
  result.catch(() => recent.delete(id));
  return result;
}

async function readStory(path: string, id: string): Promise<{ story: Story; summary: Summary } | undefined> {
  const records: AuditRecord[] = [];
  const quotedId = JSON.stringify(id);
  let carry = '';
  const take = (line: string) => {
    // Lines that may belong to the task: its own, and the task and approval records of requests before it had an id.
    if (line.includes(quotedId) || line.includes('"type":"task.') || line.includes('"type":"approval.')) {
      try {
        records.push(JSON.parse(line) as AuditRecord);
      } catch {
        // a torn last line: the chain's verdict reports it
      }
    }
  };
  for await (const chunk of createReadStream(path, { encoding: 'utf8', highWaterMark: 1 << 20 })) {
    const text = carry + (chunk as string);
    let start = 0;
    for (let nl = text.indexOf('\n'); nl !== -1; nl = text.indexOf('\n', start)) {
      take(text.slice(start, nl));
      start = nl + 1;
    }
    carry = text.slice(start);
  }
  if (carry) take(carry);
  const story = buildStories(records).stories.find((s) => s.id === id);
  return story ? { story, summary: summarize(story.records) } : undefined;
}

function detail(r: AuditRecord, key: string): string | undefined {
  const v: JsonValue | undefined = r.details?.[key];
  return typeof v === 'string' ? v : typeof v === 'number' ? String(v) : undefined;
}

/** The time of a record as the timeline shows it (API requests by when the API server received them). */
export function recordTime(r: AuditRecord): string {
  return new Date(Math.floor(eventMicros(r) / 1000)).toISOString();
}

/** The kubectl invocation a request was part of (KEP 859 headers, as the proxy records them), if known. */
export function kubectlOf(r: AuditRecord): { session: string; command: string } | undefined {
  const session = r.type === 'k8s.request' ? detail(r, 'kubectlSession') : undefined;
  return session === undefined ? undefined : { session, command: detail(r, 'kubectlCommand') ?? 'kubectl' };
}

/** An exec or attach session's recording that a stream's end record names. */
export function recordingOf(r: AuditRecord): { file: string; sha256: string; kind: string } | undefined {
  if (r.type !== 'k8s.request' || detail(r, 'phase') !== 'end') return undefined;
  const stream = r.details?.['stream'];
  const kind = stream && typeof stream === 'object' && !Array.isArray(stream) ? stream['kind'] : undefined;
  const rec = r.details?.['recording'];
  if ((kind !== 'exec' && kind !== 'attach') || !rec || typeof rec !== 'object' || Array.isArray(rec)) return undefined;
  const file = rec['file'];
  const sha256 = rec['sha256'];
  if (typeof file !== 'string' || typeof sha256 !== 'string' || !/^[\w-]+\.jsonl$/.test(file)) return undefined;
  return { file, sha256, kind };
}

export interface PlayerEvent {
  /** Milliseconds since the session began. */
  t: number;
  /** `in`: typed (stdin); `out`: stdout; `err`: stderr; `end`: the command's final status. */
  kind: 'in' | 'out' | 'err' | 'end';
  /** Inert text (terminalText): control characters visible, never obeyed. */
  text: string;
}

export type RecordingResult = { ok: true; events: PlayerEvent[] } | { ok: false; problem: string };

/** A session recording for the player, checked against the SHA-256 the audit log holds for it. */
export async function readRecording(dir: string, file: string, sha256: string): Promise<RecordingResult> {
  if (!/^[\w-]+\.jsonl$/.test(file)) return { ok: false, problem: 'not a recording\'s name' };
  let raw: Buffer;
  try {
    raw = await readFile(join(dir, file));
  } catch (err) {
    return { ok: false, problem: `it cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'})` };
  }
  if (createHash('sha256').update(raw).digest('hex') !== sha256) return { ok: false, problem: 'its SHA-256 does not match the audit log: it was changed after the session' };
  const events: PlayerEvent[] = [];
  const kinds = { stdin: 'in', stdout: 'out', stderr: 'err' } as const;
  for (const frame of recordingFrames(raw)) {
    const t = frame.t ?? events.at(-1)?.t ?? 0;
    if (frame.channel === 'end') {
      events.push({ t, kind: 'end', text: terminalText(frame.success ? 'exited: success' : `exited: ${frame.message}`) });
    } else if (frame.data !== '') {
      events.push({ t, kind: kinds[frame.channel], text: terminalText(frame.data) });
    }
  }
  return { ok: true, events };
}
