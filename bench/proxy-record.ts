/**
 * What the proxy's `k8s.request` record costs the broker's CPU (bench/proxy.ts measures it under load;
 * this one apart from everything else): the record of one proxied GET made durable by AuditLog.append,
 * with 1, 2 and 10 callers in flight (records per durable write: 1, 2, 10), for 3 s each after a
 * warm-up, and the CPU
 * time (user + system, all threads, process.cpuUsage) per record. The difference between the counts
 * splits it into a part per record and a part per durable write (O_DSYNC write through the thread pool).
 * Before them, the CPU of the record's steps one by one (100 000 times each, which also warms the code up).
 * On Linux, also each row's CPU per durable write by thread (/proc/self/task/TID/schedstat, run time in
 * ns): the main thread, libuv's thread pool (the O_DSYNC write itself), and V8's own threads.
 *
 *   bin/bench proxy-record [DIR=/tmp]     e.g. DIR=/dev/shm for a log on tmpfs
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { AuditLog, checkEvent } from '../src/audit/log.ts';
import { canonicalRecordJson, sha256Hex } from '../src/audit/verify.ts';
import { proxyRecord } from '../src/proxy/record.ts';
import { requestInfo } from '../src/proxy/request-info.ts';
import { table } from './_common.ts';

const base = process.argv[2] ?? '/tmp';
const url = '/api/v1/namespaces/team-a/configmaps/target';
const task = { id: 't0123456789abcdefgh', agent: 'alpha', name: 'bench', template: 'bench', sid: '0b7e5a4e-0000-4000-8000-000000000000' };
const req = { method: 'GET', url, info: requestInfo('GET', url), userAgent: 'kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0', source: '127.0.0.1', kubectlCommand: 'kubectl get', kubectlSession: '5f3e1c2a-1111-4222-8333-444455556666' };
const record = () => proxyRecord(task, req, { code: 200, auditID: '5f3e1c2a-1111-4222-8333-444455556666', outcome: 'allowed', bytesIn: 0, bytesOut: 900, durationMs: 1.23 });

/** CPU time (ns) of each thread group of this process so far: main (the event loop), libuv's pool, the rest (V8); undefined off Linux. */
function threadCpu(): { main: number; pool: number; other: number } | undefined {
  try {
    const out = { main: 0, pool: 0, other: 0 };
    for (const tid of readdirSync('/proc/self/task')) {
      const ns = Number(readFileSync(`/proc/self/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      const name = readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim();
      out[tid === String(process.pid) ? 'main' : name.startsWith('libuv-worker') ? 'pool' : 'other'] += ns;
    }
    return out;
  } catch {
    return undefined;
  }
}

const dir = mkdtempSync(join(base, 'task-broker-proxy-record-'));
try {
  // The steps first: they also warm the code up (compiled and optimised) before the durable rounds.
  const N = 100_000;
  const step = (f: () => unknown) => {
    for (let i = 0; i < 5000; i++) f();
    const c = process.cpuUsage();
    for (let i = 0; i < N; i++) f();
    const u = process.cpuUsage(c);
    return `${((u.user + u.system) / N).toFixed(2)} us`;
  };
  const ev = record();
  const rec = { seq: 1, time: new Date().toISOString(), ...checkEvent(ev), prev: 'a'.repeat(64) };
  const canonical = canonicalRecordJson(rec);
  console.log(
    table(
      ['step (one record)', 'CPU'],
      [
        ['proxyRecord (src/proxy/record.ts)', step(record)],
        ['checkEvent (src/audit/log.ts: checks, redaction, copy)', step(() => checkEvent(ev))],
        ['canonicalRecordJson (src/audit/verify.ts)', step(() => canonicalRecordJson(rec))],
        [`SHA-256 of the ${canonical.length} bytes`, step(() => sha256Hex(canonical))],
      ],
    ),
  );
  const rows: Array<Array<string | number>> = [];
  const byThread: Array<Array<string | number>> = [];
  const perRecord: Record<number, number> = {};
  // A warm-up round first (not counted): the code compiled and optimised before anything is measured.
  for (const callers of [0, 1, 2, 10]) {
    const log = await AuditLog.open(join(dir, `audit-${callers}.jsonl`));
    let n = 0;
    const end = performance.now() + 3000;
    const cpu0 = process.cpuUsage();
    const threads0 = threadCpu();
    await Promise.all(
      Array.from({ length: callers || 10 }, async () => {
        while (performance.now() < end) {
          await log.append(record());
          n++;
        }
      }),
    );
    const cpu = process.cpuUsage(cpu0);
    const threads1 = threadCpu();
    const { flushes } = log.stats;
    await log.close();
    if (callers === 0) continue;
    perRecord[callers] = (cpu.user + cpu.system) / n;
    rows.push([callers, n, (n / flushes).toFixed(1), `${(cpu.user / n).toFixed(1)} us`, `${(cpu.system / n).toFixed(1)} us`, `${perRecord[callers]!.toFixed(1)} us`]);
    if (threads0 && threads1) {
      const per = (k: 'main' | 'pool' | 'other') => `${((threads1[k] - threads0[k]) / 1000 / flushes).toFixed(1)} us`;
      byThread.push([callers, flushes, per('main'), per('pool'), per('other')]);
    }
  }
  console.log(`\nk8s.request records of a proxied GET made durable, 3 s per row, log in ${dir}\n`);
  console.log(table(['callers', 'records', 'records per durable write', 'CPU user / record', 'system / record', 'total / record'], rows));
  // total(k) = R + W / k for k records per write: two counts give R (per record) and W (per write).
  const W = (perRecord[1]! - perRecord[10]!) / (1 - 1 / 10);
  if (byThread.length > 0) {
    console.log('\nCPU per durable write by thread (run time from /proc/self/task/*/schedstat; records and their write included)\n');
    console.log(table(['callers', 'durable writes', 'main thread', "libuv's pool (the writes)", 'other threads (V8)'], byThread));
  }
  console.log(`\nper durable write about ${W.toFixed(0)} us of CPU, per record about ${(perRecord[10]! - W / 10).toFixed(0)} us (from the 1- and 10-caller rows)`);

} finally {
  rmSync(dir, { recursive: true, force: true });
}
