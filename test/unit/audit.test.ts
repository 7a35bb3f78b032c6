/**
 * The audit log (src/audit): chain, durability with group commit, fail closed, removal detection,
 * redaction and the secret guard, the cluster checkpoint (with a fake API), verify.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { appendFile, chmod, mkdir, mkdtemp, open, readFile, rename, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { execFile } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { Command } from 'commander';
import { AuditLog, GENESIS_HASH, REDACTED, redactTokens, type AuditEventInput, type AuditRecord } from '../../src/audit/log.ts';
import { auditHeadName, openCheckedAuditLog } from '../../src/audit/head.ts';
import { canonicalRecordJson, recordLine, sha256Hex, verifyAuditFile, verifyAuditText } from '../../src/audit/verify.ts';
import { auditCommand } from '../../src/cli/audit.ts';
import { BrokerError } from '../../src/errors.ts';

let dir: string;
let n = 0;
const fresh = () => join(dir, `audit-${++n}.jsonl`);

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'task-broker-audit-'));
});
after(async () => {
  await chmod(dir, 0o700).catch(() => {});
  await rm(dir, { recursive: true, force: true });
});

const event = (i: number): AuditEventInput => ({
  type: 'credential.minted',
  actor: 'agent:deployer',
  agent: 'deployer',
  task: `task-${i}`,
  taskName: 'deploy',
  template: 'deploy-app',
  namespace: 'shop',
  outcome: 'allowed',
  jti: `0b7e5a4e-0000-4000-8000-${String(i).padStart(12, '0')}`,
  expiresAt: '2030-01-01T00:10:00.000Z',
  requestId: `req-${i}`,
  details: { ttlSeconds: 600, verbs: ['get', 'list'], nested: { b: 1, a: 'é' } },
});

/** A log of `count` records; returns its path, its text and its lines. */
async function makeLog(count: number): Promise<{ path: string; text: string; lines: string[] }> {
  const path = fresh();
  const log = await AuditLog.open(path);
  for (let i = 0; i < count; i++) await log.append(event(i));
  await log.close();
  const text = await readFile(path, 'utf8');
  return { path, text, lines: text.split('\n').slice(0, -1) };
}

const isCode = (code: string) => (err: unknown) => err instanceof BrokerError && err.code === code;

describe('the chain', () => {
  test('appends produce a valid chain in the documented format', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    assert.equal(log.healthy, true);
    const r0 = await log.append(event(0));
    const r1 = await log.append({ type: 'task.ended', actor: 'system:sweeper', task: 'task-0', outcome: 'ok' });
    await log.close();
    assert.equal(log.healthy, false);
    assert.equal((await stat(path)).mode & 0o777, 0o600);
    assert.equal(r0.seq, 0);
    assert.equal(r1.seq, 1);
    assert.equal(r0.prev, GENESIS_HASH);
    assert.equal(r1.prev, r0.hash);
    assert.match(r0.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    const lines = (await readFile(path, 'utf8')).split('\n');
    assert.equal(lines.length, 3);
    assert.equal(lines[2], '');
    // Keys in the documented order, hash last; hash = sha256 of the line without its hash member.
    const keys = Object.keys(JSON.parse(lines[0]!) as object);
    assert.deepEqual(keys, ['seq', 'time', 'type', 'actor', 'agent', 'task', 'taskName', 'template', 'namespace', 'outcome', 'jti', 'expiresAt', 'requestId', 'details', 'prev', 'hash']);
    assert.equal(sha256Hex(lines[0]!.replace(/,"hash":"[0-9a-f]{64}"\}$/, '}')), r0.hash);
    assert.equal(lines[1], recordLine(canonicalRecordJson(r1), r1.hash));
    assert.match(lines[0]!, /"details":\{"nested":\{"a":"é","b":1\},"ttlSeconds":600,"verbs":\["get","list"\]\}/);
    assert.deepEqual(verifyAuditText(lines.join('\n')), { ok: true, records: 2, lastHash: r1.hash });
  });

  test('reopening continues seq and prev from the last record', async () => {
    const { path, lines } = await makeLog(3);
    const last = JSON.parse(lines[2]!) as { hash: string };
    const log = await AuditLog.open(path);
    assert.equal(log.nextSeq, 3);
    assert.equal(log.lastHash, last.hash);
    const r = await log.append(event(3));
    await log.close();
    assert.equal(r.seq, 3);
    assert.equal(r.prev, last.hash);
    assert.deepEqual(await verifyAuditFile(path), { ok: true, records: 4, lastHash: r.hash });
  });

  test('an empty file verifies and opens', async () => {
    const path = fresh();
    await writeFile(path, '');
    assert.deepEqual(await verifyAuditFile(path), { ok: true, records: 0, lastHash: GENESIS_HASH });
    const log = await AuditLog.open(path);
    assert.equal((await log.append(event(0))).seq, 0);
    await log.close();
  });

  test('a file larger than the read buffer verifies (streaming across chunk boundaries)', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    const big = 'x'.repeat(7000);
    let last;
    for (let i = 0; i < 300; i++) last = log.append({ type: 'kube.request', actor: 'agent:a', details: { i, big } });
    const lastRec = await last!;
    await log.close();
    assert.ok((await stat(path)).size > 2 * (1 << 20));
    assert.deepEqual(await verifyAuditFile(path), { ok: true, records: 300, lastHash: lastRec.hash });
  });
});

