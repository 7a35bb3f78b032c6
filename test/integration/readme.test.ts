/**
 * The README's by-hand walk-through (the sh block of "Try it") works when pasted into bash at the top
 * of a clone after ./install.sh: this runs that very block, taken from README.md.
 *
 * It runs in a directory of its own that looks like the clone (bin/broker, docs/ and .cache/ linked),
 * so that the files it writes (audit log, tokens, kubeconfigs) land there and not in the working
 * tree; on a free port instead of the README's 8080; under `set -e`, so the first failing command
 * fails it. Everything it starts is stopped afterwards even when it fails: the block's processes
 * share bash's process group (killed by its id), and the control plane it starts is found by its
 * state file under the TMPDIR given to bash, then stopped with `broker dev-cluster down`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, type RunResult } from '../helpers/kube.ts';
import { freePort } from '../../src/cluster/local-cluster.ts';

const ROOT = new URL('../..', import.meta.url).pathname;
const TIMEOUT_MS = 180_000;

/** The sh block of README.md's "Try it" section that starts a control plane. */
function readmeBlock(): string {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('\n## Try it'));
  const blocks = [...section.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
  const block = blocks.find((b) => b.includes('dev-cluster up'));
  assert.ok(block, 'README.md: no sh block with `dev-cluster up` under "## Try it"');
  return block;
}


test('the README walk-through runs as written: refused before the task, allowed while it lives, the log verifies, nothing left running', async () => {
  const block = readmeBlock();
  assert.match(block, /127\.0\.0\.1:8080/);
  const port = await freePort();
  const base = mkdtempSync(join(tmpdir(), 'tb-readme-'));
  const [clone, tmp, home] = ['clone', 'tmp', 'home'].map((d) => join(base, d)) as [string, string, string];
  for (const d of [join(clone, 'bin'), tmp, home]) mkdirSync(d, { recursive: true });
  symlinkSync(join(ROOT, 'bin/broker'), join(clone, 'bin/broker'));
  symlinkSync(join(ROOT, 'docs'), join(clone, 'docs'));
  symlinkSync(join(ROOT, '.cache'), join(clone, '.cache'));
  const script = join(base, 'readme.sh');
  writeFileSync(script, `set -e -o pipefail\n${block.replaceAll('127.0.0.1:8080', `127.0.0.1:${port}`)}`);

  // A clean environment: none of this process's KUBECONFIG or BROKER_*; kubectl's cache in a new HOME.
  const env = { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: home, TMPDIR: tmp, NO_COLOR: '1', LANG: 'C.UTF-8' };
  const child = spawn('bash', [script], { cwd: clone, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const killGroup = () => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // the group is gone
    }
  };
  const timer = setTimeout(killGroup, TIMEOUT_MS);
  const code = await new Promise<number | null>((done) => child.on('close', (c) => done(c)));
  clearTimeout(timer);
  const clusters = () => readdirSync(tmp).map((d) => join(tmp, d)).filter((d) => existsSync(join(d, 'cluster.json')));
  const left = clusters();
  try {
    const out = `exit ${code}\n--- stdout\n${stdout}\n--- stderr\n${stderr}`;
    assert.equal(code, 0, out);
    // Refused before the task, allowed during it, the log verifies.
    assert.match(stderr, /^broker credential: .*no active task "read-pods"/m, out);
    assert.match(stdout, /^started task read-pods /m, out);
    assert.match(stderr, /^No resources found in demo namespace\.$/m, out);
    assert.match(stdout, /^ended task read-pods /m, out);
    assert.match(stdout, /^ok: \d+ records, last hash [0-9a-f]{64}$/m, out);
    // Its own last line stopped the control plane.
    assert.deepEqual(left, [], 'the block left a control plane running');
  } finally {
    killGroup();
    for (const dir of clusters()) {
      const down: RunResult = await run(join(ROOT, 'bin/broker'), ['dev-cluster', 'down', '--dir', dir], { PATH: env.PATH, HOME: home, TMPDIR: tmp });
      assert.equal(down.code, 0, down.stderr);
    }
    rmSync(base, { recursive: true, force: true });
  }
});
