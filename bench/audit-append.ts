/**
 * Appends/s of the audit log, one caller at a time vs 64 concurrent callers (group commit). Every
 * append waits for its own fdatasync in both cases. Run: bin/bench audit-append [records] [dir]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AuditLog } from '../src/audit/log.ts';
import type { AuditEventInput } from '../src/audit/types.ts';

const total = Number(process.argv[2] ?? 2000);
const dir = await mkdtemp(join(process.argv[3] ?? tmpdir(), 'task-broker-audit-bench-'));
const event = (i: number): AuditEventInput => ({
  type: 'credential.minted',
  actor: 'agent:deployer',
  agent: 'deployer',
  task: `task-${i}`,
  namespace: 'shop',
  outcome: 'allowed',
  jti: `0b7e5a4e-0000-4000-8000-${String(i).padStart(12, '0')}`,
});

async function run(name: string, concurrency: number): Promise<number> {
  const log = await AuditLog.open(join(dir, `${name}.jsonl`));
  let next = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < total) await log.append(event(next++));
    }),
  );
  const seconds = (performance.now() - start) / 1000;
  const { flushes } = log.stats;
  await log.close();
  const rate = total / seconds;
  console.log(`${name.padEnd(12)} ${total} appends in ${seconds.toFixed(2)} s: ${Math.round(rate)} appends/s, ${flushes} fdatasyncs (${(total / flushes).toFixed(1)} records each)`);
  return rate;
}

try {
  const sequential = await run('sequential', 1);
  const concurrent = await run('64-way', 64);
  console.log(`ratio: ${(concurrent / sequential).toFixed(1)}x (filesystem of ${dir})`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
