/**
 * An agent proof is used once across broker replicas that share a PostgreSQL audit store
 * (src/identity/proof-replay.ts): two broker processes on one store and one real API server, behind
 * one name (the proof binds the Host, so both are asked as replica A's host, as a load balancer
 * would). A proof accepted by A is refused by B (401, `auth.failed` with the replay reason); a fresh
 * proof is taken by B; one proof sent to both at once is taken once. The brokers' role can delete no
 * used proof; expired ones are pruned through the owner's function, unexpired ones stay. With the
 * database away, proofs are refused (503).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { readFileSync } from 'node:fs';
import { parseAgentKey, proofHeader, type AgentKey } from '../../src/identity/agent-proof.ts';
import { brokerCli, BrokerEnv, POLICY_FILE, type BrokerProcess } from '../helpers/broker.ts';
import { TestPostgres } from '../helpers/postgres.ts';
import { until } from '../helpers/wait.ts';


const POLICY =
  readFileSync(POLICY_FILE, 'utf8').replace('agents:\n', 'agents:\n  - name: keyed\n').replace('agents: [alpha, beta]', 'agents: [alpha, beta, keyed]') +
  'people:\n  - name: root\n    identities: [{ serviceAccount: agents/admin }]\napprovers:\n  - name: admins\n    members: [{ person: root }]\nadministrators: [admins]\n';

/** The CLI with a bare environment: PATH, no colour, and `env`. */
const cli = (args: string[], env: NodeJS.ProcessEnv = {}) => brokerCli(args, { PATH: process.env['PATH'] ?? '/usr/bin:/bin', NO_COLOR: '1', ...env });

