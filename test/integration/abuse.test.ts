/**
 * Abuse costs the abuser (DESIGN.md section 1, property 7), against a real API server and real broker
 * processes with their default limits. The attacker's sockets are bound to 127.0.0.2, the legitimate
 * client's to 127.0.0.1, so the broker sees two source addresses.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';

const ROOT = new URL('../..', import.meta.url).pathname;
const MAIN = join(ROOT, 'src/cli/main.ts');
const ATTACKER = '127.0.0.2';

/** The defaults the assertions rest on (src/server/limits.ts DEFAULT_LIMITS). */
const FAILURES_PER_WINDOW = 10;
const FAILURE_WINDOW_S = 10;
const SUMMARY_INTERVAL_S = 10;
const SUMMARY_MAX_SOURCES = 100;
const MAX_SUMMARY_RECORD_BYTES = 1024; // test/unit/limits.test.ts measures the worst case
const REQUEST_TIMEOUT_S = 10;
const PER_SOURCE_CONNECTIONS = 64;

/** One HTTP request from a chosen source address (node:http, so localAddress can be set). */
function rawRequest(
  url: string,
  opts: { method?: string; path: string; headers?: Record<string, string>; localAddress?: string; body?: string },
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: any }> {
  const u = new URL(url);
  return new Promise((done, fail) => {
    const req = httpRequest(
      { host: u.hostname, port: u.port, method: opts.method ?? 'GET', path: opts.path, headers: opts.headers ?? {}, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}), agent: false },
      (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => {
          let body: unknown = text;
          try {
            body = JSON.parse(text);
          } catch {
            // not JSON
          }
          done({ status: res.statusCode ?? 0, headers: res.headers, body });
        });
      },
    );
    req.on('error', fail);
    req.end(opts.body);
  });
}

/** TokenReviews the API server has completed so far, from its own audit log. */
function tokenReviews(env: BrokerEnv): number {
  let n = 0;
  for (const line of readFileSync(env.cluster.auditLog, 'utf8').split('\n')) {
    if (!line.includes('tokenreviews')) continue;
    const e = JSON.parse(line) as { stage?: string; verb?: string; objectRef?: { resource?: string } };
    if (e.stage === 'ResponseComplete' && e.verb === 'create' && e.objectRef?.resource === 'tokenreviews') n++;
  }
  return n;
}

