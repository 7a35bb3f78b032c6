/**
 * The proxy's exec and attach session recordings (src/proxy/stream-session.ts), checked against the
 * audit log: each session's end record holds its recording's file name, size and SHA-256, on the hash
 * chain, so a recording changed, cut or removed after the fact is found (`broker audit verify`).
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface RecordingCheck {
  /** Recordings the log names. */
  checked: number;
  /** Named by the log, not in the directory. */
  missing: string[];
  /** In the directory, with another SHA-256 or size than the log says. */
  changed: string[];
}

/** Every recording `log` (the audit log's lines) names, checked in `dir`. */
export async function checkRecordings(logPath: string, dir: string): Promise<RecordingCheck> {
  const result: RecordingCheck = { checked: 0, missing: [], changed: [] };
  const text = await readFile(logPath, 'utf8');
  for (const line of text.split('\n')) {
    if (!line.includes('"recording"')) continue;
    let rec: { details?: { recording?: { file?: unknown; sha256?: unknown; bytes?: unknown } } };
    try {
      rec = JSON.parse(line) as typeof rec;
    } catch {
      continue; // a torn last line: the chain check reports it
    }
    const r = rec.details?.recording;
    if (!r || typeof r.file !== 'string' || typeof r.sha256 !== 'string' || !/^[\w-]+\.jsonl$/.test(r.file)) continue;
    result.checked++;
    const got = await digest(join(dir, r.file));
    if (!got) result.missing.push(r.file);
    else if (got.sha256 !== r.sha256 || (typeof r.bytes === 'number' && got.bytes !== r.bytes)) result.changed.push(r.file);
  }
  return result;
}

async function digest(path: string): Promise<{ sha256: string; bytes: number } | undefined> {
  const hash = createHash('sha256');
  let bytes = 0;
  try {
    for await (const chunk of createReadStream(path)) {
      hash.update(chunk as Buffer);
      bytes += (chunk as Buffer).length;
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  return { sha256: hash.digest('hex'), bytes };
}

/** One frame of a session recording: what a channel carried, or the command's final status. */
export type RecordingFrame =
  | { t: number | undefined; channel: 'stdin' | 'stdout' | 'stderr'; data: string }
  | { t: number | undefined; channel: 'end'; success: boolean; message: string };

/**
 * A recording's frames, after its header line (`t`: milliseconds since the session began, when the
 * frame has it). A frame without a channel is stdout; resize and close frames, and lines that are
 * not JSON, are left out. `audit show` and the web console's player both read recordings so.
 */
export function recordingFrames(raw: Buffer): RecordingFrame[] {
  const frames: RecordingFrame[] = [];
  for (const line of raw.toString('utf8').split('\n').slice(1)) {
    if (line === '') continue;
    let m: { t?: unknown; ch?: unknown; b64?: unknown };
    try {
      m = JSON.parse(line) as typeof m;
    } catch {
      continue;
    }
    const t = typeof m.t === 'number' && Number.isFinite(m.t) ? m.t : undefined;
    const data = Buffer.from(typeof m.b64 === 'string' ? m.b64 : '', 'base64').toString('utf8');
    if (m.ch === 'error') {
      let status: { status?: string; message?: string } = {};
      try {
        status = JSON.parse(data) as typeof status;
      } catch {
        status = { message: data };
      }
      frames.push({ t, channel: 'end', success: status.status === 'Success', message: status.message ?? data });
      continue;
    }
    const ch = m.ch ?? 'stdout';
    if (ch === 'stdin' || ch === 'stdout' || ch === 'stderr') frames.push({ t, channel: ch, data });
  }
  return frames;
}