/** GET `path` from the broker at `at`, with the Host header `host` (replica A's): what a load balancer in front of both would pass on. */
function get(at: string, host: string, path: string, authorization: string): Promise<{ status: number; body: string }> {
  const u = new URL(at);
  return new Promise((done, fail) => {
    const req = request({ host: u.hostname, port: u.port, path, method: 'GET', headers: { host, authorization } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => done({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', fail);
    req.end();
  });
}

describe('agent proofs used once across replicas on one PostgreSQL audit store (issue 14)', () => {
  let pg: TestPostgres | undefined;
  let env: BrokerEnv | undefined;
  let a: BrokerProcess;
  let b: BrokerProcess;
  let key: AgentKey;

  before(async () => {
    pg = await TestPostgres.start();
    const migrated = cli(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker']);
    assert.equal(migrated.status, 0, migrated.stderr);
    env = await BrokerEnv.start({
      policyText: POLICY,
      beforeApply: async (kube) => {
        await kube.core.createNamespacedServiceAccount({ namespace: 'agents', body: { metadata: { name: 'admin' } } }).catch(() => undefined);
      },
    });
    const store = pg.url('task_broker');
    const args = ['--auth-failure-log-interval', '1s', '--auth-failure-limit', '1000/10s'];
    [a, b] = await Promise.all([env.startBroker({ auditStore: store, extraArgs: args }), env.startBroker({ auditStore: store, extraArgs: args })]);
    // Enrolled at A with --print-key (no keychain needed here); the key is in the cluster for both.
    const admin = await env.agentToken('admin');
    const registered = cli(['agent', 'register', 'keyed', '-o', 'json'], { BROKER_URL: a.url, BROKER_IDENTITY_TOKEN: admin });
    assert.equal(registered.status, 0, registered.stderr);
    const enrolled = cli(['agent', 'enroll', JSON.parse(registered.stdout).code, '--print-key'], { BROKER_URL: a.url });
    assert.equal(enrolled.status, 0, enrolled.stderr);
    key = parseAgentKey(/^BROKER_AGENT_KEY=(\S+)\n$/.exec(enrolled.stdout)![1]!);
  });

  after(async () => {
    await a?.stop().catch(() => undefined);
    await b?.stop().catch(() => undefined);
    await env?.stop();
    await pg?.remove();
  });

  /** The reasons of the auth.failed records in the store. */
  async function failureReasons(): Promise<string[]> {
    const rows = await pg!.query<{ line: string }>('postgres', `SELECT line FROM task_broker.audit WHERE type = 'auth.failed' ORDER BY seq`);
    return rows.rows.flatMap((r) => (JSON.parse(r.line) as { details?: { reasons?: string[] } }).details?.reasons ?? []);
  }

  test('a proof taken by replica A is refused by replica B (401, a replay in auth.failed); a fresh proof is taken by B', async () => {
    const host = new URL(a.url).host;
    const url = `http://${host}/v1/whoami`;
    // B knows the key (its watch): a proof of its own is taken.
    await until('replica B to take a fresh proof', 10_000, async () => (await get(b.url, host, '/v1/whoami', proofHeader(key, 'GET', url))).status === 200);

    const proof = proofHeader(key, 'GET', url);
    const atA = await get(a.url, host, '/v1/whoami', proof);
    assert.equal(atA.status, 200, atA.body);
    assert.equal(JSON.parse(atA.body).agent, 'keyed');
    const atB = await get(b.url, host, '/v1/whoami', proof);
    assert.equal(atB.status, 401, atB.body);
    assert.equal(JSON.parse(atB.body).error.code, 'unauthenticated');
    await until('the replay in auth.failed', 10_000, async () => (await failureReasons()).some((r) => /agent proof refused: it was used before \(a replay\)/.test(r)));
    // And back: B first, then A.
    const other = proofHeader(key, 'GET', url);
    assert.equal((await get(b.url, host, '/v1/whoami', other)).status, 200);
    assert.equal((await get(a.url, host, '/v1/whoami', other)).status, 401);

    const fresh = await get(b.url, host, '/v1/whoami', proofHeader(key, 'GET', url));
    assert.equal(fresh.status, 200, fresh.body);
    assert.equal(JSON.parse(fresh.body).agent, 'keyed');
  });

  test('the same proof at both replicas at once, several times each: taken exactly once; 20 fresh proofs at once: all taken', async () => {
    const host = new URL(a.url).host;
    const url = `http://${host}/v1/whoami`;
    for (let i = 0; i < 5; i++) {
      const proof = proofHeader(key, 'GET', url);
      const statuses = (await Promise.all([a, b, a, b, b, a].map((r) => get(r.url, host, '/v1/whoami', proof)))).map((r) => r.status);
      assert.deepEqual(statuses.sort(), [200, 401, 401, 401, 401, 401], `round ${i}`);
    }
    const many = await Promise.all(Array.from({ length: 20 }, (_, i) => get((i % 2 ? a : b).url, host, '/v1/whoami', proofHeader(key, 'GET', url))));
    assert.deepEqual([...new Set(many.map((r) => r.status))], [200]);
  });

  test("the brokers' role cannot delete a used proof; the owner's function prunes only expired ones", async () => {
    const used = await pg!.query<{ n: string }>('postgres', 'SELECT count(*) AS n FROM task_broker.used_proofs WHERE expires > now()');
    assert.ok(Number(used.rows[0]!.n) >= 29, `the proofs above are recorded: ${used.rows[0]!.n}`);
    await assert.rejects(pg!.query('task_broker', 'DELETE FROM task_broker.used_proofs'), /permission denied for table used_proofs/);
    await assert.rejects(pg!.query('task_broker', "UPDATE task_broker.used_proofs SET expires = now() - interval '1 hour'"), /permission denied for table used_proofs/);
    await pg!.query('postgres', "INSERT INTO task_broker.used_proofs (id, expires) VALUES ('\\x00'::bytea, now() - interval '10 minutes'), ('\\x01'::bytea, now() - interval '1 minute')");
    const pruned = await pg!.query<{ n: string }>('task_broker', 'SELECT task_broker.prune_used_proofs() AS n');
    assert.equal(Number(pruned.rows[0]!.n), 1, 'only the row expired more than five minutes ago');
    const left = await pg!.query<{ n: string }>('postgres', 'SELECT count(*) AS n FROM task_broker.used_proofs WHERE expires > now()');
    assert.equal(left.rows[0]!.n, used.rows[0]!.n, 'unexpired proofs stay');
    // Migrating again keeps the table and its rows, and prunes too.
    await pg!.query('postgres', "INSERT INTO task_broker.used_proofs (id, expires) VALUES ('\\x02'::bytea, now() - interval '1 hour')");
    const again = cli(['audit', 'migrate', pg!.url('postgres'), '--grant', 'task_broker']);
    assert.equal(again.status, 0, again.stderr);
    const after = await pg!.query<{ id: Buffer }>('postgres', 'SELECT id FROM task_broker.used_proofs WHERE expires <= now()');
    assert.deepEqual(after.rows.map((r) => r.id.toString('hex')), ['01']);
  });

  test('a store migrated before the table existed: proofs refused (503, naming broker audit migrate) until it is migrated again', async () => {
    const host = new URL(a.url).host;
    const url = `http://${host}/v1/whoami`;
    await pg!.query('postgres', 'DROP FUNCTION task_broker.prune_used_proofs(); DROP TABLE task_broker.used_proofs');
    const refused = await get(b.url, host, '/v1/whoami', proofHeader(key, 'GET', url));
    assert.equal(refused.status, 503, refused.body);
    assert.equal(JSON.parse(refused.body).error.code, 'audit_unavailable');
    // The broker's log says what to do (the caller gets the fixed message of every audit_unavailable), without the password.
    await until('the broker log naming broker audit migrate', 5_000, () => /has no table of used agent proofs: run `broker audit migrate postgres:\/\/task_broker:\*\*\*@/.test(b.stderr));
    assert.ok(!b.stderr.includes(new URL(pg!.url('task_broker')).password));
    const migrated = cli(['audit', 'migrate', pg!.url('postgres'), '--grant', 'task_broker']);
    assert.equal(migrated.status, 0, migrated.stderr);
    assert.equal((await get(b.url, host, '/v1/whoami', proofHeader(key, 'GET', url))).status, 200);
  });

  test('the database away: a proof is refused with 503 (never taken on a guess), and taken again once it is back', async () => {
    const host = new URL(a.url).host;
    const url = `http://${host}/v1/whoami`;
    await pg!.pause();
    try {
      const refused = await get(a.url, host, '/v1/whoami', proofHeader(key, 'GET', url));
      assert.equal(refused.status, 503, refused.body);
      assert.equal(JSON.parse(refused.body).error.code, 'audit_unavailable');
    } finally {
      await pg!.resume();
    }
    await until('a proof taken again', 15_000, async () => (await get(a.url, host, '/v1/whoami', proofHeader(key, 'GET', url))).status === 200);
  });
});
