/**
 * The exec plugin's contract, with a stand-in broker on loopback (a fake at the HTTP boundary; the
 * real broker and kubectl are in test/integration/cli-kubectl.test.ts). Both builds, the Node one and
 * the native one (native/credential), must behave the same: every contract test runs on each.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { createServer as createTcpServer, type Socket } from 'node:net';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import type { PluginModule } from '../../src/credential/main.cts';

// The plugin is CommonJS (it starts faster): loaded as kubectl's runs load it.
const { parseResponse, run: runPlugin } = createRequire(import.meta.url)('../../src/credential/main.cts') as PluginModule;
import { run } from '../helpers/kube.ts';

const NATIVE = new URL('../../.cache/bin/broker-credential', import.meta.url).pathname;
const NODE_ENTRY = new URL('../../dist/credential/main.cjs', import.meta.url).pathname;
/** The Node build's source, run as its own process (Node strips the types). */
const PLUGIN_SOURCE = new URL('../../src/credential/main.cts', import.meta.url).pathname;
const EXEC_V1 = JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1', kind: 'ExecCredential', spec: { interactive: false } });

for (const build of ['node', 'native'] as const)
describe(`broker credential (${build})`, () => {
  let server: Server;
  let url: string;
  // Where the test broker's redirects point: a plain-HTTP server that must never hear from the plugin.
  let elsewhere: Server;
  let elsewhereUrl: string;
  const elsewhereSeen = { connections: 0, requests: 0 };
  const seen: Array<{ method: string; url: string; authorization: string | undefined }> = [];
  const replies = new Map<string, { status: number; body: string }>([
    ['/v1/tasks/ok/credential', { status: 200, body: JSON.stringify({ token: 'tok-123', expirationTimestamp: '2030-01-01T00:00:00.000Z', taskId: 'abc', jti: 'j' }) }],
    ['/v1/tasks/gone/credential', { status: 404, body: JSON.stringify({ error: { code: 'no_active_task', message: 'agent "alpha" has no active task "gone"' } }) }],
    ['/v1/tasks/denied/credential', { status: 401, body: JSON.stringify({ error: { code: 'unauthenticated', message: 'authentication failed' } }) }],
    ['/v1/tasks/gated/credential', { status: 403, body: JSON.stringify({ error: { code: 'approval_required', message: 'needs 1 approval', requestId: 'req-42' } }) }],
    ['/v1/tasks/audit/credential', { status: 503, body: JSON.stringify({ error: { code: 'audit_unavailable', message: 'the audit log cannot be written' } }) }],
    ['/v1/tasks/proxy/credential', { status: 502, body: '<html>bad gateway</html>' }],
    ['/v1/tasks/empty/credential', { status: 200, body: '{}' }],
    // A broker that knows the task's template and namespace (from its history) names the command.
    ['/v1/tasks/known/credential', { status: 404, body: JSON.stringify({ error: { code: 'no_active_task', message: 'agent "alpha" has no active task "known"; start it with: broker task start read-pods --namespace team-a --name known' } }) }],
    ['/v1/tasks/gated-told/credential', { status: 403, body: JSON.stringify({ error: { code: 'approval_required', message: 'needs 1 approval: ask an approver to run: broker approve req-43', requestId: 'req-43' } }) }],
  ]);

  before(async () => {
    elsewhere = createServer((_req, res) => {
      elsewhereSeen.requests++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(replies.get('/v1/tasks/ok/credential')!.body);
    });
    elsewhere.on('connection', () => elsewhereSeen.connections++);
    await new Promise<void>((done) => elsewhere.listen(0, '127.0.0.1', done));
    elsewhereUrl = `http://127.0.0.1:${(elsewhere.address() as { port: number }).port}`;
    server = createServer((req, res) => {
      seen.push({ method: req.method!, url: req.url!, authorization: req.headers.authorization });
      const redirect = /^\/v1\/tasks\/redirect-(\d{3})\/credential$/.exec(req.url!);
      if (redirect) {
        res.writeHead(Number(redirect[1]), { location: `${elsewhereUrl}/v1/tasks/ok/credential?access_token=location-secret` }).end();
        return;
      }
      const reply = replies.get(req.url!) ?? { status: 404, body: '{}' };
      res.writeHead(reply.status, { 'content-type': 'application/json' }).end(reply.body);
    });
    await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
    url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  });
  after(async () => {
    await new Promise<void>((done) => server.close(() => done()));
    await new Promise<void>((done) => elsewhere.close(() => done()));
  });

  async function plugin(argv: string[], env: NodeJS.ProcessEnv) {
    // Through a parent that runs it once, as kubectl does for a command that succeeds: run straight
    // from this test process, which has waited for other children, it would take itself for a repeat.
    if (build === 'native') return run('/bin/sh', ['-c', '"$@"; exit $?', 'sh', NATIVE, ...argv], env);
    let stdout = '';
    let stderr = '';
    const code = await runPlugin({ argv, env, stdout: (s) => (stdout += s), stderr: (s) => (stderr += s) });
    return { code, stdout, stderr };
  }
  const env = (extra: NodeJS.ProcessEnv = {}) => ({ BROKER_URL: url, BROKER_IDENTITY_TOKEN: 'id-token', KUBERNETES_EXEC_INFO: EXEC_V1, ...extra });

  test('prints exactly one ExecCredential on stdout, in the apiVersion asked for, and POSTs with the identity', async () => {
    const v1 = await plugin(['--task', 'ok'], env());
    assert.equal(v1.code, 0);
    assert.equal(v1.stderr, '');
    assert.deepEqual(JSON.parse(v1.stdout), {
      apiVersion: 'client.authentication.k8s.io/v1',
      kind: 'ExecCredential',
      status: { token: 'tok-123', expirationTimestamp: '2030-01-01T00:00:00.000Z' },
    });
    assert.deepEqual(seen.at(-1), { method: 'POST', url: '/v1/tasks/ok/credential', authorization: 'Bearer id-token' });
    const beta = await plugin(['--task=ok'], env({ KUBERNETES_EXEC_INFO: JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1beta1', spec: { interactive: true } }) }));
    assert.equal(JSON.parse(beta.stdout).apiVersion, 'client.authentication.k8s.io/v1beta1');
  });

  test('each refusal explains itself on stderr with its exit code, and stdout stays empty', async () => {
    const cases: Array<[string, number, RegExp]> = [
      ['gone', 1, /^broker credential: agent "alpha" has no active task "gone"\nstart one with: broker task start TEMPLATE --namespace NAMESPACE --name gone/],
      ['denied', 4, /did not accept the identity from BROKER_IDENTITY_TOKEN \(missing, expired, or not an agent in the policy\)/],
      ['gated', 3, /task "gated" needs approval \(request req-42\).*\nask an approver to run: broker approve req-42/],
      ['audit', 5, /cannot serve credentials now: the audit log cannot be written \[audit_unavailable\]/],
      ['proxy', 1, /answered 502$/m],
      ['empty', 1, /answered 200 without a credential/],
    ];
    for (const [task, code, message] of cases) {
      const res = await plugin(['--task', task], env());
      assert.equal(res.code, code, task);
      assert.equal(res.stdout, '', task);
      assert.match(res.stderr, message, task);
    }
  });

  test('a broker message that names the command is printed as it is, without the placeholder hint', async () => {
    const known = await plugin(['--task', 'known'], env());
    assert.equal(known.code, 1);
    assert.equal(known.stdout, '');
    assert.equal(known.stderr, 'broker credential: agent "alpha" has no active task "known"; start it with: broker task start read-pods --namespace team-a --name known\n');
    const told = await plugin(['--task', 'gated-told'], env());
    assert.equal(told.code, 3);
    assert.equal(told.stderr, 'broker credential: task "gated-told" needs approval (request req-43): needs 1 approval: ask an approver to run: broker approve req-43\n');
  });

  test('run again by the same parent (kubectl retrying discovery), a refusal is one line: the whole message only the first time', async () => {
    // kubectl runs the plugin once per discovery step, one after the other, and client-go caches no
    // failure: a parent running it three times in a row stands in for it.
    const cmd = build === 'native' ? [NATIVE] : [process.execPath, PLUGIN_SOURCE];
    const thrice = (argv: string[], extra: NodeJS.ProcessEnv = {}) =>
      run('/bin/sh', ['-c', '"$@"; "$@"; "$@"; exit $?', 'sh', ...cmd, ...argv], { ...env(extra), PATH: process.env['PATH'] });
    const gone = await thrice(['--task', 'gone']);
    assert.equal(gone.code, 1);
    assert.equal(gone.stdout, '');
    const refusal = 'broker credential: agent "alpha" has no active task "gone"';
    assert.equal(gone.stderr, `${refusal}\nstart one with: broker task start TEMPLATE --namespace NAMESPACE --name gone\n${refusal}\n${refusal}\n`);
    // Any message: a usage error prints its usage text once.
    const usage = await thrice(['--task', 'ok', '--frob']);
    assert.equal(usage.code, 2);
    const lines = usage.stderr.split('\n');
    assert.equal(lines[0], 'unknown argument "--frob"');
    assert.equal(lines.filter((l) => l === 'unknown argument "--frob"').length, 3, usage.stderr);
    assert.equal(lines.filter((l) => l.startsWith('usage: broker credential')).length, 1, usage.stderr);
    // A success prints its credential every time (stdout is kubectl's, per run).
    const ok = await thrice(['--task', 'ok']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stderr, '');
    assert.equal(ok.stdout.trim().split('\n').length, 3);
  });

  test('usage and input problems name what is wrong', async () => {
    assert.match((await plugin([], env())).stderr, /--task is required/);
    assert.equal((await plugin(['--task'], env())).code, 2);
    assert.match((await plugin(['--task', 'ok', '--frob'], env())).stderr, /unknown argument "--frob"/);
    assert.match((await plugin(['--task', 'ok'], { BROKER_IDENTITY_TOKEN: 'x' })).stderr, /no broker: pass --broker URL or set BROKER_URL/);
    const noId = await plugin(['--task', 'ok'], { BROKER_URL: url });
    assert.equal(noId.code, 4);
    assert.match(noId.stderr, /no identity: set BROKER_IDENTITY_TOKEN_FILE/);
    assert.match((await plugin(['--task', 'ok'], env({ KUBERNETES_EXEC_INFO: '{' }))).stderr, /KUBERNETES_EXEC_INFO is not valid JSON/);
    assert.match((await plugin(['--task', 'ok', '--broker-ca', '/nonexistent/ca.pem'], env())).stderr, /cannot read the broker CA \/nonexistent\/ca.pem: ENOENT/);
    const ftp = await plugin(['--task', 'ok'], env({ BROKER_URL: 'ftp://127.0.0.1' }));
    assert.equal(ftp.code, 2);
    assert.match(ftp.stderr, /the broker URL "ftp:\/\/127.0.0.1" is not a URL/);
    for (const timeout of ['0', '07', '1.5', '-1', '301', 'ten', ' 5']) {
      const res = await plugin(['--task', 'ok'], env({ BROKER_CREDENTIAL_TIMEOUT: timeout }));
      assert.equal(res.code, 2, timeout);
      assert.equal(res.stderr, `BROKER_CREDENTIAL_TIMEOUT must be a whole number of seconds from 1 to 300, not ${JSON.stringify(timeout)}\n`);
    }
  });

  test('a redirect (301, 302, 303, 307, 308) is refused, never followed: the identity token goes to the configured broker only', async () => {
    for (const status of [301, 302, 303, 307, 308]) {
      const res = await plugin(['--task', `redirect-${status}`], env());
      assert.equal(res.code, 1, `${status}: ${res.stderr}`);
      assert.equal(res.stdout, '');
      assert.equal(
        res.stderr,
        `broker credential: the broker at ${url} answered ${status}, a redirect: redirects are refused, the identity token goes only to the configured broker URL (check BROKER_URL)\n`,
      );
      // Neither the Location (it may carry a token) nor the identity token is printed.
      assert.ok(!res.stderr.includes('location-secret') && !res.stderr.includes(elsewhereUrl) && !res.stderr.includes('id-token'), res.stderr);
      assert.deepEqual(seen.at(-1), { method: 'POST', url: `/v1/tasks/redirect-${status}/credential`, authorization: 'Bearer id-token' });
    }
    const flag = await plugin(['--task', 'redirect-307', '--broker', url], env({ BROKER_URL: 'https://unused.invalid' }));
    assert.match(flag.stderr, /answered 307, a redirect: redirects are refused.*\(check --broker\)$/m);

    // The case of the review: an HTTPS broker that redirects to plain HTTP on loopback.
    const dir = mkdtempSync(join(tmpdir(), 'tb-redirect-'));
    const tls = createHttpsServer({}, (_req, res) => {
      res.writeHead(307, { location: `${elsewhereUrl}/v1/tasks/ok/credential` }).end();
    });
    try {
      const [cert, key] = [join(dir, 'broker.crt'), join(dir, 'broker.key')];
      const made = await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
        '-subj', '/CN=task-broker', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert]);
      assert.equal(made.code, 0, made.stderr);
      tls.setSecureContext({ cert: readFileSync(cert), key: readFileSync(key) });
      await new Promise<void>((done) => tls.listen(0, '127.0.0.1', done));
      const secureUrl = `https://127.0.0.1:${(tls.address() as { port: number }).port}`;
      const res = await plugin(['--task', 'ok'], env({ BROKER_URL: secureUrl, BROKER_CA: cert }));
      assert.equal(res.code, 1, res.stderr);
      assert.equal(res.stdout, '');
      assert.match(res.stderr, new RegExp(`^broker credential: the broker at ${secureUrl} answered 307, a redirect: redirects are refused`));
    } finally {
      await new Promise<void>((done) => tls.close(() => done()));
      rmSync(dir, { recursive: true, force: true });
    }
    assert.deepEqual(elsewhereSeen, { connections: 0, requests: 0 }, 'the redirect target must not even see a connection');
  });

  test('plain http:// to a host that is not loopback is refused before any connection, naming where the URL came from', async () => {
    // The host as printed: the Node build's URL normalises an IPv6 address, Go keeps it as written.
    for (const [broker, host] of [
      // Names under .invalid never resolve: even a regression sends nothing off this machine.
      ['http://broker.invalid:1', 'broker.invalid:1'],
      ['http://example.invalid', 'example.invalid'],
      ['http://0.0.0.0:8080/', '0.0.0.0:8080'],
      ['http://[::ffff:127.0.0.1]:1', build === 'node' ? '[::ffff:7f00:1]:1' : '[::ffff:127.0.0.1]:1'],
      ['HTTP://LOCALHOST.Example.invalid', 'localhost.example.invalid'],
    ] as const) {
      for (const [argv, extra, from] of [
        [[], { BROKER_URL: broker }, 'BROKER_URL'],
        [['--broker', broker], { BROKER_URL: url }, '--broker'],
      ] as const) {
        const t0 = performance.now();
        const res = await plugin(['--task', 'ok', ...argv], env(extra));
        const elapsed = performance.now() - t0;
        assert.equal(res.code, 2, `${broker} ${from}: ${res.stderr}`);
        assert.equal(res.stdout, '');
        assert.equal(
          res.stderr,
          `broker credential: the broker URL from ${from} is plain http:// to ${host}, which is not loopback: use https:// (http:// is allowed only to 127.0.0.0/8, ::1 and localhost, so that the identity token never crosses a network in clear)\n`,
        );
        assert.ok(elapsed < 1500, `${broker}: ${elapsed} ms (a connection was attempted?)`);
      }
    }
    // Loopback is allowed: these get as far as connecting (nothing listens on port 1).
    for (const broker of ['http://127.0.0.2:1', 'http://localhost:1', 'http://[::1]:1']) {
      const res = await plugin(['--task', 'ok'], env({ BROKER_URL: broker, BROKER_CREDENTIAL_TIMEOUT: '2' }));
      assert.equal(res.code, 5, `${broker}: ${res.stderr}`);
      assert.doesNotMatch(res.stderr, /not loopback/);
    }
  });

  test('one deadline covers the whole request: a server that drips headers or the body, or stalls TLS, is cut at BROKER_CREDENTIAL_TIMEOUT', async () => {
    // Lines come every 300 ms, well inside the deadline: a socket idle timeout would never fire.
    const sent = { head: 0, body: 0, tls: 0 };
    const sockets = new Set<Socket>();
    const drip = createTcpServer((socket) => {
      sockets.add(socket);
      let timer: NodeJS.Timeout | undefined;
      socket.on('error', () => {});
      socket.on('close', () => (clearInterval(timer), sockets.delete(socket)));
      socket.once('data', (first: Buffer) => {
        if (first[0] === 0x16) return void sent.tls++; // a TLS ClientHello: never answered
        const mode = first.toString('latin1').includes('/drip-body/') ? 'body' : 'head';
        socket.write(mode === 'body' ? 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{' : 'HTTP/1.1 200 OK\r\n');
        timer = setInterval(() => {
          sent[mode]++;
          socket.write(mode === 'body' ? ' ' : `X-Drip-${sent[mode]}: 1\r\n`);
        }, 300);
      });
    });
    await new Promise<void>((done) => drip.listen(0, '127.0.0.1', done));
    const port = (drip.address() as { port: number }).port;
    try {
      const timed = async (task: string, broker: string) => {
        const t0 = performance.now();
        const res = await plugin(['--task', task], env({ BROKER_URL: broker, BROKER_CREDENTIAL_TIMEOUT: '2' }));
        return { ...res, elapsed: performance.now() - t0, broker };
      };
      const results = await Promise.all([
        timed('drip-head', `http://127.0.0.1:${port}`),
        timed('drip-body', `http://127.0.0.1:${port}`),
        timed('ok', `https://127.0.0.1:${port}`),
      ]);
      for (const res of results) {
        assert.equal(res.code, 5, `${res.broker}: ${res.stderr}`);
        assert.equal(res.stdout, '');
        assert.equal(res.stderr, `broker credential: the broker at ${res.broker} gave no complete answer: timed out after 2 s\n`);
        assert.ok(res.elapsed >= 1900 && res.elapsed < 3500, `${res.broker}: cut after ${Math.round(res.elapsed)} ms, not at the 2 s deadline`);
      }
      assert.ok(sent.head >= 4 && sent.body >= 4 && sent.tls === 1, JSON.stringify(sent));
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((done) => drip.close(() => done()));
    }
  });

  test('a token with control characters is refused before anything is sent (no header injection)', async () => {
    const before = seen.length;
    const res = await plugin(['--task', 'ok'], env({ BROKER_IDENTITY_TOKEN: 'abc\r\nX-Evil: 1' }));
    assert.equal(res.code, 4);
    assert.match(res.stderr, /contains characters a token cannot have/);
    assert.equal(seen.length, before);
  });

  // The Node build's own HTTP/1.1 reader (the native build uses Go's net/http).
  if (build === 'node') test('reads Content-Length and chunked answers, and refuses a truncated one', () => {
    const cl = parseResponse(Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}'));
    assert.deepEqual(cl, { status: 200, body: '{}' });
    const chunked = parseResponse(Buffer.from('HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n'));
    assert.deepEqual(chunked, { status: 404, body: '{"a":1}' });
    assert.throws(() => parseResponse(Buffer.from('HTTP/1.1 200 OK\r\nContent-Le')), /before a complete answer/);
  });

  if (build === 'node') test('starts lean: it loads its own file and nothing else (no commander, chalk, fastify or Kubernetes client)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tb-trace-'));
    try {
      const trace = join(dir, 'modules.txt');
      const hook = new URL('../fixtures/trace-modules.mjs', import.meta.url).href;
      const res = await run(process.execPath, [NODE_ENTRY, '--task', 'ok'], {
        ...env(),
        PATH: process.env['PATH'],
        NODE_OPTIONS: `--import=${hook}`,
        TRACE_MODULES_FILE: trace,
      });
      assert.equal(res.code, 0, res.stderr);
      const loaded = readFileSync(trace, 'utf8').split('\n').filter(Boolean);
      assert.deepEqual(
        loaded.map((u) => u.replace(new URL('../../', import.meta.url).href, '')),
        ['dist/credential/main.cjs'],
      );
      assert.ok(!loaded.some((u) => u.includes('node_modules')));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