describe('verify detects tampering', () => {
  let lines: string[];
  let path: string;
  before(async () => {
    ({ lines, path } = await makeLog(5));
  });
  const text = (ls: string[]) => ls.map((l) => l + '\n').join('');

  test('an edited record: hash mismatch at its line', () => {
    const ls = [...lines];
    ls[2] = ls[2]!.replace('"namespace":"shop"', '"namespace":"prod"');
    const r = verifyAuditText(text(ls));
    assert.equal(r.ok, false);
    assert.ok(!r.ok);
    assert.equal(r.line, 3);
    assert.equal(r.seq, 2);
    assert.equal(r.records, 2);
    assert.match(r.reason, /hash does not match/);
  });

  test('an edited record whose hash was recomputed: caught by the next record\'s prev', () => {
    const ls = [...lines];
    const rec = JSON.parse(ls[2]!) as Record<string, unknown>;
    rec['outcome'] = 'denied';
    const canonical = canonicalRecordJson(rec);
    ls[2] = recordLine(canonical, sha256Hex(canonical));
    const r = verifyAuditText(text(ls));
    assert.ok(!r.ok);
    assert.equal(r.line, 4);
    assert.equal(r.seq, 3);
    assert.match(r.reason, /prev does not match/);
  });

  test('a deleted record: seq gap at the line after it', () => {
    const ls = lines.filter((_, i) => i !== 2);
    const r = verifyAuditText(text(ls));
    assert.ok(!r.ok);
    assert.equal(r.line, 3);
    assert.equal(r.seq, 3);
    assert.match(r.reason, /seq 3 where 2 was expected/);
  });

  test('a deleted first record', () => {
    const r = verifyAuditText(text(lines.slice(1)));
    assert.ok(!r.ok);
    assert.equal(r.line, 1);
    assert.equal(r.records, 0);
  });

  test('reordered records: the first moved line', () => {
    const ls = [...lines];
    [ls[1], ls[2]] = [ls[2]!, ls[1]!];
    const r = verifyAuditText(text(ls));
    assert.ok(!r.ok);
    assert.equal(r.line, 2);
    assert.equal(r.seq, 2);
  });

  test('a garbled (cut) line in the middle', async () => {
    const ls = [...lines];
    ls[3] = ls[3]!.slice(0, 40);
    const r = verifyAuditText(text(ls));
    assert.ok(!r.ok);
    assert.equal(r.line, 4);
    assert.equal(r.seq, undefined);
    assert.match(r.reason, /not valid JSON/);
    const p = fresh();
    await writeFile(p, text(ls));
    assert.deepEqual(await verifyAuditFile(p), r);
  });

  test('a reformatted line (same content, not canonical) is refused', () => {
    const ls = [...lines];
    ls[1] = JSON.stringify(JSON.parse(ls[1]!), null, 0).replace('"seq":1,', '"seq": 1,');
    const r = verifyAuditText(text(ls));
    assert.ok(!r.ok);
    assert.equal(r.line, 2);
    assert.match(r.reason, /canonical/);
  });

  test('a torn last line (no trailing newline)', () => {
    const r = verifyAuditText(text(lines) + lines[0]!.slice(0, 30));
    assert.ok(!r.ok);
    assert.equal(r.line, 6);
    assert.equal(r.records, 5);
    assert.match(r.reason, /incomplete/);
  });

  test('a cut tail verifies on its own, and is caught with expectLast', async () => {
    const lastHash = (JSON.parse(lines[4]!) as { hash: string }).hash;
    assert.deepEqual(verifyAuditText(text(lines), { expectLast: lastHash }), { ok: true, records: 5, lastHash });
    const cut = text(lines.slice(0, 4));
    assert.equal(verifyAuditText(cut).ok, true);
    const r = verifyAuditText(cut, { expectLast: lastHash });
    assert.ok(!r.ok);
    assert.equal(r.line, 4);
    assert.equal(r.records, 4);
    assert.match(r.reason, /not the expected/);
    const p = fresh();
    await writeFile(p, cut);
    assert.deepEqual(await verifyAuditFile(p, { expectLast: lastHash }), r);
  });

  test('AuditLog.open refuses a broken file, naming the line', async () => {
    const p = fresh();
    const ls = lines.filter((_, i) => i !== 1);
    await writeFile(p, text(ls));
    await assert.rejects(AuditLog.open(p), (err: unknown) => isCode('audit_chain_broken')(err) && /line 2 \(seq 2\)/.test((err as Error).message));
    assert.equal(await readFile(p, 'utf8'), text(ls), 'the broken file is left as it was');
    assert.ok(path);
  });
});

