/** The README's walk-through (docs/examples/quickstart.sh) works exactly as written. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { run } from '../helpers/kube.ts';

test('docs/examples/quickstart.sh runs end to end and shows access only while the task lives', async () => {
  const script = new URL('../../docs/examples/quickstart.sh', import.meta.url).pathname;
  const res = await run(script, [], { PATH: process.env['PATH'], HOME: process.env['HOME'], TMPDIR: process.env['TMPDIR'] ?? '/tmp' }, 120_000);
  const out = res.stdout + res.stderr;
  assert.equal(res.code, 0, out);
  assert.match(res.stdout, /-> refused: no task yet/);
  assert.match(res.stdout, /started task read-pods \([a-z0-9]+\): read-pods in demo until/);
  assert.match(out, /No resources found in demo namespace/);
  assert.match(out, /secrets is forbidden: User "system:serviceaccount:task-broker:task-[a-z0-9]+"/);
  assert.match(res.stdout, /-> refused: the task has ended/);
  // 6 records of the task, and the agent key's registration and enrolment.
  assert.match(res.stdout, /ok: 8 records, last hash [0-9a-f]{64}/);
});
