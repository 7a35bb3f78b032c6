/**
 * Agent keys against real parts: the broker process and the real kube-apiserver, the `broker` CLI as
 * users run it, and a real OS keychain (gnome-keyring's Secret Service on a private D-Bus session).
 * Enrol, call, revoke; the attacks (replayed proof, proof for another URL or method, enrolment code
 * used twice) are each 401 with the reason in auth.failed; no key, code or proof rests in any file.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseAgentKey, proofHeader, newAgentKey } from '../../src/identity/agent-proof.ts';
import { agentKeyAccount, keychainGet } from '../../src/identity/keychain.ts';
import { BrokerEnv, POLICY_FILE, type BrokerProcess } from '../helpers/broker.ts';
import { TestKeyring } from '../helpers/keyring.ts';
import { kubectl, run, writeTokenKubeconfig, type RunResult } from '../helpers/kube.ts';
import { scanFiles } from '../helpers/scan.ts';
import { kubectlWith, pluginBuilds, writePluginKubeconfig } from '../helpers/exec-plugin.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;

const POLICY =
  readFileSync(POLICY_FILE, 'utf8')
    .replace('agents:\n', 'agents:\n  - name: keyed\n  - name: boxed\n')
    .replace('agents: [alpha, beta]', 'agents: [alpha, beta, keyed, boxed]') +
  'people:\n  - name: root\n    identities: [{ serviceAccount: agents/admin }]\napprovers:\n  - name: admins\n    members: [{ person: root }]\nadministrators: [admins]\n';

describe('agent keys (issue 14)', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  /** A second replica: same cluster, its own audit log. */
  let replica: BrokerProcess;
  let keyring: TestKeyring;
  let admin: string;
  let alpha: string;
  /** Every secret the suite handled, looked for in HOME and TMPDIR at the end. */
  const secrets: string[] = [];

  /** The CLI with only the given environment (no inherited identity). */
  const cli = (args: string[], extra: NodeJS.ProcessEnv = {}, base: NodeJS.ProcessEnv = keyring.env): Promise<RunResult> =>
    run(process.execPath, [MAIN, ...args], { PATH: process.env['PATH'] ?? '/usr/bin:/bin', BROKER_URL: broker.url, NO_COLOR: '1', ...base, ...extra });

  before(async () => {
    assert.ok(TestKeyring.available(), 'gnome-keyring and dbus-run-session are not installed (.ci/run installs them: apt-get install gnome-keyring dbus)');
    keyring = await TestKeyring.start();
    env = await BrokerEnv.start({
      policyText: POLICY,
      beforeApply: async (kube) => {
        await kube.core.createNamespacedServiceAccount({ namespace: 'agents', body: { metadata: { name: 'admin' } } }).catch(() => undefined);
      },
    });
    broker = await env.startBroker({ extraArgs: ['--auth-failure-log-interval', '1s', '--auth-failure-limit', '1000/10s'] });
    replica = await env.startBroker({ auditLog: join(env.dir, 'replica-audit.jsonl'), extraArgs: ['--auth-failure-limit', '1000/10s'] });
    admin = await env.agentToken('admin');
    alpha = await env.agentToken('alpha');
  });
  after(async () => {
    await replica?.stop();
    await broker?.stop();
    await env?.stop();
    await keyring?.stop();
  });

  async function register(agent: string): Promise<string> {
    const r = await cli(['agent', 'register', agent, '-o', 'json'], { BROKER_IDENTITY_TOKEN: admin });
    assert.equal(r.code, 0, r.stderr);
    const { code, expiresAt } = JSON.parse(r.stdout);
    assert.match(code, /^tbe1\./);
    const minutes = (Date.parse(expiresAt) - Date.now()) / 60_000;
    assert.ok(minutes > 14 && minutes <= 15, `expires in ${minutes} min`);
    secrets.push(code);
    return code;
  }

  test('only an administrator registers an agent; the code is in no audit record', async () => {
    const notAdmin = await cli(['agent', 'register', 'keyed'], { BROKER_IDENTITY_TOKEN: alpha });
    assert.equal(notAdmin.code, 1, notAdmin.stderr);
    assert.match(notAdmin.stderr, /is not an administrator.*\[forbidden\]/);
    const unknown = await cli(['agent', 'register', 'nobody'], { BROKER_IDENTITY_TOKEN: admin });
    assert.match(unknown.stderr, /agent "nobody" is not in the policy/);
    const odd = await fetch(`${broker.url}/v1/agents/${encodeURIComponent('a\u001b[2Jb')}/enrolment`, { method: 'POST', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: '{}' });
    assert.equal(odd.status, 400, 'a name that is no DNS label is refused before it is used');
    const code = await register('keyed');
    const log = readFileSync(broker.auditLog, 'utf8');
    assert.ok(!log.includes(code.slice(5)), 'the code is not in the audit log');
    assert.ok(broker.auditRecords().some((r) => r.type === 'agent.registered' && r.agent === 'keyed' && r.actor === 'user:system:serviceaccount:agents:admin'));
  });

  let keyedCode: string;
  test('enrol: the key goes into the OS keychain; the agent then calls with proofs; a second use of the code is refused 401', async () => {
    keyedCode = await register('keyed');
    const enrolled = await cli(['agent', 'enroll', keyedCode]);
    assert.equal(enrolled.code, 0, enrolled.stderr);
    assert.match(enrolled.stderr, /enrolled agent keyed: key \S+, private key in the OS keychain/);
    assert.equal(enrolled.stdout, '', 'nothing of the key on stdout');
    const who = await cli(['whoami', '-o', 'json']);
    assert.equal(who.code, 0, who.stderr);
    const me = JSON.parse(who.stdout);
    assert.equal(me.method, 'agentKey');
    assert.equal(me.agent, 'keyed');
    assert.equal(me.identitySource, 'keychain (agent key)');
    secrets.push(readKeychainKey());

    const again = await cli(['agent', 'enroll', keyedCode]);
    assert.equal(again.code, 4, again.stderr);
    assert.match(again.stderr, /authentication failed.*\[unauthenticated\]/);
    await reasonRecorded(/enrolment refused: the code is unknown, or was used already/);
    assert.ok(broker.auditRecords().some((r) => r.type === 'agent.enrolled' && r.agent === 'keyed'));
  });

  test('a task started with the agent key; the proof itself is refused by the API server (401)', async () => {
    const start = await cli(['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'keyed-run', '-o', 'json']);
    assert.equal(start.code, 0, start.stderr);
    assert.equal(JSON.parse(start.stdout).agent, 'keyed');
    const key = parseAgentKey(readKeychainKey());
    const proof = proofHeader(key, 'GET', `${env.cluster.server}/api/v1/namespaces/team-a/pods`).slice('AgentProof '.length);
    secrets.push(proof);
    // The proof on kubectl's command line, never in a file.
    const res = await kubectl(writeTokenKubeconfig(join(env.dir, 'no-token.kubeconfig'), env.cluster, 'none'), '--token', proof, 'get', 'pods', '-n', 'team-a');
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /Unauthorized|must be logged in/);
  });

  test('the exec plugin (each build) with the keychain\'s agent key: kubectl works through real kubectl', async () => {
    for (const build of pluginBuilds()) {
      const kc = writePluginKubeconfig(env.dir, env.cluster, broker.url, 'keyed-run', build);
      const res = await kubectlWith(kc, keyring.env, 'get', 'pods', '-n', 'team-a');
      assert.equal(res.code, 0, `${build}: ${res.stderr}`);
      const denied = await kubectlWith(kc, keyring.env, 'get', 'secrets', '-n', 'team-a');
      assert.match(denied.stderr, /forbidden: User "system:serviceaccount:task-broker:task-/, build);
    }
  });

  test('attacks: a replayed proof, a proof for another URL, for another method, an expired one, one signed by another key: 401 each, reason recorded', async () => {
    const key = parseAgentKey(readKeychainKey());
    const url = (path: string) => broker.url + path;
    const call = (method: string, path: string, authorization: string) => fetch(url(path), { method, headers: { authorization } });
    const once = proofHeader(key, 'GET', url('/v1/whoami'));
    assert.equal((await call('GET', '/v1/whoami', once)).status, 200, 'the first use');
    const cases: Array<[string, () => Promise<Response>, RegExp]> = [
      ['replayed proof', () => call('GET', '/v1/whoami', once), /it was used before \(a replay\)/],
      ['another URL', () => call('GET', '/v1/whoami', proofHeader(key, 'GET', url('/v1/tasks'))), /it was made for another URL/],
      ['another method', () => call('DELETE', '/v1/tasks/keyed-run', proofHeader(key, 'GET', url('/v1/tasks/keyed-run'))), /it was made for another method \(GET, not DELETE\)/],
      ['expired', () => call('GET', '/v1/whoami', proofHeader(key, 'GET', url('/v1/whoami'), Date.now() - 120_000)), /it has expired/],
      [
        'another key',
        () => call('GET', '/v1/whoami', proofHeader(parseAgentKey(newAgentKey().forAgent('keyed')), 'GET', url('/v1/whoami'))),
        /its signature does not verify with agent "keyed"'s key/,
      ],
    ];
    for (const [name, attempt, reason] of cases) {
      const res = await attempt();
      assert.equal(res.status, 401, name);
      assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'unauthenticated', name);
      await reasonRecorded(reason, name);
    }
    const tasks = await cli(['task', 'list', '-o', 'json']);
    assert.equal(JSON.parse(tasks.stdout).tasks.length, 1, 'the task a wrong-method proof tried to end is still there');
  });

  test('one enrolment code used by four requests at once: exactly one enrols', async () => {
    const code = await register('boxed');
    const attempt = () =>
      fetch(`${broker.url}/v1/agents/enroll`, {
        method: 'POST',
        headers: { authorization: `Enrolment ${code}`, 'content-type': 'application/json' },
        body: JSON.stringify({ publicKey: newAgentKey().publicKey }),
      }).then((r) => r.status);
    const statuses = (await Promise.all([attempt(), attempt(), attempt(), attempt()])).sort();
    assert.deepEqual(statuses, [201, 401, 401, 401]);
  });

  test('no keychain: enroll fails before using the code, naming the alternatives; --print-key then BROKER_AGENT_KEY works', async () => {
    const code = await register('boxed');
    const bare = { HOME: keyring.home }; // no session bus
    const refused = await cli(['agent', 'enroll', code], {}, bare);
    assert.equal(refused.code, 4, refused.stderr);
    assert.match(refused.stderr, /the OS keychain cannot be used: .*BROKER_AGENT_KEY.*BROKER_IDENTITY_TOKEN.*\[keychain_unavailable\]/);
    const printed = await cli(['agent', 'enroll', code, '--print-key'], {}, bare);
    assert.equal(printed.code, 0, printed.stderr);
    const m = /^BROKER_AGENT_KEY=(tbak1\.boxed\.\S+)\n$/.exec(printed.stdout);
    assert.ok(m, printed.stdout.replace(/tbak1\.\S+/, 'tbak1.[...]'));
    secrets.push(m[1]!);
    const who = await cli(['whoami', '-o', 'json'], { BROKER_AGENT_KEY: m[1]! }, bare);
    assert.equal(who.code, 0, who.stderr);
    assert.deepEqual([JSON.parse(who.stdout).agent, JSON.parse(who.stdout).identitySource], ['boxed', 'BROKER_AGENT_KEY']);
    const start = await cli(['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'boxed-run'], { BROKER_AGENT_KEY: m[1]! }, bare);
    assert.equal(start.code, 0, start.stderr);
    for (const build of pluginBuilds()) {
      const kc = writePluginKubeconfig(env.dir, env.cluster, broker.url, 'boxed-run', build);
      const res = await kubectlWith(kc, { ...bare, BROKER_AGENT_KEY: m[1]! }, 'get', 'pods', '-n', 'team-a');
      assert.equal(res.code, 0, `${build} with BROKER_AGENT_KEY: ${res.stderr}`);
    }
    assert.equal((await cli(['task', 'end', 'boxed-run'], { BROKER_AGENT_KEY: m[1]! }, bare)).code, 0);
    const none = await cli(['whoami'], {}, bare);
    assert.equal(none.code, 4);
    assert.match(none.stderr, /no identity: .*the OS keychain could not be asked.*BROKER_AGENT_KEY/);
  });

  test('revoke: the key is refused at once and every task of the agent ends', async () => {
    const list = await cli(['agent', 'list', '-o', 'json'], { BROKER_IDENTITY_TOKEN: admin });
    assert.equal(list.code, 0, list.stderr);
    const keyed = JSON.parse(list.stdout).agents.find((a: { name: string }) => a.name === 'keyed');
    assert.equal(keyed.activeTasks, 1);
    assert.ok(keyed.key.fingerprint);
    // The key is in the cluster: the other replica takes the agent's proofs too.
    const key = parseAgentKey(readKeychainKey());
    const onReplica = () => fetch(`${replica.url}/v1/whoami`, { headers: { authorization: proofHeader(key, 'GET', `${replica.url}/v1/whoami`) } });
    assert.equal((await onReplica()).status, 200, 'the replica knows the enrolled key');
    const revoked = await cli(['agent', 'revoke', 'keyed', '-o', 'json'], { BROKER_IDENTITY_TOKEN: admin });
    assert.equal(revoked.code, 0, revoked.stderr);
    assert.deepEqual(JSON.parse(revoked.stdout).tasksEnded.map((t: { name: string }) => t.name), ['keyed-run']);
    const after = await cli(['whoami']);
    assert.equal(after.code, 4, after.stderr);
    await reasonRecorded(/agent "keyed" has no enrolled key \(never enrolled, or revoked\)/);
    for (const build of pluginBuilds()) {
      const res = await kubectlWith(writePluginKubeconfig(env.dir, env.cluster, broker.url, 'keyed-run', build), keyring.env, 'get', 'pods', '-n', 'team-a');
      assert.notEqual(res.code, 0, build);
      assert.match(res.stderr, /the broker did not accept the identity from keychain \(agent key\)/, build);
    }
    assert.deepEqual((await env.taskObjects()).roleBindings, []);
    // The other replica refuses it as soon as its watch sees the deletion.
    const revokedAt = Date.now();
    let status = 200;
    while (status === 200 && Date.now() - revokedAt < 5_000) status = (await onReplica()).status;
    assert.equal(status, 401, 'the replica still took the revoked key after 5 s');
    console.log(`the second replica refused the revoked key after ${Date.now() - revokedAt} ms`);
    assert.ok(broker.auditRecords().some((r) => r.type === 'agent.revoked' && r.agent === 'keyed'));
  });

  test('no key, code or proof in any file under HOME or TMPDIR', () => {
    const needles = secrets.map((s) => s.split('.').at(-1)!).filter((s) => s.length >= 20);
    assert.ok(needles.length >= 5, `${needles.length} secrets to look for`);
    const found: string[] = [];
    // The CLI ran with HOME the keyring's home; TMPDIR is the one everything here shares.
    const started = Date.now();
    for (const root of new Set([keyring.home, tmpdir()])) scanFiles(root, needles, found, 0);
    console.log(`scanned HOME and TMPDIR for ${needles.length} secrets in ${Date.now() - started} ms`);
    assert.deepEqual(found, []);
  });

  /** The agent key `broker agent enroll` kept, read from the keychain as the CLI reads it. */
  function readKeychainKey(): string {
    process.env['DBUS_SESSION_BUS_ADDRESS'] = keyring.address;
    const key = keychainGet(agentKeyAccount(broker.url));
    assert.ok(key, 'no agent key in the keychain');
    return key;
  }

  /** Waits for an auth.failed summary that carries a reason matching `re`. */
  async function reasonRecorded(re: RegExp, what = re.source): Promise<void> {
    let failures: Array<Record<string, any>> = [];
    for (let i = 0; i < 30; i++) {
      failures = broker.auditRecords().filter((r) => r.type === 'auth.failed');
      if (failures.some((r) => (r.details?.reasons ?? []).some((x: string) => re.test(x)))) return;
      await sleep(200);
    }
    assert.fail(`${what}: no auth.failed record with reason ${re}: ${JSON.stringify(failures.slice(-3))}`);
  }
});
