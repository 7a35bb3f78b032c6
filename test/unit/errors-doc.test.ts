/** docs/errors.md and src/errors.ts list the same codes, both ways. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ERROR_CODES } from '../../src/errors.ts';

const doc = readFileSync(new URL('../../docs/errors.md', import.meta.url), 'utf8');
const documented = [...doc.matchAll(/^\| `([a-z_]+)` \|/gm)].map((m) => m[1]);

test('every error code in src/errors.ts is documented in docs/errors.md', () => {
  const missing = Object.keys(ERROR_CODES).filter((c) => !documented.includes(c));
  assert.deepEqual(missing, []);
});

test('docs/errors.md documents no code that src/errors.ts lacks, and none twice', () => {
  const extra = documented.filter((c) => !(c! in ERROR_CODES));
  assert.deepEqual(extra, []);
  assert.equal(new Set(documented).size, documented.length);
});