describe('durability and group commit', () => {
  test('200 concurrent appends: all durable when they resolve, in seq order, in fewer fsyncs than records', async () => {
    const path = fresh();
    let synced = ''; // what the file held at the last completed fdatasync
    let syncs = 0;
    const log = await AuditLog.open(path, {
      openFile: async (p, flags, mode) => {
        const fh = await open(p, flags, mode);
        const real = fh.datasync.bind(fh);
        fh.datasync = async () => {
          const content = readFileSync(p, 'utf8');
          await real();
          await new Promise((r) => setTimeout(r, 2)); // a slow disk lets batches form
          synced = content;
          syncs++;
        };
        return fh;
      },
    });
    const resolvedOrder: number[] = [];
    const all: Promise<AuditRecord>[] = [];
    // 20 waves of 10: later waves arrive while an earlier write+fdatasync is in flight.
    for (let i = 0; i < 200; i++) {
      if (i % 10 === 0) await new Promise((r) => setTimeout(r, 1));
      all.push(
        log.append({ type: 'kube.request', actor: 'agent:a', requestId: `r${i}` }).then((rec) => {
          assert.ok(synced.includes(`"hash":"${rec.hash}"}\n`), `record ${rec.seq} resolved before its fdatasync`);
          resolvedOrder.push(rec.seq);
          return rec;
        }),
      );
    }
    const records = await Promise.all(all);
    const stats = log.stats;
    await log.close();
    assert.deepEqual(records.map((r) => r.seq), Array.from({ length: 200 }, (_, i) => i));
    assert.deepEqual(records.map((r) => r.requestId), Array.from({ length: 200 }, (_, i) => `r${i}`));
    assert.deepEqual(resolvedOrder, records.map((r) => r.seq));
    assert.equal(stats.records, 200);
    assert.equal(stats.flushes, syncs);
    assert.ok(stats.flushes > 1 && stats.flushes < 50, `flushes ${stats.flushes}`);
    const lines = (await readFile(path, 'utf8')).split('\n').slice(0, -1);
    assert.deepEqual(lines.map((l) => (JSON.parse(l) as { seq: number }).seq), records.map((r) => r.seq));
    assert.equal((await verifyAuditFile(path)).ok, true);
  });

  test('close waits for pending appends; appends after close are refused', async () => {
    const path = fresh();
    const log = await AuditLog.open(path, { flushIntervalMs: 20 });
    const pending = [log.append(event(0)), log.append(event(1))];
    await log.close();
    assert.equal((await Promise.all(pending)).length, 2);
    assert.equal((await verifyAuditFile(path)).ok && (await verifyAuditFile(path)).records, 2);
    await assert.rejects(log.append(event(2)), isCode('audit_unavailable'));
  });
});

