/**
 * Limits before work (src/server/limits.ts) and the bounded record of refused callers
 * (src/server/auth-failures.ts), on the app itself with inject(): no socket, no cluster.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { AuditLog, type AuditEventInput } from '../../src/audit/log.ts';
import { canonicalRecordJson, recordLine } from '../../src/audit/verify.ts';
import { BrokerError } from '../../src/errors.ts';
import type { Authenticator, AuthRequest, Caller } from '../../src/identity/types.ts';
import { buildApp } from '../../src/server/app.ts';
import { AuthFailureLog, MAX_REASON_CHARS } from '../../src/server/auth-failures.ts';
import { Gate, parseRate, sourceOf, type Limits } from '../../src/server/limits.ts';
import { Metrics } from '../../src/server/metrics.ts';

/** Accepts `Bearer good-NAME` as agent NAME; refuses every other bearer token; counts what it is asked. */
class FakeAuthenticator implements Authenticator {
  readonly method = 'serviceAccount' as const;
  reviews = 0;
  async authenticate(req: AuthRequest): Promise<Caller | undefined> {
    const h = req.headers['authorization'];
    if (typeof h !== 'string') return undefined;
    this.reviews++;
    const m = /^Bearer good-(\w+)$/.exec(h);
    if (!m) throw new BrokerError('unauthenticated', 'the ServiceAccount token was not accepted');
    return { agent: m[1]!, subject: `system:serviceaccount:agents:${m[1]}`, method: 'serviceAccount', principal: `agent:${m[1]}` } as Caller;
  }
}

interface Harness {
  app: FastifyInstance;
  authn: FakeAuthenticator;
  audit: AuditLog;
  metrics: Metrics;
  records: () => Array<Record<string, any>>;
}

async function harness(dir: string, name: string, limits: Partial<Limits>): Promise<Harness> {
  const audit = await AuditLog.open(join(dir, `${name}.jsonl`));
  const authn = new FakeAuthenticator();
  const metrics = new Metrics();
  const app = buildApp({
    tasks: { list: () => [] } as never,
    store: { synced: true, list: () => [] } as never,
    audit,
    authenticators: [authn],
    metrics,
    limits,
    log: () => {},
  });
  await app.ready();
  const records = () =>
    readFileSync(audit.path, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, any>);
  return { app, authn, audit, metrics, records };
}

