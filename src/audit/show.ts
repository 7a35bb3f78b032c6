/**
 * `broker audit show`: a task's whole story from the audit log, in time order — requested, approvals,
 * started, each credential minted and served, every API request the API server saw made with it
 * (`k8s.request`, from the audit webhook), ended. Pure apart from reading the file: read (verifying
 * the chain as it goes), select, format. No colour library here: the CLI passes a `Paint`.
 *
 * Everything in a record may have come from an agent (task names, reasons, request URIs, user
 * agents), so every field that reaches text output goes through `printable`, which escapes control
 * characters: a log line must never be able to drive the reader's terminal.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ChainVerifier } from './verify.ts';
import type { AuditRecord, JsonValue, VerifyResult } from './types.ts';
import { leftBehind, leftBehindLine } from './left-behind.ts';
import { recordingFrames } from './recordings.ts';
import { printable, safeJson } from '../text.ts';
export { printable, safeJson };

/** Record types that describe one API request, as the API server (or the proxy) reported it. */
export const REQUEST_TYPES: ReadonlySet<string> = new Set(['k8s.request']);

export interface ShowFilter {
  /** A task id, or a task name (every task of that name). */
  task?: string | undefined;
  /** Only this agent's tasks and records. */
  agent?: string | undefined;
  /** Only events at or after this time. */
  since?: Date | undefined;
}

/** The records of one task (or, `id` absent, attempts under one name that never became a task). */
export interface Story {
  id?: string | undefined;
  name?: string | undefined;
  agent?: string | undefined;
  template?: string | undefined;
  namespace?: string | undefined;
  /** In time order (API requests by when the API server received them). */
  records: AuditRecord[];
}

export interface Summary {
  records: number;
  /** API requests (`k8s.request` records). */
  requests: number;
  /** API requests the API server refused (outcome `denied`). */
  denied: number;
}

export interface Selection {
  stories: Story[];
  /** Selected records that belong to no task (authentication failures, policy changes, ...). */
  other: AuditRecord[];
  summary: Summary;
}

// ---------------------------------------------------------------------------------------------
// Reading

/**
 * Reads an audit file from where it last stopped, verifying the chain line by line. `read()` returns
 * the records that hold among the complete lines appended since; after a break it returns nothing
 * more, and `broken` says where. Used once by `show`, and again and again by `show --follow`.
 */
export class AuditReader {
  readonly path: string;
  readonly #verifier = new ChainVerifier();
  readonly #decoder = new TextDecoder('utf-8', { fatal: true });
  #offset = 0;
  #carry: Buffer = Buffer.alloc(0);
  #ino: number | undefined;
  #broken: Extract<VerifyResult, { ok: false }> | undefined;

  constructor(path: string) {
    this.path = path;
  }

  get broken(): Extract<VerifyResult, { ok: false }> | undefined {
    return this.#broken;
  }