describe('fail closed', () => {
  for (const which of ['write', 'datasync'] as const) {
    test(`a failing ${which} rejects every pending append, and every later one, with audit_unavailable`, async () => {
      const path = fresh();
      let broken = false;
      const log = await AuditLog.open(path, {
        openFile: async (p, flags, mode) => {
          const fh = await open(p, flags, mode);
          const realWrite = fh.write.bind(fh) as (...a: unknown[]) => Promise<{ bytesWritten: number; buffer: unknown }>;
          const realSync = fh.datasync.bind(fh);
          if (which === 'write') {
            fh.write = (async (...args: unknown[]) => {
              if (broken) throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
              return realWrite(...args);
            }) as typeof fh.write;
          } else {
            fh.datasync = async () => {
              if (broken) throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
              return realSync();
            };
          }
          return fh;
        },
      });
      await log.append(event(0));
      assert.equal(log.healthy, true);
      broken = true;
      const results = await Promise.allSettled(Array.from({ length: 10 }, (_, i) => log.append(event(i + 1))));
      for (const r of results) {
        assert.equal(r.status, 'rejected');
        assert.ok(isCode('audit_unavailable')(r.reason), String(r.reason));
      }
      assert.equal(log.healthy, false);
      broken = false; // even once the disk recovers, the log stays failed
      await assert.rejects(log.append(event(99)), isCode('audit_unavailable'));
      await log.close();
    });
  }

  test('a real failing write (file size limit, EFBIG) fails closed and leaves a torn tail verify reports', async () => {
    const path = fresh();
    const logModule = new URL('../../src/audit/log.ts', import.meta.url).pathname;
    const script = `
      const { AuditLog } = await import(${JSON.stringify(logModule)});
      const log = await AuditLog.open(process.argv[1]);
      const out = [];
      for (let i = 0; i < 12; i++) {
        try { out.push((await log.append({ type: 'kube.request', actor: 'agent:a', details: { pad: 'x'.repeat(200) } })).seq); }
        catch (e) { out.push(e.code); }
      }
      out.push(log.healthy);
      console.log(JSON.stringify(out));
      await log.close();`;
    // ulimit -f 2: at most 2 KiB per file; Node ignores SIGXFSZ, so the write fails with EFBIG.
    const stdout = await new Promise<string>((resolve, reject) =>
      execFile('bash', ['-c', 'ulimit -f 2 && exec "$0" --input-type=module -e "$1" "$2"', process.execPath, script, path], (err, out, errOut) =>
        err ? reject(new Error(`${err.message}\n${errOut}`)) : resolve(out),
      ),
    );
    const out = JSON.parse(stdout) as unknown[];
    const firstFailure = out.indexOf('audit_unavailable');
    assert.ok(firstFailure > 0, stdout);
    assert.deepEqual(out.slice(0, firstFailure), Array.from({ length: firstFailure }, (_, i) => i));
    assert.ok(out.slice(firstFailure, -1).every((x) => x === 'audit_unavailable'), stdout);
    assert.equal(out.at(-1), false);
    const r = await verifyAuditFile(path);
    assert.ok(!r.ok);
    assert.equal(r.records, firstFailure, 'every acknowledged record is in the file');
    assert.match(r.reason, /incomplete/);
    await assert.rejects(AuditLog.open(path), isCode('audit_chain_broken'));
  });

  test('opening a path in a missing directory is audit_unavailable', async () => {
    await assert.rejects(AuditLog.open(join(dir, 'no-such-dir', 'audit.jsonl')), isCode('audit_unavailable'));
  });

  test('opening a directory or a non-regular file is audit_unavailable', async () => {
    const sub = join(dir, 'a-directory');
    await mkdir(sub);
    await assert.rejects(AuditLog.open(sub), isCode('audit_unavailable'));
    await assert.rejects(AuditLog.open('/dev/null'), isCode('audit_unavailable'));
  });

  /**
   * Opens `path` with AuditLog in a child process that drops to nobody (uid 65534) when the tests run
   * as root (root ignores file permissions), and prints the error code it got.
   */
  function openAsUnprivileged(path: string): Promise<string> {
    const log = new URL('../../src/audit/log.ts', import.meta.url).href;
    const script = `
      if (process.getuid() === 0) { process.setgid(65534); process.setuid(65534); }
      const { AuditLog } = await import(${JSON.stringify(log)});
      try { await AuditLog.open(${JSON.stringify(path)}); console.log('opened'); } catch (err) { console.log(err.code); }`;
    return new Promise((done, fail) =>
      execFile(process.execPath, ['--input-type=module', '-e', script], (err, stdout) => (err ? fail(err) : done(stdout.trim()))),
    );
  }

  test('opening a path in a directory without write permission is audit_unavailable', async () => {
    await chmod(dir, 0o755); // traversable for the unprivileged child
    const ro = join(dir, 'read-only');
    await mkdir(ro, { mode: 0o555 });
    assert.equal(await openAsUnprivileged(join(ro, 'audit.jsonl')), 'audit_unavailable');
  });

  test('opening a file without write permission is audit_unavailable', async () => {
    await chmod(dir, 0o755);
    const p = fresh();
    await writeFile(p, '', { mode: 0o444 });
    assert.equal(await openAsUnprivileged(p), 'audit_unavailable');
  });
});

