/**
 * `broker serve` as an operator meets it (issue 10, items 2-4), against a real API server: a start
 * that fails does so at once, clearly, recording nothing and leaving no file; a broad credential is
 * refused unless allowed; the start-up summary and the request log; the policy reloaded without a
 * restart (file change and SIGHUP; a bad one refused); one writer per audit log.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { verifyAuditFile } from '../../src/audit/verify.ts';
import { BrokerEnv, BrokerProcess, POLICY_FILE } from '../helpers/broker.ts';
import { run } from '../helpers/kube.ts';
import { until } from '../helpers/wait.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;
const BASE_POLICY = readFileSync(POLICY_FILE, 'utf8');

interface Exited {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs the broker CLI to its end (or kills it after `timeoutMs`), timing it. */
async function runCli(args: string[], timeoutMs = 20_000): Promise<Exited> {
  const t0 = Date.now();
  const res = await run(process.execPath, [MAIN, ...args], process.env, timeoutMs);
  return { ...res, ms: Date.now() - t0 };
}

function records(path: string): Array<Record<string, any>> {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, any>);
}


/** The pid of a process that has exited: nobody runs under it now. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', '0'], { stdio: 'ignore' });
  await new Promise((done) => child.once('exit', done));
  return child.pid!;
}

describe('broker serve: start-up, reload, one writer per log', () => {
  let env: BrokerEnv;
  let alpha: string;
  let n = 0;
  const logPath = (name: string) => join(env.dir, `${name}-${++n}.jsonl`);

  /** serve's arguments with this environment's policy and the broker's own kubeconfig; `over` replaces flags. */
  const serveArgs = (auditLog: string, over: Record<string, string | null> = {}, extra: string[] = []) => {
    const flags: Record<string, string | null> = {
      '--config': env.policyFile,
      '--audit-log': auditLog,
      '--kubeconfig': env.brokerKubeconfig,
      '--listen': '127.0.0.1:0',
      '--insecure-http': null,
      ...over,
    };
    return ['serve', ...Object.entries(flags).flatMap(([k, v]) => (v === null ? [k] : [k, v])), ...extra];
  };

  before(async () => {
    env = await BrokerEnv.start();
    alpha = await env.agentToken('alpha');
  });
  after(async () => {
    await env?.stop();
  });

  describe('a start that fails, fails cleanly', () => {
    let busy: Server;
    let port: number;
    before(async () => {
      busy = createServer();
      await new Promise<void>((done) => busy.listen(0, '127.0.0.1', done));
      port = (busy.address() as { port: number }).port;
    });
    after(() => busy.close());

    test('a port in use: non-zero at once, the flag and the next step named, nothing recorded, no file left', async () => {
      const auditLog = logPath('busy');
      const res = await runCli(serveArgs(auditLog, { '--listen': `127.0.0.1:${port}` }));
      assert.equal(res.code, 1, 'a plain failure, not the usage code');
      assert.ok(res.ms < 2_000, `exited after ${res.ms} ms`);
      assert.match(res.stderr, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}: the address is already in use .*: stop it, or choose another port \\(--listen\\) \\[listen_failed\\]`));
      assert.doesNotMatch(res.stderr, /unexpected failure|EADDRINUSE \[internal\]/);
      assert.equal(existsSync(auditLog), false, 'no audit log left behind');
      assert.equal(existsSync(`${auditLog}.lock`), false, 'no lock file left behind');
    });

    test('a port in use with an existing log: the log is not touched', async () => {
      const auditLog = logPath('busy-existing');
      const first = await env.startBroker({ auditLog });
      await first.stop();
      const before = readFileSync(auditLog, 'utf8');
      const res = await runCli(serveArgs(auditLog, { '--listen': `127.0.0.1:${port}` }));
      assert.notEqual(res.code, 0);
      assert.equal(readFileSync(auditLog, 'utf8'), before, 'no broker.started, nothing at all');
    });

    test('an unreadable policy: exit 2 naming --config and what to do, no file left', async () => {
      const auditLog = logPath('no-policy');
      const res = await runCli(serveArgs(auditLog, { '--config': join(env.dir, 'no-such-policy.yaml') }));
      assert.equal(res.code, 2, res.stderr);
      assert.match(res.stderr, /cannot read policy file .*no-such-policy\.yaml: no such file: check the path given to --config \(`broker policy check FILE` validates/);
      assert.match(res.stderr, /\(--config\) \[invalid_argument\]/);
      assert.equal(existsSync(auditLog), false);
    });

    test('a missing kubeconfig: exit 2 naming --kubeconfig and how to make one, no file left', async () => {
      const auditLog = logPath('no-kubeconfig');
      const res = await runCli(serveArgs(auditLog, { '--kubeconfig': join(env.dir, 'no-such.kubeconfig') }));
      assert.equal(res.code, 2, res.stderr);
      assert.match(res.stderr, /could not load the kubeconfig .*no-such\.kubeconfig/);
      assert.match(res.stderr, /kubectl create token task-broker -n task-broker-system/);
      assert.match(res.stderr, /\(--kubeconfig\) \[invalid_argument\]/);
      assert.equal(existsSync(auditLog), false);
    });

    test("the cluster-admin kubeconfig is refused (recorded), naming the broker's ServiceAccount and the flag; with --allow-broad-credentials it starts, with a recorded warning", async () => {
      const auditLog = logPath('admin');
      const res = await runCli(serveArgs(auditLog, { '--kubeconfig': env.cluster.kubeconfig }));
      assert.equal(res.code, 1, res.stderr);
      assert.ok(res.ms < 10_000, `exited after ${res.ms} ms`);
      assert.match(res.stderr, /can do far more than `broker policy apply` grants the broker: every verb on every resource \(cluster-admin\)/);
      assert.match(res.stderr, /Run it with the ServiceAccount policy apply made, task-broker-system\/task-broker/);
      assert.match(res.stderr, /kubectl create token task-broker -n task-broker-system/);
      assert.match(res.stderr, /pass --allow-broad-credentials to start anyway/);
      assert.match(res.stderr, /\(--kubeconfig\) \[forbidden\]/);
      const refused = records(auditLog);
      assert.deepEqual(
        refused.map((r) => r.type),
        ['broker.start_refused'],
      );
      assert.ok(refused[0]!.details.broad.includes('every verb on every resource (cluster-admin)'));
      assert.equal(refused[0]!.outcome, 'denied');

      const broker = await env.startBroker({ auditLog, extraArgs: ['--kubeconfig', env.cluster.kubeconfig, '--allow-broad-credentials', '--log-format', 'text'] });
      try {
        const started = broker.auditRecords().find((r) => r.type === 'broker.started')!;
        assert.equal(started.details.credential.allowedBy, '--allow-broad-credentials');
        assert.ok(started.details.credential.broad.includes('escalate on ClusterRoles (grant itself any permission)'));
        assert.match(started.reason, /^started with --allow-broad-credentials/);
        assert.match(broker.stderr, /WARN +credential: .* can every verb on every resource \(cluster-admin\).*started anyway \(--allow-broad-credentials\)/);
      } finally {
        await broker.stop();
      }
      assert.equal((await verifyAuditFile(auditLog)).ok, true);
    });
  });

  describe('what a running broker prints', () => {
    test('the start-up summary (text), and a request log line per request with no token in it', async () => {
      const broker = await env.startBroker({ auditLog: logPath('summary'), extraArgs: ['--log-format', 'text'] });
      try {
        const res = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'logged' });
        assert.equal(res.status, 201);
        assert.equal((await broker.request('POST', '/v1/tasks/logged/credential', alpha)).status, 200);
        assert.equal((await broker.request('DELETE', '/v1/tasks/logged', alpha)).status, 200);
        await until('the request lines', 5_000, () => /DELETE \/v1\/tasks\/:ref 200/.test(broker.stderr));
        const err = broker.stderr;
        const sha = /sha256 ([0-9a-f]{64})/.exec(err)?.[1];
        assert.ok(sha, err);
        for (const line of [
          new RegExp(`INFO +listening on ${broker.url.replaceAll('.', '\\.')} \\(plain HTTP, loopback only\\)`),
          /INFO +policy .*policy\.yaml: sha256 [0-9a-f]{64}, 2 templates \(read-pods, configmap-writer\); reloaded when the file changes and on SIGHUP/,
          /INFO +audit log .*summary-\d+\.jsonl: 1 record \(a new file\), locked by this process \(pid \d+, .*\.lock\)/,
          /INFO +identity: Kubernetes ServiceAccount tokens with audience "task-broker", checked with TokenReview/,
          /INFO +credential: system:serviceaccount:task-broker-system:task-broker, no more than `broker policy apply` grants/,
          /INFO +namespaces: tasks in task-broker, the broker's own state in task-broker-system/,
          /INFO +audit webhook: off/,
          /INFO +limits: 1000\/1s per source, 10\/10s failed authentications per source, 100\/1s per identity, 16 TokenReviews in flight/,
        ]) {
          assert.match(err, line);
        }
        const id = res.body.id as string;
        assert.match(err, new RegExp(`INFO +POST /v1/tasks 201 [\\d.]+ms agent:alpha task ${id} req [0-9a-f]{8}`));
        assert.match(err, new RegExp(`INFO +POST /v1/tasks/:ref/credential 200 [\\d.]+ms agent:alpha task ${id}`));
        assert.match(err, new RegExp(`INFO +DELETE /v1/tasks/:ref 200 [\\d.]+ms agent:alpha task ${id}`));
        assert.ok(!err.includes(alpha), 'the caller token is not in the log');
        assert.ok(!err.includes(alpha.split('.')[1]!), 'nor any part of it');
        assert.doesNotMatch(err, /authorization|bearer/i);
      } finally {
        await broker.stop();
      }
    });

    test('JSON (the default off a terminal): one "broker started" record, then one record per request without token or headers', async () => {
      const broker = await env.startBroker({ auditLog: logPath('json') });
      try {
        assert.equal((await broker.request('GET', '/v1/tasks?all=false', alpha)).status, 200);
        assert.equal((await broker.request('GET', '/v1/tasks', 'not-a-valid-token')).status, 401);
        await until('two request lines', 5_000, () => broker.stderr.match(/"msg":"request"/g)?.length === 2);
        const lines = broker.stderr
          .split('\n')
          .filter((l) => l.startsWith('{'))
          .map((l) => JSON.parse(l) as Record<string, any>);
        const started = lines.find((l) => l.msg === 'broker started')!;
        assert.equal(started.listen, broker.url);
        assert.match(started.policy.sha256, /^[0-9a-f]{64}$/);
        assert.deepEqual(started.credential.broad, []);
        const reqs = lines.filter((l) => l.msg === 'request');
        assert.deepEqual(
          reqs.map((r) => [r.method, r.route, r.status, r.agent ?? null]),
          [
            ['GET', '/v1/tasks', 200, 'alpha'],
            ['GET', '/v1/tasks', 401, null],
          ],
        );
        for (const r of reqs) {
          assert.equal(typeof r.ms, 'number');
          assert.equal(typeof r.reqId, 'string');
          assert.deepEqual(Object.keys(r).filter((k) => /header|url|body|token|auth/i.test(k)), []);
        }
        assert.ok(!broker.stderr.includes(alpha) && !broker.stderr.includes('not-a-valid-token') && !broker.stderr.includes('all=false'));
      } finally {
        await broker.stop();
      }
    });
  });

  describe('policy reload without a restart', () => {
    const withMaxTtl = (max: string) => BASE_POLICY.replace('ttl: { default: 15m, max: 1h }', `ttl: { default: 15m, max: ${max} }`);
    const start = (b: BrokerProcess, name: string, ttl: string) => b.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name, ttl });

    test('a changed policy file is picked up (editor-style rename): a new TTL max allowed; a bad one is refused, the old one still serves; both recorded', async () => {
      const dir = join(env.dir, 'reload-file');
      mkdirSync(dir);
      const policyFile = join(dir, 'policy.yaml');
      writeFileSync(policyFile, BASE_POLICY);
      const auditLog = logPath('reload-file');
      const broker = await env.startBroker({ auditLog, extraArgs: ['--config', policyFile] });
      try {
        const refused = await start(broker, 'long', '2h');
        assert.equal(refused.status, 400);
        assert.equal(refused.body.error.code, 'ttl_out_of_range');

        // As an editor saves: a new file renamed over the old one.
        writeFileSync(join(dir, '.policy.yaml.swp'), withMaxTtl('3h'));
        renameSync(join(dir, '.policy.yaml.swp'), policyFile);
        const reloaded = await until('policy.reloaded', 10_000, () => records(auditLog).find((r) => r.type === 'policy.reloaded'));
        assert.equal(reloaded.outcome, 'ok');
        assert.equal(reloaded.details.trigger, 'file changed');
        assert.deepEqual(reloaded.details.templatesChanged, ['read-pods']);
        assert.deepEqual(reloaded.details.templatesAdded, []);
        assert.match(reloaded.details.policySha256, /^[0-9a-f]{64}$/);
        assert.notEqual(reloaded.details.policySha256, reloaded.details.previousSha256);
        const long = await start(broker, 'long', '2h');
        assert.equal(long.status, 201, JSON.stringify(long.body));

        // A bad policy: refused, recorded with its problems, and the running one (3h) still serves.
        writeFileSync(policyFile, withMaxTtl('forever'));
        const bad = await until('policy.reload_refused', 10_000, () => records(auditLog).find((r) => r.type === 'policy.reload_refused'));
        assert.equal(bad.outcome, 'denied');
        assert.equal(bad.details.runningSha256, reloaded.details.policySha256);
        assert.ok(bad.details.problems.some((p: string) => /policy\.yaml:\d+: .*ttl/.test(p)), JSON.stringify(bad.details.problems));
        assert.match(broker.stderr, /policy reload refused \(file changed\); still running sha256/);
        const still = await start(broker, 'still-long', '150m');
        assert.equal(still.status, 201, JSON.stringify(still.body));

        // A change of the broker's namespaces needs a restart: refused, saying so.
        writeFileSync(policyFile, withMaxTtl('3h').replace('taskNamespace: task-broker', 'taskNamespace: other-tasks'));
        const moved = await until('a second refusal', 10_000, () => records(auditLog).filter((r) => r.type === 'policy.reload_refused')[1]);
        assert.match(moved.details.problems[0], /broker\.taskNamespace: "task-broker" -> "other-tasks" needs a restart/);

        // The task started under the old policy still has its grant.
        assert.equal((await broker.request('POST', '/v1/tasks/long/credential', alpha)).status, 200);
        for (const name of ['long', 'still-long']) assert.equal((await broker.request('DELETE', `/v1/tasks/${name}`, alpha)).status, 200);
      } finally {
        await broker.stop();
      }
      assert.equal((await verifyAuditFile(auditLog)).ok, true);
    });

    test('SIGHUP reloads a policy whose change the file watch cannot see (a symlink to another directory)', async () => {
      const real = join(env.dir, 'reload-hup-real');
      const linked = join(env.dir, 'reload-hup-link');
      mkdirSync(real);
      mkdirSync(linked);
      writeFileSync(join(real, 'policy.yaml'), BASE_POLICY);
      symlinkSync(join(real, 'policy.yaml'), join(linked, 'policy.yaml'));
      const auditLog = logPath('reload-hup');
      const broker = await env.startBroker({ auditLog, extraArgs: ['--config', join(linked, 'policy.yaml')] });
      try {
        writeFileSync(join(real, 'policy.yaml'), withMaxTtl('4h'));
        await sleep(1_500);
        assert.equal((await start(broker, 'hup', '3h')).status, 400, 'not reloaded yet');
        assert.ok(!records(auditLog).some((r) => r.type === 'policy.reloaded'));
        broker.kill('SIGHUP');
        const reloaded = await until('policy.reloaded', 10_000, () => records(auditLog).find((r) => r.type === 'policy.reloaded'));
        assert.equal(reloaded.details.trigger, 'SIGHUP');
        assert.equal((await start(broker, 'hup', '3h')).status, 201);
        assert.equal((await broker.request('DELETE', '/v1/tasks/hup', alpha)).status, 200);
        // SIGHUP with nothing changed: nothing recorded, and the broker runs on.
        const count = records(auditLog).length;
        broker.kill('SIGHUP');
        await until('the "unchanged" note', 5_000, () => /policy .* unchanged \(sha256 [0-9a-f]{12}\): nothing to reload/.test(broker.stderr));
        assert.equal(records(auditLog).length, count);
        assert.equal((await broker.request('GET', '/readyz', undefined)).status, 200);
      } finally {
        await broker.stop();
      }
    });
  });

  describe('one writer per audit log', () => {
    test('a second broker on the same log refuses naming the pid; policy apply --audit-log on it is refused with what to do instead', async () => {
      const auditLog = logPath('held');
      const first = await env.startBroker({ auditLog });
      try {
        const before = readFileSync(auditLog, 'utf8');
        const second = await runCli(serveArgs(auditLog));
        assert.equal(second.code, 5, second.stderr);
        assert.match(second.stderr, new RegExp(`the audit log .*held-\\d+\\.jsonl is held by pid ${first.pid} \\(broker serve, started .*\\): one writer per log; stop it first, or use another log \\[audit_unavailable\\]`));

        const apply = await runCli(['policy', 'apply', env.policyFile, '--kubeconfig', env.cluster.kubeconfig, '--audit-log', auditLog]);
        assert.equal(apply.code, 5, apply.stderr);
        assert.match(apply.stderr, new RegExp(`held by pid ${first.pid} \\(broker serve`));
        assert.match(apply.stderr, /records there, as policy\.reloaded, each policy change it picks up from its policy file: run policy apply without --audit-log/);
        assert.match(apply.stderr, /\(--audit-log\) \[audit_unavailable\]/);
        assert.doesNotMatch(apply.stdout, /unchanged/, 'nothing was applied');

        assert.equal(readFileSync(auditLog, 'utf8'), before, 'neither wrote to the log');
        assert.equal((await first.request('GET', '/readyz', undefined)).status, 200, 'the running broker is unharmed');

        const plain = await runCli(['policy', 'apply', env.policyFile, '--kubeconfig', env.cluster.kubeconfig]);
        assert.equal(plain.code, 0, plain.stderr);
        assert.match(plain.stdout, /running brokers reload the policy file themselves when it changes and on SIGHUP/);
      } finally {
        await first.stop();
      }
      assert.equal(existsSync(`${auditLog}.lock`), false, 'the lock is removed when the broker stops');
    });

    test('a stale lock (its pid is dead) is taken over, and the first record says so', async () => {
      const auditLog = logPath('stale');
      const pid = await deadPid();
      writeFileSync(`${auditLog}.lock`, JSON.stringify({ pid, host: (await import('node:os')).hostname(), startedAt: '2025-01-01T00:00:00.000Z', command: 'broker serve', nonce: 'x' }) + '\n');
      const broker = await env.startBroker({ auditLog });
      try {
        const first = broker.auditRecords()[0]!;
        assert.equal(first.type, 'broker.started');
        assert.equal(first.details.staleLockTakenOver.pid, pid);
        assert.match(first.details.staleLockTakenOver.reason, new RegExp(`pid ${pid} is not running`));
        assert.equal(JSON.parse(readFileSync(`${auditLog}.lock`, 'utf8')).pid, broker.pid);
      } finally {
        await broker.stop();
      }
    });
  });
});