describe('request limits (inject)', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'tb-limits-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('a source that has spent its failure budget gets 429 with Retry-After, and its credential is not checked', async () => {
    const h = await harness(dir, 'budget', { authFailures: { max: 3, windowMs: 60_000 } });
    try {
      for (let i = 0; i < 3; i++) {
        const res = await h.app.inject({ method: 'GET', url: '/v1/tasks', headers: { authorization: `Bearer random-${i}` } });
        assert.equal(res.statusCode, 401);
      }
      assert.equal(h.authn.reviews, 3);
      const refused = await h.app.inject({ method: 'GET', url: '/v1/tasks', headers: { authorization: 'Bearer good-alpha' } });
      assert.equal(refused.statusCode, 429);
      assert.equal(refused.json().error.code, 'rate_limited');
      assert.match(refused.json().error.message, /failed authentications/);
      const retry = Number(refused.headers['retry-after']);
      assert.ok(retry >= 1 && retry <= 60, `Retry-After ${retry}`);
      assert.equal(h.authn.reviews, 3, 'no authentication work once the budget is spent');
      // Routes outside /v1 need no authentication and stay open.
      assert.equal((await h.app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200);
      const metrics = await h.metrics.registry.metrics();
      assert.match(metrics, /broker_rate_limited_total\{limit="auth_failures"\} 1/);
      assert.match(metrics, /broker_auth_failures_total\{reason="rejected"\} 3/);
    } finally {
      await h.app.close();
      await h.audit.close();
    }
  });

  test('a burst of concurrent bad credentials cannot overshoot the failure budget', async () => {
    const h = await harness(dir, 'burst', { authFailures: { max: 5, windowMs: 60_000 } });
    try {
      // Each review takes a while, so all 40 are in flight together.
      const slow = h.authn.authenticate.bind(h.authn);
      h.authn.authenticate = async (req) => {
        await new Promise((r) => setTimeout(r, 20));
        return slow(req);
      };
      const codes = await Promise.all(
        Array.from({ length: 40 }, (_, i) => h.app.inject({ method: 'GET', url: '/v1/tasks', headers: { authorization: `Bearer random-${i}` } }).then((r) => r.statusCode)),
      );
      assert.equal(codes.filter((c) => c === 401).length, 5);
      assert.equal(codes.filter((c) => c === 429).length, 35);
      assert.equal(h.authn.reviews, 5);
    } finally {
      await h.app.close();
      await h.audit.close();
    }
  });

  test('the per-identity limit answers 429 with Retry-After and the broker error body; other identities are served', async () => {
    const h = await harness(dir, 'identity', { perIdentity: { max: 2, windowMs: 30_000 } });
    try {
      const as = (agent: string) => h.app.inject({ method: 'GET', url: '/v1/tasks', headers: { authorization: `Bearer good-${agent}` } });
      assert.equal((await as('alpha')).statusCode, 200);
      assert.equal((await as('alpha')).statusCode, 200);
      const limited = await as('alpha');
      assert.equal(limited.statusCode, 429);
      assert.deepEqual(Object.keys(limited.json()), ['error']);
      assert.equal(limited.json().error.code, 'rate_limited');
      assert.match(limited.json().error.message, /agent:alpha/);
      assert.ok(Number(limited.headers['retry-after']) >= 1);
      assert.ok(limited.headers['x-request-id']);
      assert.equal((await as('beta')).statusCode, 200);
      assert.equal((await h.app.inject({ method: 'GET', url: '/metrics' })).statusCode, 200, '/metrics is not counted per identity');
      await h.app.close(); // flushes the summary
      const throttled = h.records().filter((r) => r.type === 'request.throttled');
      assert.equal(throttled.length, 1);
      assert.equal(throttled[0]!.actor, 'agent:alpha');
      assert.equal(throttled[0]!.details.count, 1);
    } finally {
      await h.app.close();
      await h.audit.close();
    }
  });

  test('the per-source limit covers every route, /healthz included', async () => {
    const h = await harness(dir, 'source', { perSource: { max: 3, windowMs: 30_000 } });
    try {
      const codes = [];
      for (let i = 0; i < 5; i++) codes.push((await h.app.inject({ method: 'GET', url: '/healthz' })).statusCode);
      assert.deepEqual(codes, [200, 200, 200, 429, 429]);
    } finally {
      await h.app.close();
      await h.audit.close();
    }
  });

  test('unauthenticated failures become one summary record per source and category, without path or token', async () => {
    const h = await harness(dir, 'summary', { authFailures: { max: 1000, windowMs: 60_000 } });
    try {
      const path = '/v1/' + 'x'.repeat(8000);
      for (let i = 0; i < 50; i++) await h.app.inject({ method: 'GET', url: path });
      for (let i = 0; i < 50; i++) await h.app.inject({ method: 'GET', url: path, headers: { authorization: `Bearer secret-token-${i}` } });
      await h.app.close();
      const failed = h.records().filter((r) => r.type === 'auth.failed');
      assert.deepEqual(failed.map((r) => [r.details.category, r.details.count]).sort(), [
        ['no_credential', 50],
        ['rejected', 50],
      ]);
      const text = readFileSync(h.audit.path, 'utf8');
      assert.doesNotMatch(text, /xxxxxxxx|secret-token/);
      assert.equal(failed[0]!.details.source, '127.0.0.1');
    } finally {
      await h.audit.close();
    }
  });
});

