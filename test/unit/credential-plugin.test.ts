/**
 * The exec plugin's contract, with a stand-in broker on loopback (a fake at the HTTP boundary; the
 * real broker and kubectl are in test/integration/cli-kubectl.test.ts). Both builds, the Node one and
 * the native one (native/credential), must behave the same: every contract test runs on each.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
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
const EXEC_V1 = JSON.stringify({ apiVersion: 'client.authentication.k8s.io/v1', kind: 'ExecCredential', spec: { interactive: false } });

for (const build of ['node', 'native'] as const)
describe(`broker credential (${build})`, () => {
  let server: Server;
  let url: string;
  const seen: Array<{ method: string; url: string; authorization: string | undefined }> = [];
  const replies = new Map<string, { status: number; body: string }>([
    ['/v1/tasks/ok/credential', { status: 200, body: JSON.stringify({ token: 'tok-123', expirationTimestamp: '2030-01-01T00:00:00.000Z', taskId: 'abc', jti: 'j' }) }],
    ['/v1/tasks/gone/credential', { status: 404, body: JSON.stringify({ error: { code: 'no_active_task', message: 'agent "alpha" has no active task "gone"' } }) }],
    ['/v1/tasks/denied/credential', { status: 401, body: JSON.stringify({ error: { code: 'unauthenticated', message: 'authentication failed' } }) }],
    ['/v1/tasks/gated/credential', { status: 403, body: JSON.stringify({ error: { code: 'approval_required', message: 'needs 1 approval', requestId: 'req-42' } }) }],
    ['/v1/tasks/audit/credential', { status: 503, body: JSON.stringify({ error: { code: 'audit_unavailable', message: 'the audit log cannot be written' } }) }],
    ['/v1/tasks/proxy/credential', { status: 502, body: '<html>bad gateway</html>' }],
    ['/v1/tasks/empty/credential', { status: 200, body: '{}' }],
  ]);

  before(async () => {
    server = createServer((req, res) => {
      seen.push({ method: req.method!, url: req.url!, authorization: req.headers.authorization });
      const reply = replies.get(req.url!) ?? { status: 404, body: '{}' };
      res.writeHead(reply.status, { 'content-type': 'application/json' }).end(reply.body);
    });
    await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
    url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  });
  after(() => new Promise<void>((done) => server.close(() => done())));

  async function plugin(argv: string[], env: NodeJS.ProcessEnv) {
    if (build === 'native') return run(NATIVE, argv, env);
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