function metric(text: string, name: string): number {
  const m = new RegExp(`^${name.replace(/[{}"]/g, '\\$&')} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : NaN;
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? NaN;
}

function auditVerify(file: string): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [MAIN, 'audit', 'verify', file], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout + r.stderr };
}

/**
 * The attacker, in its own process so that its load does not slow the legitimate client's event
 * loop: CONNS keep-alive connections from 127.0.0.2 for DURATION ms, each sending GET /v1/ + 8000
 * "x", half with no credential and half with a fresh random bearer token every time.
 */
const ATTACKER_SCRIPT = `
import { Client } from 'undici';
import { randomBytes } from 'node:crypto';
const { URL: url, DURATION, CONNS, LOCAL } = process.env;
const end = Date.now() + Number(DURATION);
const path = '/v1/' + 'x'.repeat(8000);
const counts = {};
await Promise.all(Array.from({ length: Number(CONNS) }, async (_, i) => {
  let client = new Client(url, { localAddress: LOCAL });
  while (Date.now() < end) {
    const headers = i % 2 ? { authorization: 'Bearer eyJhbGciOiJSUzI1NiJ9.' + randomBytes(300).toString('base64url') + '.' + randomBytes(64).toString('base64url') } : {};
    try {
      const res = await client.request({ method: 'GET', path, headers });
      await res.body.dump();
      counts[res.statusCode] = (counts[res.statusCode] ?? 0) + 1;
    } catch (err) {
      counts[err.code ?? 'error'] = (counts[err.code ?? 'error'] ?? 0) + 1;
      await client.destroy().catch(() => {});
      client = new Client(url, { localAddress: LOCAL });
    }
  }
  await client.close().catch(() => {});
}));
process.stdout.write(JSON.stringify(counts));
`;

function runAttacker(url: string, durationMs: number, conns: number): Promise<Record<string, number>> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', ATTACKER_SCRIPT], {
    cwd: ROOT,
    env: { ...process.env, URL: url, DURATION: String(durationMs), CONNS: String(conns), LOCAL: ATTACKER },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((done, fail) => {
    const killer = setTimeout(() => child.kill('SIGKILL'), durationMs + 15_000);
    child.once('exit', (code) => {
      clearTimeout(killer);
      if (code === 0) done(JSON.parse(out) as Record<string, number>);
      else fail(new Error(`attacker exited with ${code}: ${err}`));
    });
  });
}

describe('abuse: limits before work', () => {
  let env: BrokerEnv;
  let alpha: string;
  let beta: string;

  before(async () => {
    env = await BrokerEnv.start();
    alpha = await env.agentToken('alpha');
    beta = await env.agentToken('beta');
  });
  after(async () => {
    await env?.stop();
  });

  async function startBroker(name: string, extraArgs: string[] = []): Promise<BrokerProcess> {
    return env.startBroker({ auditLog: join(env.dir, `${name}.jsonl`), extraArgs });
  }

  test('a 10 s flood of bad requests from one address: bounded log growth and TokenReviews, legitimate calls served, chain intact', async (t) => {
    const broker = await startBroker('flood');
    t.after(() => broker.stop());
    const start = await broker.request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'flood', ttl: '10m' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal((await broker.request('POST', '/v1/tasks/flood/credential', alpha)).status, 200);

    const sizeBefore = statSync(broker.auditLog).size;
    const seqBefore = broker.auditRecords().length;
    const reviewsBefore = tokenReviews(env);
    const floodMs = 10_000;
    const t0 = Date.now();
    const attack = runAttacker(broker.url, floodMs, 48);

    // The legitimate client: one credential request every 20 ms (50/s, under its identity's 100/s).
    const latencies: number[] = [];
    const failures: string[] = [];
    while (Date.now() - t0 < floodMs) {
      const s = performance.now();
      const res = await broker.request('POST', '/v1/tasks/flood/credential', alpha).catch((err: Error) => ({ status: 0, body: err.message }));
      latencies.push(performance.now() - s);
      if (res.status !== 200) failures.push(`${res.status} ${JSON.stringify(res.body)}`);
      await sleep(20);
    }
    const attacked = await attack;
    const floodSeconds = (Date.now() - t0) / 1000;
    const metrics = String((await broker.request('GET', '/metrics', undefined)).body);
    await broker.stop(); // graceful: the last failure summary is written on close
    const reviews = tokenReviews(env) - reviewsBefore;

    const records = broker.auditRecords().slice(seqBefore);
    const lines = readFileSync(broker.auditLog, 'utf8').split('\n').filter(Boolean).slice(seqBefore);
    const growth = statSync(broker.auditLog).size - sizeBefore;
    const failed = records.map((r, i) => ({ r, bytes: Buffer.byteLength(lines[i]!) + 1 })).filter((x) => x.r.type === 'auth.failed');
    const failedBytes = failed.reduce((a, x) => a + x.bytes, 0);
    const byType: Record<string, number> = {};
    for (const r of records) byType[r.type] = (byType[r.type] ?? 0) + 1;
    const attackTotal = Object.values(attacked).reduce((a, b) => a + b, 0);

    // Summaries are written every 10 s and on close: within the flood and the stop, at most
    // ceil(seconds / 10) + 1 flushes, each at most (100 + 1) records of at most 1 KiB.
    const flushes = Math.ceil(floodSeconds / SUMMARY_INTERVAL_S) + 1;
    const boundBytes = flushes * (SUMMARY_MAX_SOURCES + 1) * MAX_SUMMARY_RECORD_BYTES;
    // The attacker may fail authentication 10 times per 10 s window (the window opens at its first failure).
    const windows = Math.ceil(floodSeconds / FAILURE_WINDOW_S) + 1;
    const reviewBound = windows * FAILURES_PER_WINDOW + 5; // + the legitimate token, re-reviewed when its cache entry lapses

    console.log(`flood: ${floodSeconds.toFixed(1)} s, attacker ${attackTotal} requests (${Math.round(attackTotal / floodSeconds)}/s): ${JSON.stringify(attacked)}`);
    console.log(`legitimate: ${latencies.length} credential requests, ${failures.length} failed; p50 ${percentile(latencies, 50).toFixed(1)} ms, p99 ${percentile(latencies, 99).toFixed(1)} ms, max ${Math.max(...latencies).toFixed(1)} ms`);
    console.log(`TokenReviews during the flood (API server audit log): ${reviews} (bound ${reviewBound}); broker_token_reviews_total ${metric(metrics, 'broker_token_reviews_total')}`);
    console.log(`audit log growth: ${growth} bytes, ${records.length} records ${JSON.stringify(byType)}; auth.failed: ${failed.length} records, ${failedBytes} bytes (bound ${boundBytes})`);
    console.log(`metrics: ${['broker_auth_failures_total{reason="no_credential"}', 'broker_auth_failures_total{reason="rejected"}', 'broker_auth_failures_total{reason="rate_limited"}', 'broker_rate_limited_total{limit="source"}', 'broker_rate_limited_total{limit="auth_failures"}', 'broker_audit_log_bytes'].map((n) => `${n} ${metric(metrics, n)}`).join(', ')}`);

    assert.ok(attackTotal > 5000, 'the attacker did flood');
    assert.deepEqual(failures, [], 'every legitimate request was served');
    assert.ok(percentile(latencies, 99) < 1000, `legitimate p99 ${percentile(latencies, 99).toFixed(1)} ms`);
    assert.ok(reviews <= reviewBound, `${reviews} TokenReviews > ${reviewBound}`);
    assert.ok(failedBytes <= boundBytes, `${failedBytes} bytes of auth.failed > ${boundBytes}`);
    assert.ok(failed.length <= flushes * 4, `${failed.length} auth.failed records from 2 sources in ${flushes} flushes`);
    for (const { r } of failed) {
      assert.equal(r.details.source, ATTACKER);
      assert.ok(r.details.count >= 1 && r.details.first && r.details.last);
    }
    assert.equal(failed.reduce((a, x) => a + x.r.details.count, 0), metric(metrics, 'broker_auth_failures_total{reason="no_credential"}') + metric(metrics, 'broker_auth_failures_total{reason="rejected"}') + metric(metrics, 'broker_auth_failures_total{reason="rate_limited"}'), 'every refusal is counted in the summaries');
    // Only what the legitimate client caused and the summaries: no record per attacking request.
    assert.ok(growth <= failedBytes + byType['credential.served']! * 2048 + 4096, `growth ${growth}`);
    assert.doesNotMatch(readFileSync(broker.auditLog, 'utf8'), /xxxxxxxxxxxxxxxx|eyJhbGciOiJSUzI1NiJ9\./, 'no path, no token');
    const verified = auditVerify(broker.auditLog);
    assert.equal(verified.code, 0, verified.out);
  });

  test('slow clients dripping a body from one address: cut after the request timeout, others served meanwhile', async (t) => {
    const broker = await startBroker('slow');
    t.after(() => broker.stop());
    const { port } = new URL(broker.url);
    const t0 = Date.now();
    const sockets: Array<{ socket: Socket; closedAt?: number; got: string }> = [];
    for (let i = 0; i < 300; i++) {
      const s = { socket: connect({ host: '127.0.0.1', port: Number(port), localAddress: ATTACKER }), got: '' } as { socket: Socket; closedAt?: number; got: string };
      s.socket.on('error', () => {});
      s.socket.on('data', (d: Buffer) => (s.got += d.toString()));
      s.socket.on('close', () => (s.closedAt = Date.now() - t0));
      s.socket.write('POST /v1/tasks HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{');
      sockets.push(s);
    }
    const drip = setInterval(() => {
      for (const s of sockets) if (s.closedAt === undefined) s.socket.write(' ');
    }, 2000);
    t.after(() => {
      clearInterval(drip);
      for (const s of sockets) s.socket.destroy();
    });

    // Meanwhile the legitimate client and the probes are answered, until every slow socket is gone.
    const served: number[] = [];
    const refused: string[] = [];
    while (sockets.some((s) => s.closedAt === undefined) && Date.now() - t0 < (REQUEST_TIMEOUT_S + 8) * 1000) {
      const s = performance.now();
      const [tasks, ready] = await Promise.all([broker.request('GET', '/v1/tasks', alpha), broker.request('GET', '/readyz', undefined)]);
      served.push(performance.now() - s);
      if (tasks.status !== 200 || ready.status !== 200) refused.push(`${tasks.status}/${ready.status}`);
      await sleep(200);
    }
    clearInterval(drip);
    const closed = sockets.map((s) => s.closedAt ?? Infinity).sort((a, b) => a - b);
    const early = closed.filter((c) => c < 2000).length;
    const cut = closed.slice(early);
    console.log(`slow clients: ${sockets.length} from ${ATTACKER}; ${early} closed at once (over the per-source cap), ${cut.length} cut between ${cut[0]} and ${cut.at(-1)} ms; ${cut.length && sockets.filter((s) => s.got.includes('408 Request Timeout')).length} got 408`);
    console.log(`legitimate meanwhile: ${served.length} rounds, ${refused.length} refused, max ${Math.max(...served).toFixed(1)} ms`);

    assert.deepEqual(refused, []);
    assert.equal(early, sockets.length - PER_SOURCE_CONNECTIONS, 'beyond the per-source cap, connections are closed at once');
    assert.equal(cut.length, PER_SOURCE_CONNECTIONS);
    assert.ok(cut[0]! >= (REQUEST_TIMEOUT_S - 1) * 1000, `first cut at ${cut[0]} ms: not before the request timeout`);
    assert.ok(cut.at(-1)! <= (REQUEST_TIMEOUT_S + 3) * 1000, `last cut at ${cut.at(-1)} ms: within the timeout and the 1 s check interval`);
    assert.equal(sockets.filter((s) => s.got.includes('408 Request Timeout')).length, PER_SOURCE_CONNECTIONS);
  });

  test('per identity: 429 with Retry-After and the broker error body, for that identity only; health probes stay open', async (t) => {
    const broker = await startBroker('identity', ['--rate-limit-identity', '5/3s']);
    t.after(() => broker.stop());
    const statuses: number[] = [];
    for (let i = 0; i < 5; i++) statuses.push((await broker.request('GET', '/v1/tasks', alpha)).status);
    assert.deepEqual(statuses, [200, 200, 200, 200, 200]);

    const limited = await rawRequest(broker.url, { path: '/v1/tasks', headers: { authorization: `Bearer ${alpha}` } });
    assert.equal(limited.status, 429);
    assert.deepEqual(Object.keys(limited.body), ['error']);
    assert.equal(limited.body.error.code, 'rate_limited');
    assert.match(limited.body.error.message, /too many requests from agent:alpha/);
    const retryAfter = Number(limited.headers['retry-after']);
    assert.ok(retryAfter >= 1 && retryAfter <= 3, `Retry-After: ${limited.headers['retry-after']}`);

    assert.equal((await broker.request('GET', '/v1/tasks', beta)).status, 200, 'another identity is not limited');
    for (const path of ['/healthz', '/readyz', '/metrics']) assert.equal((await broker.request('GET', path, undefined)).status, 200, path);

    await sleep(retryAfter * 1000 + 100);
    assert.equal((await broker.request('GET', '/v1/tasks', alpha)).status, 200, 'served again after Retry-After');
    const metrics = String((await broker.request('GET', '/metrics', undefined)).body);
    assert.equal(metric(metrics, 'broker_rate_limited_total{limit="identity"}'), 1);

    await broker.stop();
    const throttled = broker.auditRecords().filter((r) => r.type === 'request.throttled');
    assert.equal(throttled.length, 1);
    assert.equal(throttled[0]!.actor, 'agent:alpha');
    assert.equal(throttled[0]!.details.count, 1);
    assert.equal(auditVerify(broker.auditLog).code, 0);
  });

  test('per source: after 10 failed authentications an address gets 429 without a TokenReview; other addresses are unaffected', async (t) => {
    const broker = await startBroker('failures');
    t.after(() => broker.stop());
    const reviewsBefore = tokenReviews(env);
    const bogus = () => ({ authorization: `Bearer eyJhbGciOiJSUzI1NiJ9.${randomBytes(200).toString('base64url')}.${randomBytes(64).toString('base64url')}` });
    for (let i = 0; i < FAILURES_PER_WINDOW; i++) {
      const res = await rawRequest(broker.url, { path: '/v1/tasks', headers: bogus(), localAddress: ATTACKER });
      assert.equal(res.status, 401, `attempt ${i + 1}`);
    }
    const reviewsAfterBudget = tokenReviews(env);
    for (let i = 0; i < 20; i++) {
      const res = await rawRequest(broker.url, { path: '/v1/tasks', headers: bogus(), localAddress: ATTACKER });
      assert.equal(res.status, 429);
      assert.equal(res.body.error.code, 'rate_limited');
      assert.ok(Number(res.headers['retry-after']) >= 1 && Number(res.headers['retry-after']) <= FAILURE_WINDOW_S);
    }
    // Even a valid credential from that address waits out the window.
    assert.equal((await rawRequest(broker.url, { path: '/v1/tasks', headers: { authorization: `Bearer ${alpha}` }, localAddress: ATTACKER })).status, 429);
    assert.equal((await broker.request('GET', '/v1/tasks', alpha)).status, 200, 'the legitimate address is served');
    // The API server's audit log is written as each review completes; give the last one a moment.
    await sleep(500);
    assert.equal(reviewsAfterBudget - reviewsBefore, FAILURES_PER_WINDOW, 'one TokenReview per failed attempt');
    assert.ok(tokenReviews(env) - reviewsAfterBudget <= 1, 'none for the refused ones (at most one for the legitimate token)');
  });
});