  /** The records of the complete lines appended since the last call (none once broken). */
  async read(): Promise<AuditRecord[]> {
    if (this.#broken) return [];
    const st = await stat(this.path);
    if (this.#ino !== undefined && (st.ino !== this.#ino || st.size < this.#offset)) {
      this.#verifier.pushUnreadable(
        st.ino !== this.#ino ? 'the file was replaced while it was being read' : 'the file got shorter while it was being read (records were cut)',
      );
      this.#broken = this.#verifier.finish(false) as Extract<VerifyResult, { ok: false }>;
      return [];
    }
    this.#ino = st.ino;
    if (st.size === this.#offset) return [];
    const fh = await open(this.path, 'r');
    const out: AuditRecord[] = [];
    try {
      const buf = Buffer.allocUnsafe(1 << 20);
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, this.#offset);
        if (bytesRead === 0) break;
        this.#offset += bytesRead;
        let data = this.#carry.length > 0 ? Buffer.concat([this.#carry, buf.subarray(0, bytesRead)]) : buf.subarray(0, bytesRead);
        let start = 0;
        for (let nl = data.indexOf(0x0a); nl !== -1; nl = data.indexOf(0x0a, start)) {
          const record = this.#line(data.subarray(start, nl));
          if (this.#broken) return out;
          if (record) out.push(record);
          start = nl + 1;
        }
        data = data.subarray(start);
        this.#carry = Buffer.from(data);
        if (this.#carry.length > 1 << 20) {
          this.#verifier.pushUnreadable('a line longer than 1 MiB: not a record');
          this.#broken = this.#verifier.finish(false) as Extract<VerifyResult, { ok: false }>;
          return out;
        }
      }
    } finally {
      await fh.close();
    }
    return out;
  }

  /**
   * The chain's verdict on everything read so far. `complete`: the file is not being written any
   * more, so bytes after the last newline are a torn or cut line (while following, they are a
   * record still being written).
   */
  result(complete: boolean): VerifyResult {
    if (this.#broken) return this.#broken;
    const r = this.#verifier.finish(complete && this.#carry.length > 0);
    if (!r.ok) this.#broken = r;
    return r;
  }

  #line(bytes: Uint8Array): AuditRecord | undefined {
    let text: string;
    try {
      text = this.#decoder.decode(bytes);
    } catch {
      this.#verifier.pushUnreadable('not valid UTF-8 (a garbled line)');
      this.#broken = this.#verifier.finish(false) as Extract<VerifyResult, { ok: false }>;
      return undefined;
    }
    this.#verifier.push(text);
    if (this.#verifier.broken) {
      this.#broken = this.#verifier.finish(false) as Extract<VerifyResult, { ok: false }>;
      return undefined;
    }
    return JSON.parse(text) as AuditRecord;
  }
}

/** Reads and verifies a whole file. */
export async function readAuditFile(path: string): Promise<{ records: AuditRecord[]; chain: VerifyResult }> {
  const reader = new AuditReader(path);
  const records = await reader.read();
  return { records, chain: reader.result(true) };
}

// ---------------------------------------------------------------------------------------------
// Selecting

/**
 * When an event happened, in microseconds since the epoch: API requests by the API server's
 * `requestReceivedTimestamp` (they reach the log a batch later), everything else by `time`.
 */
export function eventMicros(r: AuditRecord): number {
  if (REQUEST_TYPES.has(r.type)) {
    const t = micros(detail(r, 'requestReceivedTimestamp'));
    if (t !== undefined) return t;
  }
  return micros(r.time) ?? 0;
}

function micros(iso: string | undefined): number | undefined {
  if (iso === undefined) return undefined;
  const ms = Date.parse(iso);
  if (Number.isNaN(ms)) return undefined;
  // Date.parse keeps milliseconds; the API server's timestamps carry microseconds.
  const frac = /\.(\d+)/.exec(iso)?.[1] ?? '';
  return ms * 1000 + Number((frac + '000000').slice(3, 6));
}

function byEventTime(a: AuditRecord, b: AuditRecord): number {
  return eventMicros(a) - eventMicros(b) || a.seq - b.seq;
}

/** What ties records to one task before it has an id: agent, task name, template, namespace. */
function keyOf(r: Pick<AuditRecord, 'type' | 'agent' | 'taskName' | 'template' | 'namespace'>): string | undefined {
  return keyFor(r.agent, taskNameOf(r), r.template, r.namespace);
}

function keyFor(...parts: Array<string | undefined>): string | undefined {
  return parts.every((p) => p !== undefined) ? JSON.stringify(parts) : undefined;
}

/** A refused start that gave no name asked for the default: the template's name. */
function taskNameOf(r: Pick<AuditRecord, 'type' | 'taskName' | 'template'>): string | undefined {
  return r.taskName ?? (r.type === 'task.refused' ? r.template : undefined);
}

function approvalIdOf(r: AuditRecord): string | undefined {
  const fromDetails = r.details?.['approvalRequest'] ?? r.details?.['approvalId'];
  return typeof fromDetails === 'string' ? fromDetails : undefined;
}

/**
 * Groups records into task stories.
 * - A record with a `task` id belongs to that task.
 * - A record without one that names agent, task name, template and namespace (a refused start, an
 *   approval request or decision) belongs to the next task started with those four, or else to a
 *   story without id (attempts that never became a task).
 * - An approval record that names only its approval request (token issued, a refused decision)
 *   belongs where that request belongs; a task record naming `details.approvalId` claims it too.
 * - Everything else belongs to no task.
 */
export function buildStories(records: readonly AuditRecord[]): { stories: Story[]; other: AuditRecord[] } {
  const byTask = new Map<string, Story>();
  const pending = new Map<string, AuditRecord[]>();
  const approvalOwner = new Map<string, Story>();
  const approvalOnly: AuditRecord[] = [];
  const other: AuditRecord[] = [];
  const attach = (story: Story, r: AuditRecord) => {
    story.records.push(r);
    const id = approvalIdOf(r);
    if (id !== undefined && !approvalOwner.has(id)) approvalOwner.set(id, story);
  };
  for (const r of records) {
    if (r.task !== undefined) {
      let story = byTask.get(r.task);
      if (!story) {
        story = { id: r.task, records: [] };
        byTask.set(r.task, story);
      }
      story.name ??= r.taskName;
      story.agent ??= r.agent;
      story.template ??= r.template;
      story.namespace ??= r.namespace;
      const key = keyFor(story.agent, story.name, story.template, story.namespace);
      const before = key === undefined ? undefined : pending.get(key);
      if (before) {
        pending.delete(key!);
        for (const p of before) attach(story, p);
      }
      // A task that names its approval request claims it.
      const approval = typeof r.details?.['approvalId'] === 'string' ? (r.details['approvalId'] as string) : undefined;
      if (approval !== undefined) approvalOwner.set(approval, story);
      attach(story, r);
      continue;
    }
    const key = keyOf(r);
    if (key !== undefined && (r.type.startsWith('task.') || r.type.startsWith('approval.'))) {
      const list = pending.get(key) ?? [];
      list.push(r);
      pending.set(key, list);
      continue;
    }
    if (r.type.startsWith('approval.') && approvalIdOf(r) !== undefined) {
      approvalOnly.push(r);
      continue;
    }
    other.push(r);
  }
  const stories = [...byTask.values()];
  for (const list of pending.values()) {
    const first = list[0]!;
    const story: Story = { records: [] };
    const name = taskNameOf(first);
    if (name !== undefined) story.name = name;
    if (first.agent !== undefined) story.agent = first.agent;
    if (first.template !== undefined) story.template = first.template;
    if (first.namespace !== undefined) story.namespace = first.namespace;
    for (const r of list) attach(story, r);
    stories.push(story);
  }
  for (const r of approvalOnly) {
    const owner = approvalOwner.get(approvalIdOf(r)!);
    if (owner) owner.records.push(r);
    else other.push(r);
  }
  for (const s of stories) s.records.sort(byEventTime);
  stories.sort((a, b) => byEventTime(a.records[0]!, b.records[0]!));
  other.sort(byEventTime);
  return { stories, other };
}

/** The stories and records `filter` selects, with their counts. */
export function select(records: readonly AuditRecord[], filter: ShowFilter = {}): Selection {
  const { stories, other } = buildStories(records);
  const since = filter.since === undefined ? undefined : filter.since.getTime() * 1000;
  const keep = (r: AuditRecord) => since === undefined || eventMicros(r) >= since;
  const chosen: Story[] = [];
  for (const s of stories) {
    if (filter.task !== undefined && s.id !== filter.task && s.name !== filter.task) continue;
    if (filter.agent !== undefined && s.agent !== filter.agent) continue;
    const kept = s.records.filter(keep);
    if (kept.length > 0) chosen.push({ ...s, records: kept });
  }
  const rest =
    filter.task !== undefined ? [] : other.filter((r) => keep(r) && (filter.agent === undefined || r.agent === filter.agent));
  return { stories: chosen, other: rest, summary: summarize([...chosen.flatMap((s) => s.records), ...rest]) };
}

export function summarize(records: readonly AuditRecord[]): Summary {
  let requests = 0;
  let denied = 0;
  for (const r of records) {
    if (!REQUEST_TYPES.has(r.type)) continue;
    // A stream (watch, logs -f, exec) through the proxy is one request with a start and an end record.
    if (detail(r, 'phase') === 'end') continue;
    requests++;
    if (r.outcome === 'denied') denied++;
  }
  return { records: records.length, requests, denied };
}

/**
 * The same selection one record at a time, for `--follow`: a record is shown when it arrives if it
 * belongs to a selected task as far as can be known then. (Without hindsight, a refused attempt or an
 * approval request is matched by task name, not yet by the id of the task it will lead to.)
 */
export class FollowSelector {
  readonly #filter: ShowFilter;
  readonly #taskAgent = new Map<string, string>();
  readonly #matchedTasks = new Set<string>();
  readonly #approvals = new Set<string>();

