/** The command line's contract: help, usage errors and their exit codes (docs/cli.md). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { run } from '../helpers/kube.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';

const broker = new URL('../../bin/broker', import.meta.url).pathname;

test('an unknown flag prints usage help and exits with the usage code', async () => {
  const res = await run(broker, ['dev-cluster', 'up', '--no-such-flag']);
  assert.equal(res.code, EXIT.usage);
  assert.match(res.stderr, /unknown option '--no-such-flag'/);
  assert.match(res.stderr, /run with --help for usage/);
  assert.equal(res.stdout, '');
});

test('an unknown command exits with the usage code', async () => {
  const res = await run(broker, ['frobnicate']);
  assert.equal(res.code, EXIT.usage);
  assert.match(res.stderr, /unknown command 'frobnicate'/);
});

test('a missing required option exits with the usage code and names it', async () => {
  const res = await run(broker, ['dev-cluster', 'down']);
  assert.equal(res.code, EXIT.usage);
  assert.match(res.stderr, /required option '--dir <dir>' not specified/);
});

test('-o takes only json or text', async () => {
  const res = await run(broker, ['dev-cluster', 'up', '-o', 'yaml']);
  assert.equal(res.code, EXIT.usage);
  assert.match(res.stderr, /Allowed choices are text, json/);
});

test('--help of every command shows an example and exits 0', async () => {
  const commands = [
    [],
    ['task', 'start'],
    ['task', 'end'],
    ['task', 'list'],
    ['task', 'show'],
    ['run'],
    ['kubeconfig'],
    ['approvals', 'list'],
    ['approvals', 'show'],
    ['whoami'],
    ['templates'],
    ['completion'],
    ['approve'],
    ['deny'],
    ['dev-cluster', 'up'],
    ['dev-cluster', 'down'],
    ['policy', 'check'],
    ['policy', 'apply'],
    ['audit', 'verify'],
    ['serve'],
    ['credential'],
  ];
  for (const args of commands.map((c) => [...c, '--help'])) {
    const res = await run(broker, args);
    assert.equal(res.code, EXIT.ok, args.join(' '));
    assert.match(res.stdout, /Examples?:\n  (broker|eval)/, args.join(" "));
  }
});

test('docs/cli.md documents every exit code with its number', () => {
  const doc = readFileSync(new URL('../../docs/cli.md', import.meta.url), 'utf8');
  for (const [name, code] of Object.entries(EXIT)) {
    assert.match(doc, new RegExp(`^\\| ${code} \\| \`${name}\` \\|`, 'm'), `exit code ${code} (${name})`);
  }
});

test('policy check reports which templates are gated, with what they hit and who approves', async () => {
  const example = new URL('../../docs/examples/policy.yaml', import.meta.url).pathname;
  const res = await run(broker, ['policy', 'check', example, '-o', 'json']);
  assert.equal(res.code, EXIT.ok, res.stderr);
  assert.deepEqual(JSON.parse(res.stdout).summary.gatedTemplates, [
    { template: 'debug-exec', hits: ['create pods/exec'], approvers: ['sre', 'security'], required: 2 },
  ]);
  const text = await run(broker, ['policy', 'check', example]);
  assert.match(text.stdout, /gated: debug-exec \(create pods\/exec\): needs 2 approval\(s\) from sre, security/);
});
