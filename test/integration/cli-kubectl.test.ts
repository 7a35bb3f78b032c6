/**
 * What agents, people and CI touch, end to end: the `broker` CLI and the `broker credential` exec
 * plugin, with the real kubectl against a real API server through a real broker process.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as k8s from '@kubernetes/client-node';
import { kubectlPath } from '../../src/cluster/local-cluster.ts';
import { EXIT } from '../../src/cli/exit-codes.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { run, type RunResult } from '../helpers/kube.ts';

const BROKER = new URL('../../bin/broker', import.meta.url).pathname;

/** Every file below `dir` (recursively). */
function filesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...filesUnder(path));
    else out.push(path);
  }
  return out;
}

describe('CLI and exec plugin with real kubectl', () => {
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let agent: { home: string; tmp: string; xdg: string; identityFile: string; env: NodeJS.ProcessEnv };

  before(async () => {
    env = await BrokerEnv.start();
    broker = await env.startBroker();
    const root = mkdtempSync(join(env.dir, 'agent-'));
    const dirs = { home: join(root, 'home'), tmp: join(root, 'tmp'), xdg: join(root, 'xdg'), secrets: join(root, 'run-secrets') };
    for (const d of Object.values(dirs)) mkdirSync(d);
    const identityFile = join(dirs.secrets, 'token');
    writeFileSync(identityFile, await env.agentToken('alpha'), { mode: 0o600 });
    agent = {
      home: dirs.home,
      tmp: dirs.tmp,
      xdg: dirs.xdg,
      identityFile,
      env: {
        PATH: `${new URL('../../.node/node_modules/node/bin', import.meta.url).pathname}:${process.env['PATH']}`,
        HOME: dirs.home,
        TMPDIR: dirs.tmp,
        XDG_CONFIG_HOME: join(dirs.xdg, 'config'),
        XDG_CACHE_HOME: join(dirs.xdg, 'cache'),
        XDG_DATA_HOME: join(dirs.xdg, 'data'),
        XDG_STATE_HOME: join(dirs.xdg, 'state'),
        XDG_RUNTIME_DIR: join(dirs.xdg, 'runtime'),
        BROKER_URL: broker.url,
        BROKER_IDENTITY_TOKEN_FILE: identityFile,
        NO_COLOR: '1',
      },
    };
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
  });

  const cli = (args: string[], extraEnv: NodeJS.ProcessEnv = {}) => run(BROKER, args, { ...agent.env, ...extraEnv });
  const kubectl = (kubeconfig: string, ...args: string[]) => run(kubectlPath(), ['--kubeconfig', kubeconfig, ...args], agent.env);
  const kubeconfigFile = async (name: string, extra: string[] = []) => {
    const path = join(env.dir, `${name}.kubeconfig`);
    const res = await cli(['kubeconfig', '--task', name, '--output', path, ...extra]);
    assert.equal(res.code, 0, res.stderr);
    assert.equal(statSync(path).mode & 0o777, 0o600);
    return path;
  };

  test('no resting access before a task: kubectl fails with the plugin\'s message saying what to do', async () => {
    const kc = await kubeconfigFile('read-pods');
    assert.doesNotMatch(readFileSync(kc, 'utf8'), /token:/, 'the kubeconfig holds no secret');
    const res = await kubectl(kc, 'get', 'pods', '-n', 'team-a');
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /no active task "read-pods"/);
    // The command that starts it: the broker's own (with the template and namespace it knows from the
    // task's history) or, from a broker that names none, the plugin's.
    assert.match(res.stderr, /broker task start \S+ --namespace \S+/);
  });

  test('a refused kubectl prints the plugin\'s whole message once; each run kubectl adds while it retries discovery is one line', async () => {
    // Without a discovery cache (a HOME kubectl has not used with this API server), one `kubectl get`
    // runs the plugin once per discovery step, because client-go caches no failed run (exec.go) and
    // kubectl's in-memory discovery cache keeps no failure (memcache.go): 5 runs, each followed by
    // kubectl's own memcache.go line. With the cache an earlier successful call left, one run.
    const memcache = /^E\d{4} [\d:.]+ +\d+ memcache\.go:\d+\] "Unhandled Error" err="couldn't get current server API group list: .*getting credentials: exec: executable \S+ failed with exit code 1"$/;
    const final = /^Unable to connect to the server: getting credentials: exec: executable \S+ failed with exit code 1$/;
    const split = (stderr: string) => {
      const lines = stderr.trimEnd().split('\n');
      return { memcache: lines.filter((l) => memcache.test(l)).length, final: lines.filter((l) => final.test(l)).length, plugin: lines.filter((l) => !memcache.test(l) && !final.test(l)) };
    };
    for (const build of ['native', 'node']) {
      const home = mkdtempSync(join(env.dir, `home-${build}-`));
      const asAgent = { ...agent.env, HOME: home };
      const kc = await kubeconfigFile('idle', ['--plugin', build]);
      const get = () => run(kubectlPath(), ['--kubeconfig', kc, 'get', 'pods', '-n', 'team-a'], asAgent);

      const cold = await get();
      assert.equal(cold.code, 1, cold.stderr);
      assert.equal(cold.stdout, '');
      // The first run's whole message (up to kubectl's first line), then the first line of it once per repeat.
      const whole = cold.stderr.slice(0, cold.stderr.search(/^E\d{4} /m)).trimEnd().split('\n');
      assert.match(whole[0]!, /^broker credential: .*no active task "idle"/, `${build}: ${cold.stderr}`);
      const got = split(cold.stderr);
      assert.deepEqual(got.plugin, [...whole, whole[0], whole[0], whole[0], whole[0]], `${build}: ${cold.stderr}`);
      assert.equal(got.memcache, 5, `${build}: ${cold.stderr}`);
      assert.equal(got.final, 1, `${build}: ${cold.stderr}`);

      // A successful call in a task leaves kubectl's discovery cache (6 h): refused again, one run, no memcache.go line.
      assert.equal((await cli(['task', 'start', 'read-pods', '-n', 'team-a', '--name', 'idle'], asAgent)).code, 0);
      const ok = await get();
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal((await cli(['task', 'end', 'idle'], asAgent)).code, 0);
      const warm = await get();
      assert.equal(warm.code, 1, warm.stderr);
      const again = split(warm.stderr);
      assert.match(again.plugin[0]!, /^broker credential: .*"idle"/, `${build}: ${warm.stderr}`);
      assert.equal(again.plugin.filter((l) => l.startsWith('broker credential: ')).length, 1, `${build}: ${warm.stderr}`);
      assert.equal(again.memcache, 0, `${build}: ${warm.stderr}`);
      assert.equal(again.final, 1, `${build}: ${warm.stderr}`);
    }
  });

  test('allowed path: task start, kubectl through the exec entry, audit has task.started and credential.minted with the JTI', async () => {
    const start = await cli(['task', 'start', 'read-pods', '--namespace', 'team-a', '--reason', 'e2e', '-o', 'json']);
    assert.equal(start.code, 0, start.stderr);
    const task = JSON.parse(start.stdout) as { id: string; name: string; agent: string };
    assert.equal(task.agent, 'alpha');
    const kc = await kubeconfigFile('read-pods');
    const res = await kubectl(kc, 'get', 'pods', '-n', 'team-a');
    assert.equal(res.code, 0, res.stderr);
    assert.match(res.stderr, /No resources found in team-a namespace/);

    const records = broker.auditRecords().filter((r) => r.task === task.id);
    const started = records.find((r) => r.type === 'task.started');
    const minted = records.find((r) => r.type === 'credential.minted');
    assert.equal(started?.agent, 'alpha');
    assert.equal(started?.reason, undefined);
    assert.equal(minted?.agent, 'alpha');
    assert.match(minted?.jti ?? '', /^[0-9a-f-]{36}$/);
    // The API server's own audit ties the request to that exact credential.
    const serverSide = readFileSync(env.cluster.auditLog, 'utf8')
      .split('\n')
      .filter((l) => l.includes(`task-${task.id}`) && l.includes('"resource":"pods"'))
      .map((l) => JSON.parse(l) as { user: { extra?: Record<string, string[]> } });
    assert.ok(serverSide.some((e) => e.user.extra?.['authentication.kubernetes.io/credential-id']?.[0] === `JTI=${minted!.jti}`));
  });

  test('denied path: a verb or namespace outside the task is Forbidden by the API server, kubectl shows its message', async () => {
    const kc = await kubeconfigFile('read-pods');
    for (const args of [
      ['get', 'pods', '-n', 'team-b'],
      ['delete', 'pod', 'web-0', '-n', 'team-a'],
    ]) {
      const res = await kubectl(kc, ...args);
      assert.equal(res.code, 1, args.join(' '));
      assert.match(res.stderr, /Error from server \(Forbidden\): .*is forbidden: User "system:serviceaccount:task-broker:task-[a-z0-9]+" cannot/);
    }
  });

  test('v1beta1 kubeconfigs work with kubectl, and @kubernetes/client-node loads the same kubeconfig', async () => {
    const beta = await kubeconfigFile('read-pods', ['--exec-api-version', 'v1beta1']);
    assert.match(readFileSync(beta, 'utf8'), /client\.authentication\.k8s\.io\/v1beta1/);
    const res = await kubectl(beta, 'get', 'pods', '-n', 'team-a', '-o', 'json');
    assert.equal(res.code, 0, res.stderr);
    // client-node runs the exec entry itself (with the agent's environment).
    const saved = { ...process.env };
    Object.assign(process.env, agent.env);
    try {
      const kc = new k8s.KubeConfig();
      kc.loadFromFile(await kubeconfigFile('read-pods'));
      const pods = await kc.makeApiClient(k8s.CoreV1Api).listNamespacedPod({ namespace: 'team-a' });
      assert.deepEqual(pods.items, []);
      await assert.rejects(kc.makeApiClient(k8s.CoreV1Api).listNamespacedPod({ namespace: 'team-b' }), (e: k8s.ApiException<string>) => e.code === 403);
    } finally {
      for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
      Object.assign(process.env, saved);
    }
  });

  test('kubeconfigs run the native plugin by default; the Node build works through kubectl too (v1 and v1beta1)', async () => {
    assert.match(readFileSync(await kubeconfigFile('read-pods'), 'utf8'), /command: \S+\/\.cache\/bin\/broker-credential\n/);
    for (const version of ['v1', 'v1beta1']) {
      const kc = await kubeconfigFile('read-pods', ['--plugin', 'node', '--exec-api-version', version]);
      const text = readFileSync(kc, 'utf8');
      assert.match(text, /dist\/credential\/main\.cjs/);
      const res = await kubectl(kc, 'get', 'pods', '-n', 'team-a');
      assert.equal(res.code, 0, `${version}: ${res.stderr}`);
      const denied = await kubectl(kc, 'get', 'pods', '-n', 'team-b');
      assert.match(denied.stderr, /forbidden/);
    }
  });

  test('the plugin refuses an apiVersion it does not speak, and answers in the one asked for', async () => {
    const base = ['credential', '--task', 'read-pods'];
    const v1beta1 = await cli(base, { KUBERNETES_EXEC_INFO: JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1beta1', spec: { interactive: false } }) });
    assert.equal(v1beta1.code, 0, v1beta1.stderr);
    const cred = JSON.parse(v1beta1.stdout) as { apiVersion: string; kind: string; status: { token: string; expirationTimestamp: string } };
    assert.equal(cred.apiVersion, 'client.authentication.k8s.io/v1beta1');
    assert.equal(cred.kind, 'ExecCredential');
    assert.ok(new Date(cred.status.expirationTimestamp).getTime() > Date.now());
    const alpha1 = await cli(base, { KUBERNETES_EXEC_INFO: JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1alpha1' }) });
    assert.equal(alpha1.code, EXIT.error);
    assert.equal(alpha1.stdout, '');
    assert.match(alpha1.stderr, /asks for apiVersion "client\.authentication\.k8s\.io\/v1alpha1"; this plugin answers only/);
  });

  test('the plugin says which identity source failed, and that the broker is unreachable (with its URL)', async () => {
    const missing = await cli(['credential', '--task', 'read-pods'], { BROKER_IDENTITY_TOKEN_FILE: join(env.dir, 'nope') });
    assert.equal(missing.code, EXIT.unauthenticated);
    assert.match(missing.stderr, /cannot read the identity token BROKER_IDENTITY_TOKEN_FILE=.*nope: ENOENT/);
    const bogus = await cli(['credential', '--task', 'read-pods'], { BROKER_IDENTITY_TOKEN_FILE: '', BROKER_IDENTITY_TOKEN: 'not-a-token' });
    assert.equal(bogus.code, EXIT.unauthenticated);
    assert.match(bogus.stderr, /did not accept the identity from BROKER_IDENTITY_TOKEN \(/);
    const down = await cli(['credential', '--task', 'read-pods', '--broker', 'http://127.0.0.1:9']);
    assert.equal(down.code, EXIT.unavailable);
    assert.match(down.stderr, /the broker is unreachable at http:\/\/127\.0\.0\.1:9: ECONNREFUSED/);
  });

  test('after task end kubectl is refused again; no file under HOME, TMPDIR or XDG holds the token; the plugin writes no file', async () => {
    const token = JSON.parse((await cli(['credential', '--task', 'read-pods'])).stdout).status.token as string;
    assert.ok(token.length > 100);
    // The plugin alone, in an empty working directory: it creates nothing anywhere we can see.
    const cwd = mkdtempSync(join(env.dir, 'cwd-'));
    const plugin = await new Promise<RunResult>((done) => {
      const child = spawn(BROKER, ['credential', '--task', 'read-pods'], { cwd, env: agent.env });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d));
      child.stderr.on('data', (d: Buffer) => (stderr += d));
      child.on('close', (code) => done({ code, stdout, stderr }));
    });
    assert.equal(plugin.code, 0, plugin.stderr);
    assert.deepEqual(readdirSync(cwd), []);
    assert.deepEqual(filesUnder(agent.tmp), []);
    assert.deepEqual(filesUnder(agent.xdg), []);

    const end = await cli(['task', 'end', 'read-pods', '-o', 'json']);
    assert.equal(end.code, 0, end.stderr);
    assert.equal(JSON.parse(end.stdout).ended, true);
    const kc = await kubeconfigFile('read-pods');
    const res = await kubectl(kc, 'get', 'pods', '-n', 'team-a');
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /no active task "read-pods"/);

    for (const file of [...filesUnder(agent.home), ...filesUnder(agent.tmp), ...filesUnder(agent.xdg)]) {
      assert.ok(!readFileSync(file).includes(token), `${file} holds the token`);
    }
  });

  test('broker run: the command gets a working grant; the task ends and the file goes, on success and on failure', async () => {
    const ok = await cli(['run', 'read-pods', '--namespace', 'team-a', '--', kubectlPath(), 'get', 'pods']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stderr, /No resources found in team-a namespace/);
    const failing = await cli(['run', 'read-pods', '--namespace', 'team-a', '--', 'sh', '-c', 'test -s "$KUBECONFIG" && exit 7']);
    assert.equal(failing.code, 7, failing.stderr);
    const denied = await cli(['run', 'read-pods', '--namespace', 'team-a', '--', kubectlPath(), 'get', 'secrets']);
    assert.equal(denied.code, 1);
    assert.match(denied.stderr, /forbidden/);
    assert.deepEqual(filesUnder(agent.tmp), [], 'no temporary kubeconfig left behind');
    assert.equal(JSON.parse((await cli(['task', 'list', '-o', 'json'])).stdout).tasks.length, 0, 'no task left behind');
  });

  test('broker run: interrupted (SIGINT, SIGTERM), it forwards the signal, ends the task and removes the file', async () => {
    for (const [signal, code] of [
      ['SIGINT', 130],
      ['SIGTERM', 143],
    ] as const) {
      const child = spawn(BROKER, ['run', 'read-pods', '--namespace', 'team-a', '--', 'sleep', '30'], { env: agent.env });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d));
      for (let i = 0; i < 100 && !/started/.test(stderr); i++) await sleep(100);
      await sleep(300);
      const running = JSON.parse((await cli(['task', 'list', '-o', 'json'])).stdout).tasks;
      assert.equal(running.length, 1, 'the task exists while the command runs');
      assert.equal(filesUnder(agent.tmp).length, 1, 'and so does its kubeconfig');
      child.kill(signal);
      const exit = await new Promise<number | null>((done) => child.on('close', (c) => done(c)));
      assert.equal(exit, code, `${signal}: ${stderr}`);
      assert.match(stderr, /task [a-z0-9]+ ended/);
      assert.equal(JSON.parse((await cli(['task', 'list', '-o', 'json'])).stdout).tasks.length, 0);
      assert.deepEqual(filesUnder(agent.tmp), []);
    }
  });

  test('over TLS: the broker serves HTTPS with its certificate, the plugin and CLI trust it through --broker-ca', async () => {
    const cert = join(env.dir, 'broker.crt');
    const key = join(env.dir, 'broker.key');
    const made = await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
      '-subj', '/CN=task-broker', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert]);
    assert.equal(made.code, 0, made.stderr);
    const secure = await env.startBroker({ auditLog: join(env.dir, 'tls-audit.jsonl'), tls: { cert, key } });
    try {
      assert.match(secure.url, /^https:\/\/127\.0\.0\.1:\d+$/);
      const tlsEnv = { BROKER_URL: secure.url, BROKER_CA: cert };
      assert.equal((await cli(['task', 'start', 'read-pods', '-n', 'team-a', '--name', 'tls'], tlsEnv)).code, 0);
      const cred = await cli(['credential', '--task', 'tls'], tlsEnv);
      assert.equal(cred.code, 0, cred.stderr);
      assert.equal(JSON.parse(cred.stdout).kind, 'ExecCredential');
      // The Node build over TLS too.
      const entry = new URL('../../dist/credential/main.cjs', import.meta.url).pathname;
      const viaNode = await run(process.execPath, [entry, '--task', 'tls'], { ...agent.env, ...tlsEnv });
      assert.equal(viaNode.code, 0, viaNode.stderr);
      assert.equal(JSON.parse(viaNode.stdout).status.token, JSON.parse(cred.stdout).status.token);
      // Without the CA the broker's certificate is not trusted, and nothing is sent.
      for (const [cmd, args] of [
        [BROKER, ['credential', '--task', 'tls']],
        [process.execPath, [entry, '--task', 'tls']],
      ] as const) {
        const untrusted = await run(cmd, [...args], { ...agent.env, BROKER_URL: secure.url, BROKER_CA: '' });
        assert.equal(untrusted.code, EXIT.unavailable, untrusted.stderr);
        assert.match(untrusted.stderr, /SELF_SIGNED|self-signed|UNABLE_TO_VERIFY/i);
      }
      assert.equal((await cli(['task', 'end', 'tls'], tlsEnv)).code, 0);
    } finally {
      await secure.stop();
    }
  });

  test('broker serve refuses plain HTTP on a non-loopback address', async () => {
    const res = await cli(['serve', '--config', env.policyFile, '--audit-log', join(env.dir, 'never.jsonl'), '--kubeconfig', env.brokerKubeconfig,
      '--listen', '0.0.0.0:0', '--insecure-http']);
    assert.equal(res.code, EXIT.usage);
    assert.match(res.stderr, /plain HTTP is only allowed on a loopback address, not 0\.0\.0\.0 \(--insecure-http\)/);
  });

  test('CLI contract: -o json parses, exit codes match docs/cli.md', async () => {
    const started = await cli(['task', 'start', 'read-pods', '-n', 'team-b', '--name', 'contract', '-o', 'json']);
    assert.equal(started.code, EXIT.ok);
    const id = JSON.parse(started.stdout).id as string;
    assert.equal(JSON.parse((await cli(['task', 'show', 'contract', '-o', 'json'])).stdout).id, id);
    assert.deepEqual(
      JSON.parse((await cli(['task', 'list', '-o', 'json'])).stdout).tasks.map((t: { id: string }) => t.id),
      [id],
    );
    const text = await cli(['task', 'list']);
    assert.match(text.stdout, /^NAME\s+ID\s+TEMPLATE\s+NAMESPACE\s+EXPIRES\ncontract\s+/);
    const dup = await cli(['task', 'start', 'read-pods', '-n', 'team-b', '--name', 'contract']);
    assert.equal(dup.code, EXIT.error);
    assert.match(dup.stderr, /already has an active task "contract": end it with: broker task end contract \(or choose another --name\) \(name\) \[task_exists\]/);
    const badNs = await cli(['task', 'start', 'read-pods', '-n', 'kube-system']);
    assert.equal(badNs.code, EXIT.error);
    assert.match(badNs.stderr, /\(namespace\) \[namespace_not_allowed\]/);
    const badTtl = await cli(['task', 'start', 'read-pods', '-n', 'team-b', '--ttl', 'forever']);
    assert.equal(badTtl.code, EXIT.usage);
    assert.match(badTtl.stderr, /\(ttl\) \[invalid_argument\]/);
    assert.equal((await cli(['task', 'end', 'contract'])).code, EXIT.ok);
    assert.equal((await cli(['task', 'end', 'contract'])).code, EXIT.error);
    assert.equal((await cli(['task', 'list'], { BROKER_IDENTITY_TOKEN_FILE: '', BROKER_IDENTITY_TOKEN: 'nope' })).code, EXIT.unauthenticated);
    assert.equal((await cli(['task', 'list', '--broker', 'http://127.0.0.1:9'])).code, EXIT.unavailable);
    const unknown = await cli(['task', 'start', 'read-pods', '-n', 'team-a', '--frobnicate']);
    assert.equal(unknown.code, EXIT.usage);
    assert.match(unknown.stderr, /unknown option '--frobnicate'/);
  });
});