  constructor(filter: ShowFilter) {
    this.#filter = filter;
  }

  /** Whether to show `r`; call for every record, in file order. */
  matches(r: AuditRecord): boolean {
    const f = this.#filter;
    if (r.task !== undefined && r.agent !== undefined && !this.#taskAgent.has(r.task)) this.#taskAgent.set(r.task, r.agent);
    const agent = r.agent ?? (r.task === undefined ? undefined : this.#taskAgent.get(r.task));
    const approval = approvalIdOf(r);
    // An approval record that names only its request (an approver's decision) follows the request.
    const linked = approval !== undefined && this.#approvals.has(approval);
    const inTask =
      f.task === undefined ||
      linked ||
      (r.task !== undefined && (r.task === f.task || this.#matchedTasks.has(r.task))) ||
      (taskNameOf(r) === f.task && (r.task !== undefined || keyOf(r) !== undefined));
    if (!inTask) return false;
    if (f.agent !== undefined && agent !== f.agent && !linked) return false;
    if (r.task !== undefined) this.#matchedTasks.add(r.task);
    if (approval !== undefined) this.#approvals.add(approval);
    return f.since === undefined || eventMicros(r) >= f.since.getTime() * 1000;
  }
}

// ---------------------------------------------------------------------------------------------
// Formatting

/** How text is coloured; identity functions when colour is off. */
export interface Paint {
  denied(s: string): string;
  dim(s: string): string;
  ok(s: string): string;
}

export const NO_PAINT: Paint = { denied: (s) => s, dim: (s) => s, ok: (s) => s };

function detail(r: AuditRecord, key: string): string | undefined {
  const v: JsonValue | undefined = r.details?.[key];
  return typeof v === 'string' ? v : typeof v === 'number' ? String(v) : undefined;
}

/**
 * An API request as kubectl would be asked for it: `get pods -n web`, `get pods/web-1 -n web`,
 * `create pods/web-1/exec -n web`, `list deployments.apps -n web`, `get /version`.
 */
export function requestCommand(r: AuditRecord): string {
  const verb = detail(r, 'verb') ?? '?';
  const resource = detail(r, 'resource');
  if (resource === undefined || resource === '') return `${verb} ${detail(r, 'requestURI') ?? '?'}`;
  const group = detail(r, 'apiGroup');
  const name = detail(r, 'name');
  const sub = detail(r, 'subresource');
  let what = group ? `${resource}.${group}` : resource;
  if (name) what += `/${name}`;
  if (sub) what += name ? `/${sub}` : ` (${sub})`;
  const ns = r.namespace ?? detail(r, 'namespace');
  return `${verb} ${what}${ns ? ` -n ${ns}` : ''}`;
}

/** `ALLOW get pods -n web`, `DENY delete pods/web-1 -n prod (403: RBAC: ...)`; escaped, not coloured. */
export function requestLine(r: AuditRecord): string {
  const label = r.outcome === 'allowed' ? 'ALLOW' : r.outcome === 'denied' ? 'DENY' : 'ERROR';
  const code = detail(r, 'code');
  const why = r.outcome === 'denied' ? (r.reason || detail(r, 'decision')) : r.outcome === 'allowed' ? undefined : r.reason;
  const ok = code !== undefined && /^2\d\d$/.test(code);
  const note = why ? ` (${code ? `${code}: ` : ''}${why})` : code && !ok && code !== '101' ? ` (${code})` : '';
  return printable(`${label} ${requestCommand(r)}${note}${streamNote(r)}`);
}

/** ` [stream opened]`, ` [stream closed: 2.1 KiB in, 14 KiB out, 3.2 s]` for a proxy stream's records; else nothing. */
function streamNote(r: AuditRecord): string {
  const phase = detail(r, 'phase');
  const stream = r.details?.['stream'];
  const command = stream && typeof stream === 'object' && !Array.isArray(stream) && Array.isArray(stream['command']) ? ` ${stream['command'].map(String).join(' ')}` : '';
  if (phase === 'start') return ` [opened${command ? `:${command}` : ''}]`;
  if (phase !== 'end') return '';
  const size = (n: string | undefined) => (n === undefined ? '?' : Number(n) < 1024 ? `${n} B` : `${(Number(n) / 1024).toFixed(1)} KiB`);
  const ms = detail(r, 'durationMs');
  return ` [closed: ${size(detail(r, 'bytesIn'))} in, ${size(detail(r, 'bytesOut'))} out${ms === undefined ? '' : `, ${(Number(ms) / 1000).toFixed(1)} s`}]`;
}

/** One line for a broker record: what happened, escaped, not coloured. */
export function eventLine(r: AuditRecord): string {
  if (REQUEST_TYPES.has(r.type)) return requestLine(r);
  const approval = approvalIdOf(r);
  const parts: string[] = [];
  const by = r.agent !== undefined && r.actor === `agent:${r.agent}` ? '' : ` by ${r.actor}`;
  switch (r.type) {
    case 'task.requested':
      parts.push(`task requested${by}: ${r.template ?? '?'} in ${r.namespace ?? '?'}`);
      if (r.expiresAt) parts.push(`until ${r.expiresAt}`);
      break;
    case 'task.started':
      parts.push(`task started${r.expiresAt ? `, until ${r.expiresAt}` : ''}`);
      break;
    case 'credential.minted':
    case 'credential.served':
      parts.push(`credential ${r.type.slice('credential.'.length)}${r.jti ? ` jti ${r.jti}` : ''}${r.expiresAt ? ` until ${r.expiresAt}` : ''}`);
      break;
    case 'task.ended':
      parts.push(`task ended${by}`);
      break;
    case 'task.expired':
      parts.push(`task expired${by}`);
      break;
    default: {
      const [noun, ...rest] = r.type.split('.');
      parts.push(`${noun} ${rest.join('.').replaceAll('_', ' ')}${approval ? ` ${approval}` : ''}${by}`);
      const approver = detail(r, 'approver');
      if (approver) parts.push(`approver ${approver}`);
      const count = detail(r, 'approvals');
      const required = detail(r, 'required');
      if (count !== undefined && required !== undefined) parts.push(`${count} of ${required}`);
      else if (required !== undefined) parts.push(`needs ${required}`);
    }
  }
  let line = parts.join(', ');
  if (r.outcome === 'denied' || r.outcome === 'error') line += ` [${r.outcome}]${r.reason ? `: ${r.reason}` : ''}`;
  else if (r.reason) line += `, reason: ${r.reason}`;
  return printable(line);
}

function storyHeader(s: Story): string {
  const name = s.name ?? '?';
  const what = s.id ? `task ${name} (${s.id})` : `task ${name} (never started)`;
  const where = [s.template ? `template ${s.template}` : undefined, s.namespace ? `in ${s.namespace}` : undefined, s.agent ? `agent ${s.agent}` : undefined]
    .filter(Boolean)
    .join(', ');
  return printable(where ? `${what}: ${where}` : what);
}

/** `N requests, M denied`. */
export function summaryLine(s: Summary): string {
  return `${s.requests} request${s.requests === 1 ? '' : 's'}, ${s.denied} denied`;
}

/**
 * A story's records as timeline lines. Requests the proxy saw from one kubectl invocation (its
 * `Kubectl-Session` header, KEP 859) are grouped under the command (`$ kubectl delete`), and an exec
 * or attach session's end is followed by its transcript, read from the session recording in
 * `recordings` (the directory `broker serve --session-recordings` names) and checked against the hash
 * on the chain.
 */
export function formatStoryRecords(records: readonly AuditRecord[], paint: Paint = NO_PAINT, recordings?: string): string[] {
  const out: string[] = [];
  let session: string | undefined;
  for (const r of records) {
    const kubectl = REQUEST_TYPES.has(r.type) ? detail(r, 'kubectlSession') : undefined;
    if (kubectl === undefined) session = undefined;
    else if (kubectl !== session) {
      session = kubectl;
      const at = new Date(Math.floor(eventMicros(r) / 1000)).toISOString();
      out.push(`  ${paint.dim(at)}  ${printable(`$ ${detail(r, 'kubectlCommand') ?? 'kubectl'}`)}`);
    }
    out.push(formatRecord(r, paint, kubectl === undefined ? '  ' : '    '));
    if (REQUEST_TYPES.has(r.type) && detail(r, 'phase') === 'end') out.push(...formatStreamEnd(r, recordings, kubectl === undefined ? '      ' : '        '));
  }
  return out;
}

/** What a stream's end record adds: its size and length, and an exec or attach session's transcript. */
function formatStreamEnd(r: AuditRecord, recordings: string | undefined, indent: string): string[] {
  const lines: string[] = [];
  const stream = r.details?.['stream'];
  const kind = stream && typeof stream === 'object' && !Array.isArray(stream) ? stream['kind'] : undefined;
  const rec = r.details?.['recording'];
  if ((kind === 'exec' || kind === 'attach') && rec && typeof rec === 'object' && !Array.isArray(rec)) {
    const file = typeof rec['file'] === 'string' ? rec['file'] : undefined;
    const sha256 = typeof rec['sha256'] === 'string' ? rec['sha256'] : undefined;
    if (!recordings || !file || !sha256) lines.push(`${indent}(session recording ${file ?? '?'}: pass --recordings DIR to replay it)`);
    else lines.push(...transcript(recordings, file, sha256).map((l) => `${indent}${l}`));
  }
  return lines;
}

/** An exec or attach session's recording as lines: `> ` what was sent (stdin), `< ` and `! ` what came back (stdout, stderr); escaped. */
export function transcript(dir: string, file: string, sha256: string): string[] {
  if (!/^[\w-]+\.jsonl$/.test(file)) return [printable(`(session recording ${file}: not a recording's name)`)];
  let raw: Buffer;
  try {
    raw = readFileSync(join(dir, file));
  } catch (err) {
    return [printable(`(session recording ${file}: cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)];
  }
  if (createHash('sha256').update(raw).digest('hex') !== sha256) return [printable(`(session recording ${file}: its SHA-256 does not match the audit log: it was changed)`)];
  // Consecutive data of one channel is joined and cut into lines: `> ` stdin, `< ` stdout, `! ` stderr.
  const out: string[] = [];
  const prefix: Record<string, string> = { stdin: '> ', stdout: '< ', stderr: '! ' };
  let channel: string | undefined;
  let text = '';
  const flush = () => {
    if (channel !== undefined) for (const l of text.split('\n')) if (l !== '') out.push(printable(`${prefix[channel]}${l}`));
    text = '';
  };
  for (const frame of recordingFrames(raw)) {
    if (frame.channel === 'end') {
      // The status of the command at its end: shown unless it is plain success.
      if (!frame.success) {
        flush();
        out.push(printable(`(ended: ${frame.message})`));
      }
      continue;
    }
    if (frame.channel !== channel) {
      flush();
      channel = frame.channel;
    }
    text += frame.data;
  }
  flush();
  return out;
}

/** One record as a timeline line: time, then what happened (denials painted). */
export function formatRecord(r: AuditRecord, paint: Paint = NO_PAINT, indent = '  '): string {
  const at = new Date(Math.floor(eventMicros(r) / 1000)).toISOString();
  const text = eventLine(r);
  const denied = r.outcome === 'denied' || r.outcome === 'error';
  return `${indent}${paint.dim(at)}  ${denied ? paint.denied(text) : text}`;
}

/** The header that introduces a story (also printed by --follow when the task changes). */
export function formatHeader(s: Story): string {
  return storyHeader(s);
}

/**
 * The "left behind" section of a story (src/audit/left-behind.ts): what its recorded requests created
 * or changed that can hold or grant access, one line each; or that none of them did; or, when no
 * request of the task is recorded at all, that this log cannot tell.
 */
export function formatLeftBehind(s: Story, paint: Paint = NO_PAINT): string[] {
  const requests = summarize(s.records).requests;
  if (requests === 0) {
    return ['  left behind: unknown: no API request of this task is recorded (it made none, or no API server audit webhook posts to this broker; see docs/recording.md)'];
  }
  const items = leftBehind(s.records);
  if (items.length === 0) return [`  left behind: nothing that can hold or grant access, among ${requests} recorded request${requests === 1 ? '' : 's'}`];
  return [
    `  left behind: ${items.length} object${items.length === 1 ? '' : 's'} that can hold or grant access, outliving the task`,
    ...items.map((e) => {
      const t = Date.parse(e.at);
      return `    ${paint.dim(Number.isNaN(t) ? printable(e.at) : new Date(t).toISOString())}  ${printable(leftBehindLine(e))}`;
    }),
  ];
}

/**
 * The text output of `audit show`: each story under its header, its lines, its summary (with
 * `leftBehind`, as `--task` asks, then what it left behind); then a total.
 */
export function formatSelection(sel: Selection, paint: Paint = NO_PAINT, options: { leftBehind?: boolean; recordings?: string | undefined } = {}): string {
  const out: string[] = [];
  for (const s of sel.stories) {
    out.push(formatHeader(s));
    out.push(...formatStoryRecords(s.records, paint, options.recordings));
    const sum = summarize(s.records);
    out.push(`  ${sum.denied > 0 ? paint.denied(summaryLine(sum)) : summaryLine(sum)}`);
    if (options.leftBehind && s.id !== undefined) out.push(...formatLeftBehind(s, paint));
  }
  if (sel.other.length > 0) {
    out.push('not about a task:');
    for (const r of sel.other) out.push(formatRecord(r, paint));
  }
  if (sel.stories.length + (sel.other.length > 0 ? 1 : 0) > 1) {
    out.push(`total: ${sel.stories.length} task${sel.stories.length === 1 ? '' : 's'}, ${summaryLine(sel.summary)}`);
  }
  return out.length === 0 ? '' : out.join('\n') + '\n';
}

/** The JSON output of `audit show` (one document): the chain's verdict, the tasks, their records, the counts. */
export function selectionJson(sel: Selection, chain: VerifyResult): object {
  return {
    chain,
    tasks: sel.stories.map((s) => ({
      ...(s.id === undefined ? {} : { id: s.id }),
      ...(s.name === undefined ? {} : { name: s.name }),
      ...(s.agent === undefined ? {} : { agent: s.agent }),
      ...(s.template === undefined ? {} : { template: s.template }),
      ...(s.namespace === undefined ? {} : { namespace: s.namespace }),
      ...summarize(s.records),
      leftBehind: leftBehind(s.records),
    })),
    records: [...sel.stories.flatMap((s) => s.records), ...sel.other],
    summary: sel.summary,
  };
}

/** A story stub for --follow headers: what one record says about its task. */
export function storyOfRecord(r: AuditRecord): Story {
  const s: Story = { records: [] };
  if (r.task !== undefined) s.id = r.task;
  if (r.taskName !== undefined) s.name = r.taskName;
  if (r.agent !== undefined) s.agent = r.agent;
  if (r.template !== undefined) s.template = r.template;
  if (r.namespace !== undefined) s.namespace = r.namespace;
  return s;
}
