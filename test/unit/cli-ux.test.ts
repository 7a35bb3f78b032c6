/** The pure parts of the first-hour fixes (issue 10): did-you-mean, units, relative times, escaping, completion, the client's URL rules. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../helpers/kube.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { relativeTime, safe, when } from '../../src/cli/output.ts';
import { didYouMean, inUnitOf } from '../../src/tasks/service.ts';
import { BrokerClient, isLoopback, readIdentity } from '../../src/client/broker-client.ts';
import type { V1ConfigMap } from '@kubernetes/client-node';
import { exportJWK, generateKeyPair } from 'jose';
import type { KubeApis } from '../../src/kube/config.ts';
import { StateSigner } from '../../src/state-signature.ts';
import { TaskHistory } from '../../src/tasks/history.ts';
import type { Task } from '../../src/tasks/model.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;
const cli = (args: string[], env: NodeJS.ProcessEnv = {}) => run(process.execPath, [MAIN, ...args], { ...process.env, NO_COLOR: '1', ...env });

test('did you mean: a prefix, or the closest name within two edits; nothing for a far miss', () => {
  const names = ['read-pods', 'configmap-writer', 'debug-exec'];
  assert.equal(didYouMean('read-pod', names), 'read-pods');
  assert.equal(didYouMean('raed-pods', names), 'read-pods');
  assert.equal(didYouMean('debug', names), 'debug-exec');
  assert.equal(didYouMean('configmap-writter', names), 'configmap-writer');
  assert.equal(didYouMean('deploy', names), undefined);
  assert.equal(didYouMean('read-pods', names), undefined, 'an exact name is no suggestion');
  assert.equal(didYouMean('', names), undefined);
  assert.equal(didYouMean('team-c', ['team-a', 'team-b']), 'team-a', 'ties go to the first');
});

test('a TTL out of range is told in the unit the user typed', () => {
  assert.equal(inUnitOf(3600, '90m'), '60m');
  assert.equal(inUnitOf(3600, '2h'), '1h');
  assert.equal(inUnitOf(3600, '7200s'), '3600s');
  assert.equal(inUnitOf(5400, '2h'), '1h30m', 'not a whole number of hours: the shortest duration');
  assert.equal(inUnitOf(10, '2h'), '10s');
  assert.equal(inUnitOf(600, undefined), '600s', 'whole seconds when nothing was typed (a number in the JSON)');
});

test('relative times: in the future and the past, coarse units, the absolute time kept in detail views', () => {
  const now = Date.parse('2026-05-01T10:00:00.000Z');
  const at = (s: number) => new Date(now + s * 1000).toISOString();
  assert.equal(relativeTime(at(9 * 60 + 59), now), 'in 9m');
  assert.equal(relativeTime(at(-3 * 60), now), '3m ago');
  assert.equal(relativeTime(at(42), now), 'in 42s');
  assert.equal(relativeTime(at(0), now), 'now');
  assert.equal(relativeTime(at(80 * 60), now), 'in 1h20m');
  assert.equal(relativeTime(at(-2 * 3600), now), '2h ago');
  assert.equal(relativeTime(at(-(2 * 86400 + 3 * 3600 + 59)), now), '2d3h ago');
  assert.equal(relativeTime('not a time', now), 'not a time');
  assert.equal(when(at(600), now), `in 10m (${at(600)})`);
});

test('safe() escapes C0, DEL, C1 and bidi overrides, and doubles a backslash, leaving plain text alone', () => {
  assert.equal(safe('read-pods in team-a: "ok"'), 'read-pods in team-a: "ok"');
  assert.equal(safe('a\x1b[31mred\x07'), 'a\\x1b[31mred\\x07');
  assert.equal(safe('line\nnext\r'), 'line\\x0anext\\x0d');
  assert.equal(safe('del\x7f c1\u009b[2J'), 'del\\x7f c1\\u009b[2J');
  assert.equal(safe('bidi \u202eevil\u2066'), 'bidi \\u202eevil\\u2066');
  assert.equal(safe('back\\slash'), 'back\\\\slash');
});

test('the client sends the identity over plain http:// only to loopback, naming where the URL came from', () => {
  const env = { BROKER_IDENTITY_TOKEN: 'x' };
  assert.ok(isLoopback('127.0.0.1') && isLoopback('127.9.8.7') && isLoopback('localhost') && isLoopback('[::1]'));
  assert.ok(!isLoopback('10.0.0.1') && !isLoopback('broker.example') && !isLoopback('127.0.0.1.nip.io'));
  assert.throws(() => new BrokerClient({ env: { ...env, BROKER_URL: 'http://broker.example:8080' } }), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'invalid_argument');
    assert.match(err.message, /the broker URL from BROKER_URL is plain http:\/\/ to broker\.example:8080, which is not loopback: use https:\/\//);
    return true;
  });
  assert.throws(() => new BrokerClient({ broker: 'http://10.1.2.3', env }), /from --broker is plain http:\/\/ to 10\.1\.2\.3/);
  assert.throws(() => new BrokerClient({ broker: 'ftp://127.0.0.1', env }), /must be https:\/\//);
  // Refused before the identity is even read.
  assert.throws(() => new BrokerClient({ broker: 'http://broker.example', env: {} }), /not loopback/);
  new BrokerClient({ broker: 'http://127.0.0.1:1', env }).close();
});

test('a missing identity file names the variable that pointed at it and how to get one', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tb-ux-'));
  try {
    assert.throws(() => readIdentity({ BROKER_IDENTITY_TOKEN_FILE: join(dir, 'nope') }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'unauthenticated');
      assert.match(err.message, /BROKER_IDENTITY_TOKEN_FILE points at .*nope, which does not exist; an identity is one of: an agent key/);
      assert.match(err.message, /broker agent enroll CODE.*BROKER_IDENTITY_TOKEN or BROKER_IDENTITY_TOKEN_FILE/);
      return true;
    });
    writeFileSync(join(dir, 'empty'), '\n');
    assert.throws(() => readIdentity({ BROKER_IDENTITY_TOKEN_FILE: join(dir, 'empty') }), /points at .*empty, which is empty/);
    // No keychain to ask here (no session bus): said, with the alternatives.
    assert.throws(() => readIdentity({}, 'http://127.0.0.1:1'), /no identity: none of BROKER_IDENTITY_TOKEN_FILE, BROKER_IDENTITY_TOKEN, BROKER_AGENT_KEY is set, and the keychain holds no agent key or login for http:\/\/127.0.0.1:1/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a mistyped flag is reported as unknown with a suggestion, not as the required flag missing', async () => {
  for (const args of [
    ['task', 'start', 'read-pods', '--namespase', 'team-a'],
    ['run', 'deployer', '--namspace', 'team-a', '--', 'true'],
    ['kubeconfig', '--tsk', 'x'],
    ['deny', 'ar-000000000000', '--reasn', 'no'],
  ]) {
    const res = await cli(args);
    assert.equal(res.code, EXIT.usage, args.join(' '));
    assert.match(res.stderr, /error: unknown option '--\w+'\n\(Did you mean --(namespace|task|reason)\?\)/, args.join(' '));
    assert.doesNotMatch(res.stderr, /required/);
  }
});

test('a truly missing --namespace is a usage error that names the flag and gives an example', async () => {
  const res = await cli(['task', 'start', 'read-pods'], { BROKER_URL: 'http://127.0.0.1:1', BROKER_IDENTITY_TOKEN: 'x' });
  assert.equal(res.code, EXIT.usage);
  assert.match(res.stderr, /--namespace is required: .* e\.g\. broker task start read-pods --namespace team-a \(`broker templates` lists/);
  const run2 = await cli(['run', 'deployer', '--', 'true']);
  assert.equal(run2.code, EXIT.usage);
  assert.match(run2.stderr, /e\.g\. broker run deployer --namespace/);
});

test('deny --help says --reason is required; run takes --wait', async () => {
  assert.match((await cli(['deny', '--help'])).stdout, /--reason <text>\s+why \(required\)/);
  assert.match((await cli(['run', '--help'])).stdout, /--wait\s+for a gated template/);
});

test('policy apply takes $KUBECONFIG when --kubeconfig is not given, and says which it used', async () => {
  const policy = new URL('../fixtures/broker-policy.yaml', import.meta.url).pathname;
  const none = await cli(['policy', 'apply', policy, '--dry-run'], { KUBECONFIG: '' });
  assert.equal(none.code, EXIT.usage);
  assert.match(none.stderr, /pass --kubeconfig PATH or set KUBECONFIG/);
  const fromEnv = await cli(['policy', 'apply', policy, '--dry-run'], { KUBECONFIG: '/nonexistent/admin.kubeconfig' });
  assert.match(fromEnv.stderr, /kubeconfig from \$KUBECONFIG: \/nonexistent\/admin\.kubeconfig/);
  assert.match(fromEnv.stderr, /could not load the kubeconfig \/nonexistent\/admin\.kubeconfig/);
  const flag = await cli(['policy', 'apply', policy, '--dry-run', '--kubeconfig', '/nonexistent/b'], { KUBECONFIG: '/nonexistent/a' });
  assert.match(flag.stderr, /kubeconfig from --kubeconfig: \/nonexistent\/b/);
});

test('completion: bash, sourced, completes commands, subcommands, flags and choices from the command tree', async () => {
  const script = await cli(['completion', 'bash']);
  assert.equal(script.code, EXIT.ok, script.stderr);
  const dir = mkdtempSync(join(tmpdir(), 'tb-comp-'));
  try {
    const file = join(dir, 'broker.bash');
    writeFileSync(file, script.stdout);
    const probe = (line: string) =>
      `COMP_WORDS=(${line}); COMP_CWORD=$((\${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _broker; echo "${line.replace(/"/g, '\\"')} => \${COMPREPLY[*]}"`;
    const res = await run('bash', [
      '-c',
      [`source ${file}`, 'complete -p broker', probe('broker ta'), probe("broker task ''"), probe('broker task li'), probe("broker task list -o ''"), probe('broker completion f'), probe('broker task start x --na'), probe('broker --broker http://x whoa')].join('\n'),
    ]);
    assert.equal(res.code, 0, res.stderr);
    const lines = res.stdout.trim().split('\n');
    assert.match(lines[0]!, /^complete .*-F _broker broker$/);
    assert.deepEqual(lines.slice(1), [
      'broker ta => task',
      "broker task '' => start end list show",
      'broker task li => list',
      "broker task list -o '' => text json",
      'broker completion f => fish',
      'broker task start x --na => --namespace --name',
      'broker --broker http://x whoa => whoami',
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('completion: zsh and fish scripts name every command; an unknown shell is a usage error', async () => {
  const zsh = await cli(['completion', 'zsh']);
  assert.match(zsh.stdout, /^#compdef broker\n/);
  assert.match(zsh.stdout, /bashcompinit/);
  const fish = await cli(['completion', 'fish']);
  assert.match(fish.stdout, /complete -c broker -f -a '\(__broker_complete\)'/);
  for (const name of ['whoami', 'templates', 'task', 'approvals', 'completion']) assert.match(fish.stdout, new RegExp(`'${name}' '`));
  const bad = await cli(['completion', 'powershell']);
  assert.equal(bad.code, EXIT.usage);
  assert.match(bad.stderr, /Allowed choices are bash, zsh, fish/);
});

const has = (shell: string) => ['/usr/bin', '/bin', '/usr/local/bin'].some((d) => existsSync(join(d, shell)));

test('completion: fish, sourced, completes commands with their descriptions, flags and choices', { skip: !has('fish') && !process.env['CI'] && 'fish is not installed (apt-get install fish; .ci/run installs it)' }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tb-comp-'));
  try {
    const file = join(dir, 'broker.fish');
    writeFileSync(file, (await cli(['completion', 'fish'])).stdout);
    const lines = ['broker ta', 'broker task ', 'broker task list -o ', 'broker task start x --na'];
    const res = await run('fish', ['-c', `source ${file}; for l in '${lines.join("' '")}'; echo "$l => "(complete -C"$l" | string replace -r '\\t.*' '' | string join ' '); end`]);
    assert.equal(res.code, 0, res.stderr);
    assert.deepEqual(res.stdout.trim().split('\n'), ['broker ta => task', 'broker task  => end list show start', 'broker task list -o  => json text', 'broker task start x --na => --name --namespace']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('completion: zsh, through bashcompinit, registers broker and completes subcommands and choices', { skip: !has('zsh') && !process.env['CI'] && 'zsh is not installed (apt-get install zsh; .ci/run installs it)' }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tb-comp-'));
  try {
    const file = join(dir, 'broker.zsh');
    writeFileSync(file, (await cli(['completion', 'zsh'])).stdout);
    // zsh filters COMPREPLY by the typed prefix itself, so only words after a space are probed here.
    const res = await run('zsh', [
      '-c',
      `autoload -U compinit && compinit -u; source ${file}; complete -p broker; for l in 'broker task ' 'broker task list -o ' 'broker completion '; do COMP_WORDS=(\${=l} ''); COMP_CWORD=$(( \${#COMP_WORDS} - 1 )); COMPREPLY=(); _broker; print -- "$l => \${COMPREPLY[*]}"; done`,
    ]);
    assert.equal(res.code, 0, res.stderr);
    // zsh's `complete -p NAME` lists every registration (bashcompinit's own `_bash bash` too).
    assert.deepEqual(res.stdout.trim().split('\n').filter((l) => !l.startsWith('complete _bash')), ['complete -o default -F _broker broker', 'broker task  => start end list show', 'broker task list -o  => text json', 'broker completion  => bash zsh fish']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('one deadline covers the whole request: a broker that sends its answer slowly is cut at it', async () => {
  const { createServer } = await import('node:http');
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.write('{"subject": "');
    const drip = setInterval(() => res.write('x'), 100); // never finishes, never idle for long
    res.on('close', () => clearInterval(drip));
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const client = new BrokerClient({ broker: `http://127.0.0.1:${(server.address() as { port: number }).port}`, env: { BROKER_IDENTITY_TOKEN: 'x' }, deadlineMs: 1000 });
  const started = Date.now();
  try {
    await assert.rejects(client.whoami(), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'broker_unreachable');
      assert.match(err.message, /gave no complete answer: timed out after 1 s/);
      return true;
    });
    assert.ok(Date.now() - started < 3000, 'cut at the deadline, not when the answer ends');
  } finally {
    await client.close();
    server.closeAllConnections();
    await new Promise((done) => server.close(done));
  }
});

/** A ConfigMap API in memory: enough of the CoreV1Api for the task history. */
function fakeConfigMaps() {
  const items = new Map<string, V1ConfigMap>();
  let clock = Date.parse('2026-05-01T00:00:00Z');
  const select = (selector: string) => (cm: V1ConfigMap) =>
    selector.split(',').every((term) => {
      const [k, v] = term.split('=');
      return cm.metadata?.labels?.[k!] === v;
    });
  const core = {
    createNamespacedConfigMap: async ({ body }: { body: V1ConfigMap }) => {
      const name = body.metadata!.name!;
      if (items.has(name)) throw Object.assign(new Error('exists'), { code: 409 });
      clock += 1000;
      items.set(name, { ...body, metadata: { ...body.metadata, creationTimestamp: new Date(clock) } });
      return body;
    },
    listNamespacedConfigMap: async ({ labelSelector }: { labelSelector: string }) => ({ items: [...items.values()].filter(select(labelSelector)) }),
    deleteNamespacedConfigMap: async ({ name }: { name: string }) => void items.delete(name),
  };
  return { kube: { core } as unknown as KubeApis, items };
}