describe('never a secret, never a lost decision', () => {
  const jwt = 'eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl';
  const bearer = 'sha256~AbCdEfGhIjKlMnOpQrStUv';
  const refused: [string, AuditEventInput][] = [
    ['a key named token', { type: 'credential.minted', actor: 'agent:a', details: { token: 'x' } }],
    ['a key named Password', { type: 'task.started', actor: 'agent:a', details: { Password: 'x' } }],
    ['a key named secret, nested', { type: 'task.started', actor: 'agent:a', details: { a: { b: [{ secret: 1 }] } } }],
    ['a key named privateKey', { type: 'policy.applied', actor: 'user:alice', details: { privateKey: null } }],
    ['a key named KEY', { type: 'policy.applied', actor: 'user:alice', details: { KEY: 'x' } }],
    ['a key named client_secret', { type: 'policy.applied', actor: 'user:alice', details: { client_secret: 'x' } }],
    ['an unknown top-level field', { type: 'task.started', actor: 'agent:a', token: 'x' } as AuditEventInput],
    ['a non-JSON details value', { type: 'task.started', actor: 'agent:a', details: { when: new Date() as unknown as string } }],
    ['a token as the event type (a programming mistake)', { type: `x.${jwt}`, actor: 'agent:a' }],
  ];

  test('refuses secret-named keys and malformed events, writing nothing and using no seq', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    await log.append(event(0));
    for (const [name, ev] of refused) {
      await assert.rejects(log.append(ev), (err: unknown) => isCode('internal')(err) && !(err as Error).message.includes(jwt), name);
    }
    assert.equal(log.healthy, true);
    // Ordinary values that merely mention tokens are written as they are.
    const ok = await log.append({
      type: 'auth.failed',
      actor: 'anonymous',
      outcome: 'denied',
      reason: 'missing bearer token',
      details: { tokenTtlSeconds: 600, keyId: 'k1' },
    });
    assert.equal(ok.seq, 1);
    assert.equal(ok.reason, 'missing bearer token');
    await log.close();
    const text = await readFile(path, 'utf8');
    assert.ok(!text.includes('eyJ'));
    assert.equal(verifyAuditText(text).ok, true);
  });

  test('a reason holding a JWT-like run and a Bearer run is written redacted; the chain verifies; the secret is nowhere in the file', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    const rec = await log.append({
      type: 'approval.granted',
      actor: 'user:carol',
      outcome: 'allowed',
      reason: `looks fine, see ${jwt} and Authorization: Bearer ${bearer} (pasted by mistake)`,
    });
    assert.equal(rec.reason, `looks fine, see ${REDACTED} and Authorization: Bearer ${REDACTED} (pasted by mistake)`);
    await log.close();
    const text = await readFile(path, 'utf8');
    for (const secret of [jwt, bearer, 'eyJ', 'AbCdEfGhIj']) assert.ok(!text.includes(secret), `${secret} is in the file`);
    assert.deepEqual(verifyAuditText(text), { ok: true, records: 1, lastHash: rec.hash });
  });

  test('every free-text field and details value or key is redacted, never refused', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    const jwe = `${jwt}.cGFydDQ.cGFydDU`; // five segments: nothing of it is kept
    const rec = await log.append({
      type: 'task.refused',
      actor: `identity:${jwt}`,
      template: jwt,
      taskName: `n-${jwt}`,
      namespace: `Bearer ${bearer}`,
      outcome: 'denied',
      reason: `unknown_template: ${jwe}`,
      details: { note: `bearer ${bearer}`, list: [jwt, 'plain'], [jwt]: 1, nested: { deep: [{ v: jwt }] } },
    });
    assert.equal(rec.actor, `identity:${REDACTED}`);
    assert.equal(rec.template, REDACTED);
    assert.equal(rec.taskName, `n-${REDACTED}`);
    assert.equal(rec.namespace, `Bearer ${REDACTED}`);
    assert.equal(rec.reason, `unknown_template: ${REDACTED}`);
    assert.deepEqual(rec.details, { note: `bearer ${REDACTED}`, list: [REDACTED, 'plain'], [REDACTED]: 1, nested: { deep: [{ v: REDACTED }] } });
    await log.close();
    const text = await readFile(path, 'utf8');
    assert.ok(!/eyJ|cGFydD|AbCdEf/.test(text), text);
    assert.equal(verifyAuditText(text).ok, true);
    assert.equal(redactTokens('no token here'), 'no token here');
  });
});

