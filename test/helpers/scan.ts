/** Searching the files a test run left for secrets (tokens, keys, codes) that must never be written. */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** Files (up to 1 MB each, 8 levels deep) under `dir` that hold any of `needles`, added to `found`. */
export function scanFiles(dir: string, needles: string[], found: string[], depth = 0): void {
  if (depth > 8) return;
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return;
  }
  for (const e of entries) {
    const path = join(dir, e.name);
    if (e.isDirectory()) {
      if (!['node_modules', '.git'].includes(e.name) && !e.name.startsWith('go-build')) scanFiles(path, needles, found, depth + 1);
    } else if (e.isFile()) {
      try {
        if (statSync(path).size > 1024 * 1024) continue; // identity material is small; build caches and logs are not
        const text = readFileSync(path, 'latin1');
        if (needles.some((n) => text.includes(n))) found.push(path);
      } catch {
        // unreadable (a socket, permissions): not ours
      }
    }
  }
}