describe('AuthFailureLog', () => {
  test('at most maxSources records per interval, the rest summed into one "other" record', async () => {
    const events: AuditEventInput[] = [];
    const log = new AuthFailureLog({ append: async (e) => void events.push(e), intervalMs: 10_000, maxSources: 100 });
    for (let i = 0; i < 5000; i++) log.note({ source: `10.0.${i >> 8}.${i & 255}`, category: i % 2 ? 'rejected' : 'no_credential' }, 'refused');
    await log.flush();
    assert.equal(events.length, 101);
    const other = events.find((e) => e.reason === 'other')!;
    assert.equal((other.details as { count: number }).count, 4900);
    await log.flush();
    assert.equal(events.length, 101, 'an empty interval writes nothing');
  });

  test('a record stays under 1 KiB whatever the refusal messages (the figure behind the log-growth bound)', async () => {
    const events: AuditEventInput[] = [];
    const log = new AuthFailureLog({ append: async (e) => void events.push(e), intervalMs: 10_000, maxSources: 100 });
    const ugly = '"\\'.repeat(500); // 2 bytes each once escaped: the most a kept character can cost
    log.note({ source: 'ffff:ffff:ffff:ffff::/64', category: 'rejected' }, ugly);
    log.note({ source: 'ffff:ffff:ffff:ffff::/64', category: 'rejected' }, ugly + 'x');
    log.note({ source: 'ffff:ffff:ffff:ffff::/64', category: 'rejected' }, ugly + 'y');
    await log.flush();
    const e = events[0]!;
    const record = { seq: 999_999_999, time: new Date().toISOString(), type: e.type, actor: e.actor, outcome: e.outcome, reason: e.reason, details: e.details, prev: 'f'.repeat(64) };
    const line = recordLine(canonicalRecordJson(record), 'f'.repeat(64)) + '\n';
    assert.ok(MAX_REASON_CHARS <= 160);
    // Anything outside printable ASCII (which could cost up to 6 bytes escaped) is replaced.
    log.note({ source: 'x', category: 'error' }, '\u0001\u{1F600}é');
    await log.flush();
    assert.deepEqual((events[1]!.details as { reasons: string[] }).reasons, ['????']);
    assert.ok(Buffer.byteLength(line) <= 1024, `${Buffer.byteLength(line)} bytes`);
    console.log(`largest auth.failed record: ${Buffer.byteLength(line)} bytes`);
  });
});

describe('limit helpers', () => {
  test('parseRate reads N/DURATION and off, and refuses the rest', () => {
    assert.deepEqual(parseRate('10/10s'), { max: 10, windowMs: 10_000 });
    assert.deepEqual(parseRate('600/1m'), { max: 600, windowMs: 60_000 });
    assert.equal(parseRate('off'), undefined);
    for (const bad of ['10', '0/1s', '10/0s', 'ten/1s', '10/1x']) assert.throws(() => parseRate(bad), { code: 'invalid_argument' }, bad);
  });

  test('sourceOf counts IPv6 by /64 and IPv4-mapped addresses as IPv4', () => {
    assert.equal(sourceOf('127.0.0.2'), '127.0.0.2');
    assert.equal(sourceOf('::ffff:10.1.2.3'), '10.1.2.3');
    assert.equal(sourceOf('2001:db8:1:2:aaaa::1'), sourceOf('2001:db8:1:2:bbbb:cccc:dddd:eeee'));
    assert.notEqual(sourceOf('2001:db8:1:2::1'), sourceOf('2001:db8:1:3::1'));
    assert.equal(sourceOf(undefined), 'unknown');
  });

  test('Gate: at most max at once; a waiter past waitMs is refused rate_limited', async () => {
    const gate = new Gate(1, 50);
    await gate.enter();
    const t0 = Date.now();
    await assert.rejects(gate.enter(), { code: 'rate_limited' });
    assert.ok(Date.now() - t0 >= 45);
    const next = gate.enter();
    gate.leave();
    await next;
    assert.equal(gate.active, 1);
  });
});