describe('a removed or replaced log', () => {
  const within = async (ms: number, probe: () => boolean): Promise<number> => {
    const t0 = Date.now();
    while (!probe()) {
      if (Date.now() - t0 > ms) throw new Error(`not within ${ms} ms`);
      await new Promise((r) => setTimeout(r, 20));
    }
    return Date.now() - t0;
  };
  const goneError = (err: unknown) => isCode('audit_unavailable')(err) && /removed or replaced/.test((err as Error).message);

  test('rm of the file: within ~1.5 s unhealthy, and every append is refused', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    await log.append(event(0));
    await rm(path);
    await within(1500, () => !log.healthy);
    await assert.rejects(log.append(event(1)), goneError);
    await log.close();
  });

  test('another file renamed over it: within ~1.5 s unhealthy, and every append is refused', async () => {
    const path = fresh();
    const log = await AuditLog.open(path);
    await log.append(event(0));
    const other = fresh();
    await writeFile(other, '');
    await rename(other, path);
    await within(1500, () => !log.healthy);
    await assert.rejects(log.append(event(1)), (err: unknown) => goneError(err) && /is now another file/.test((err as Error).message));
    await log.close();
    assert.equal(await readFile(path, 'utf8'), '', 'the new file is left alone');
  });

  test('without waiting for the timer: the first write after rm is not acknowledged', async () => {
    const path = fresh();
    const log = await AuditLog.open(path, { checkIntervalMs: 0 }); // the check after each write+fdatasync only
    const r0 = await log.append(event(0));
    await rm(path);
    const results = await Promise.allSettled([log.append(event(1)), log.append(event(2))]);
    for (const r of results) assert.ok(r.status === 'rejected' && goneError(r.reason), String(r.status === 'rejected' ? r.reason : 'resolved'));
    assert.equal(log.healthy, false);
    assert.deepEqual(log.durableHead, { seq: 0, hash: r0.hash }, 'the head never names a record that was not acknowledged');
    await log.close();
  });

  test('a file cut or written by someone else while open is caught too', async () => {
    for (const change of ['truncate', 'append'] as const) {
      const path = fresh();
      const log = await AuditLog.open(path);
      await log.append(event(0));
      await log.append(event(1));
      if (change === 'truncate') await truncate(path, 10);
      else await appendFile(path, '{"seq":2}\n');
      await within(1500, () => !log.healthy);
      await assert.rejects(log.append(event(2)), (err: unknown) => isCode('audit_unavailable')(err) && /changed outside the broker/.test((err as Error).message));
      await log.close();
    }
  });

  test('sizeBytes follows the file; a log left alone stays healthy', async () => {
    const { path } = await makeLog(2);
    const log = await AuditLog.open(path, { checkIntervalMs: 50 });
    assert.equal(log.sizeBytes, (await stat(path)).size);
    for (let i = 2; i < 20; i++) void log.append(event(i));
    await log.append(event(20));
    await new Promise((r) => setTimeout(r, 200)); // a few checks, some during writes
    assert.equal(log.healthy, true);
    assert.equal(log.sizeBytes, (await stat(path)).size);
    assert.deepEqual(log.durableHead, { seq: 20, hash: log.lastHash });
    await log.close();
  });
});

