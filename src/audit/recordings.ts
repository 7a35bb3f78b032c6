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