function task(id: string, name: string, agent = 'alpha'): Task {
  const at = new Date('2026-05-01T00:00:00Z');
  return { id, name, agent, template: 'read-pods', namespace: 'team-a', createdAt: at, expiresAt: at, state: 'active', secretName: 's', serviceAccount: 'sa', roleBinding: 'rb' };
}

test('task history: written signed, read back verified (a changed entry is ignored), by id or the latest of a name, swept by age and per-agent count', async () => {
  const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
  const jwk = { ...(await exportJWK(privateKey)), kid: 'k1' };
  const signer = new StateSigner({ keySet: async () => ({ current: jwk }) } as never);
  const { kube, items } = fakeConfigMaps();
  let now = new Date('2026-05-01T00:00:10Z');
  const history = new TaskHistory(kube, 'tb-system', 3600, { signer, now: () => now, cacheMs: 0, maxPerAgent: 2 });

  await history.record(task('aaaaaaaaaaa1', 'debug'), 'ended', 'ended by agent:alpha', 'agent:alpha');
  now = new Date('2026-05-01T00:00:20Z');
  await history.record(task('aaaaaaaaaaa2', 'debug'), 'expired', 'its TTL ran out', 'system:sweeper');
  await history.record(task('bbbbbbbbbbb1', 'other', 'beta'), 'revoked', 'forged', 'system:broker');
  assert.ok(items.get('task-history-aaaaaaaaaaa1')?.metadata?.annotations?.['task-broker.dev/signature']?.startsWith('k1.'));

  assert.deepEqual((await history.list('alpha')).map((e) => [e.task.id, e.state]), [['aaaaaaaaaaa2', 'expired'], ['aaaaaaaaaaa1', 'ended']]);
  assert.equal((await history.find('alpha', 'debug'))?.task.id, 'aaaaaaaaaaa2', 'a name finds its latest task');
  assert.equal((await history.find('alpha', 'aaaaaaaaaaa1'))?.state, 'ended');
  assert.equal(await history.find('alpha', 'bbbbbbbbbbb1'), undefined, "another agent's entry is not found");

  // Changed outside the broker: ignored on read.
  const cm = items.get('task-history-aaaaaaaaaaa2')!;
  items.set(cm.metadata!.name!, { ...cm, data: { entry: cm.data!['entry']!.replace('team-a', 'team-b') } });
  assert.deepEqual((await history.list('alpha')).map((e) => e.task.id), ['aaaaaaaaaaa1']);

  // Per agent at most 2 (the newest), and nothing older than the retention.
  await history.record(task('aaaaaaaaaaa3', 'third'), 'ended', 'ended', 'agent:alpha');
  assert.equal(await history.sweep(), 1);
  assert.ok(!items.has('task-history-aaaaaaaaaaa1'), 'the oldest of three went');
  now = new Date(Date.parse('2026-05-01T02:00:00Z'));
  assert.equal(await history.sweep(), 3);
  assert.equal(items.size, 0);
});