describe('the checkpoint in the cluster (head.ts, with a fake ConfigMap API)', () => {
  /** An in-memory ConfigMap API with resourceVersions, 404 and 409 like the API server's. */
  class FakeConfigMaps {
    objects = new Map<string, k8s.V1ConfigMap>();
    writes = 0;
    rv = 1;
    fail: number | undefined;
    #key = (ns: string, name: string) => `${ns}/${name}`;
    readNamespacedConfigMap = async ({ name, namespace }: { name: string; namespace: string }): Promise<k8s.V1ConfigMap> => {
      if (this.fail) throw new k8s.ApiException(this.fail, 'injected', {}, {});
      const o = this.objects.get(this.#key(namespace, name));
      if (!o) throw new k8s.ApiException(404, 'not found', {}, {});
      return structuredClone(o);
    };
    createNamespacedConfigMap = async ({ namespace, body }: { namespace: string; body: k8s.V1ConfigMap }): Promise<k8s.V1ConfigMap> => {
      if (this.fail) throw new k8s.ApiException(this.fail, 'injected', {}, {});
      const key = this.#key(namespace, body.metadata!.name!);
      if (this.objects.has(key)) throw new k8s.ApiException(409, 'exists', {}, {});
      const o = { ...structuredClone(body), metadata: { ...body.metadata, resourceVersion: String(++this.rv) } };
      this.objects.set(key, o);
      this.writes++;
      return structuredClone(o);
    };
    replaceNamespacedConfigMap = async ({ name, namespace, body }: { name: string; namespace: string; body: k8s.V1ConfigMap }): Promise<k8s.V1ConfigMap> => {
      if (this.fail) throw new k8s.ApiException(this.fail, 'injected', {}, {});
      const have = this.objects.get(this.#key(namespace, name));
      if (!have) throw new k8s.ApiException(404, 'not found', {}, {});
      if (body.metadata?.resourceVersion && body.metadata.resourceVersion !== have.metadata!.resourceVersion) throw new k8s.ApiException(409, 'conflict', {}, {});
      const o = { ...structuredClone(body), metadata: { ...body.metadata, resourceVersion: String(++this.rv) } };
      this.objects.set(this.#key(namespace, name), o);
      this.writes++;
      return structuredClone(o);
    };
    head(path: string): Record<string, string> | undefined {
      return this.objects.get(`task-broker-system/${auditHeadName('host-a', resolve(path))}`)?.data;
    }
  }

  const open = (api: FakeConfigMaps, path: string, acceptReset = false, lines: string[] = []) =>
    openCheckedAuditLog({ path, api, namespace: 'task-broker-system', host: 'host-a', acceptReset, log: (l) => lines.push(l), checkpointIntervalMs: 20 });

  /** A broker run: open, append `n` records, close (the head is written on close). */
  async function run(api: FakeConfigMaps, path: string, n: number): Promise<void> {
    const { audit, checkpoint } = await open(api, path);
    for (let i = 0; i < n; i++) await audit.append(event(i));
    await audit.close();
    await checkpoint.close();
  }

  test('the name is per host and absolute path', () => {
    assert.match(auditHeadName('h', '/var/log/a.jsonl'), /^task-broker-audit-head-[0-9a-f]{16}$/);
    assert.notEqual(auditHeadName('h', '/a'), auditHeadName('h2', '/a'));
    assert.notEqual(auditHeadName('h', '/a'), auditHeadName('h', '/b'));
  });

  test('the head is written when it moves, at most once per interval, never ahead of the file, and on close', async () => {
    const api = new FakeConfigMaps();
    const path = fresh();
    const lines: string[] = [];
    const { audit, checkpoint } = await open(api, path, false, lines);
    assert.match(lines.join('\n'), /no audit checkpoint .* yet/);
    assert.equal(api.writes, 0, 'nothing to record yet');
    await Promise.all(Array.from({ length: 50 }, (_, i) => audit.append(event(i))));
    await new Promise((r) => setTimeout(r, 120));
    const writes = api.writes;
    assert.ok(writes >= 1 && writes <= 3, `writes ${writes}`);
    assert.equal(api.head(path)!['seq'], '49');
    assert.equal(api.head(path)!['hash'], audit.lastHash);
    assert.equal(api.head(path)!['path'], resolve(path));
    assert.equal(api.head(path)!['host'], 'host-a');
    await new Promise((r) => setTimeout(r, 60));
    assert.equal(api.writes, writes, 'not rewritten while the head stays');
    const last = await audit.append(event(50));
    await audit.close();
    await checkpoint.close();
    assert.equal(api.head(path)!['seq'], '50');
    assert.equal(api.head(path)!['hash'], last.hash);
    assert.equal(api.objects.values().next().value!.metadata!.labels!['task-broker.dev/component'], 'audit-head');
  });

  test('a matching log (also one that grew past the head) starts normally', async () => {
    const api = new FakeConfigMaps();
    const path = fresh();
    await run(api, path, 3);
    // Records the head has not caught up with (a crash within its second) are fine.
    const extra = await AuditLog.open(path);
    await extra.append(event(3));
    await extra.close();
    const { audit, checkpoint } = await open(api, path);
    assert.equal(audit.nextSeq, 4);
    await audit.close();
    await checkpoint.close();
    assert.equal(api.head(path)!['seq'], '3');
  });

  for (const [name, damage, found] of [
    ['a missing log', (p: string) => rm(p), /expected record seq 2 with hash [0-9a-f]{64}, found no log at all \(the file was missing\)/],
    ['a log cut to its first line', async (p: string) => writeFile(p, (await readFile(p, 'utf8')).split('\n')[0] + '\n'), /found a log of 1 records ending at seq 0/],
    ['a replaced log (another chain, as long)', async (p: string) => {
      await rm(p);
      const other = await AuditLog.open(p);
      for (let i = 0; i < 3; i++) await other.append({ type: 'kube.request', actor: 'agent:x', requestId: `other-${i}` });
      await other.close();
    }, /found hash [0-9a-f]{64} at seq 2: the log was replaced/],
  ] as const) {
    test(`${name}: refused with audit_checkpoint_mismatch, or reset on record with acceptReset`, async () => {
      const api = new FakeConfigMaps();
      const path = fresh();
      await run(api, path, 3);
      const before = api.head(path)!;
      await damage(path);
      const kept = await readFile(path, 'utf8').catch(() => undefined);
      await assert.rejects(open(api, path), (err: unknown) => isCode('audit_checkpoint_mismatch')(err) && found.test((err as Error).message) && /checkpoint ConfigMap task-broker-system\/task-broker-audit-head-/.test((err as Error).message));
      assert.deepEqual(api.head(path), before, 'the checkpoint is left as it was');
      assert.equal(await readFile(path, 'utf8').catch(() => undefined), kept, 'nothing was appended (a missing log is not created)');

      const lines: string[] = [];
      const { audit, checkpoint } = await open(api, path, true, lines);
      const first = audit.nextSeq - 1;
      await audit.append(event(99));
      await audit.close();
      await checkpoint.close();
      const records = (await readFile(path, 'utf8')).split('\n').slice(0, -1).map((l) => JSON.parse(l) as AuditRecord);
      const reset = records[first]!;
      assert.equal(reset.type, 'audit.reset');
      assert.equal(reset.outcome, 'ok');
      assert.equal(records.length, first + 2, 'audit.reset is the first record appended');
      assert.deepEqual((reset.details as Record<string, Record<string, unknown>>)['checkpoint']!['seq'], 2);
      assert.equal((reset.details as Record<string, Record<string, unknown>>)['checkpoint']!['hash'], before['hash']);
      assert.equal((reset.details as Record<string, Record<string, unknown>>)['found']!['records'], first);
      assert.match(lines.join('\n'), /--accept-audit-reset/);
      assert.equal((await verifyAuditFile(path)).ok, true);
      assert.equal(api.head(path)!['seq'], String(first + 1), 'the checkpoint follows the new log');
      // And the next start is an ordinary one.
      await run(api, path, 0);
    });
  }

  test('a malformed checkpoint is refused like a mismatch', async () => {
    const api = new FakeConfigMaps();
    const path = fresh();
    await run(api, path, 1);
    api.objects.values().next().value!.data!['seq'] = 'seven';
    await assert.rejects(open(api, path), (err: unknown) => isCode('audit_checkpoint_mismatch')(err) && /malformed: seq "seven"/.test((err as Error).message));
  });

  test('a checkpoint that cannot be read stops the start (cluster_unavailable); a failed write is reported and retried', async () => {
    const api = new FakeConfigMaps();
    const path = fresh();
    api.fail = 403;
    await assert.rejects(open(api, path), (err: unknown) => isCode('cluster_unavailable')(err) && /get, create and update on configmaps in namespace task-broker-system/.test((err as Error).message));
    api.fail = undefined;
    const lines: string[] = [];
    const { audit, checkpoint } = await open(api, path, false, lines);
    api.fail = 500;
    await audit.append(event(0));
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(lines.filter((l) => /writing the audit checkpoint/.test(l)).length, 1, 'reported once, not every second');
    assert.ok(checkpoint.lastError);
    api.fail = undefined;
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(checkpoint.lastError, undefined);
    assert.equal(api.head(path)!['seq'], '0');
    await audit.close();
    await checkpoint.close();
  });
});

describe('broker audit verify', () => {
  async function cli(args: string[]): Promise<{ stdout: string; error: unknown }> {
    const program = new Command('broker').exitOverride();
    program.addCommand(auditCommand());
    program.commands.forEach(function inherit(c) {
      c.exitOverride();
      c.commands.forEach(inherit);
    });
    let stdout = '';
    const write = process.stdout.write;
    process.stdout.write = ((chunk: string) => {
      stdout += chunk;
      return true;
    }) as typeof process.stdout.write;
    try {
      await program.parseAsync(args, { from: 'user' });
      return { stdout, error: undefined };
    } catch (error) {
      return { stdout, error };
    } finally {
      process.stdout.write = write;
    }
  }

  test('ok, broken, --expect-last and -o json', async () => {
    const { path, lines } = await makeLog(3);
    const lastHash = (JSON.parse(lines[2]!) as { hash: string }).hash;
    let res = await cli(['audit', 'verify', path]);
    assert.equal(res.error, undefined);
    assert.match(res.stdout, new RegExp(`ok: 3 records, last hash ${lastHash}\\n$`));
    res = await cli(['audit', 'verify', path, '--expect-last', lastHash, '-o', 'json']);
    assert.deepEqual(JSON.parse(res.stdout), { ok: true, records: 3, lastHash });

    await writeFile(path, lines.slice(0, 2).map((l) => l + '\n').join(''));
    res = await cli(['audit', 'verify', path, '--expect-last', lastHash]);
    assert.ok(isCode('audit_chain_broken')(res.error));
    assert.match((res.error as Error).message, /^broken at line 2 \(seq 1\): /);

    const broken = [lines[0], lines[2]].map((l) => l + '\n').join('');
    await writeFile(path, broken);
    res = await cli(['audit', 'verify', path, '-o', 'json']);
    assert.ok(isCode('audit_chain_broken')(res.error), 'exit status 1 through main.ts');
    assert.deepEqual(JSON.parse(res.stdout), { ok: false, records: 1, line: 2, seq: 2, reason: 'seq 2 where 1 was expected (a record was removed, inserted or moved)' });

    res = await cli(['audit', 'verify', path, '--expect-last', 'nope']);
    assert.ok(isCode('invalid_argument')(res.error));
    res = await cli(['audit', 'verify', join(dir, 'missing.jsonl')]);
    assert.ok(isCode('invalid_argument')(res.error));
  });
});
