/**
 * The web console on three broker replicas sharing one PostgreSQL audit store (src/console/
 * shared-sessions.ts, store-timeline.ts), against real parts: a certified OpenID provider, one real
 * API server, PostgreSQL made by `broker audit migrate`, Debian's chromium. The brokers serve plain
 * HTTP on loopback (the console's cookie then has no Secure flag: the browser check of that mode).
 *
 * A browser signs in at replica A. Browsers keep cookies per host, not per port, so the same browser
 * context sends A's session cookie to B's and C's origins (127.0.0.1, other ports), as it would to any
 * replica behind one Service; an HTTP client sends the same cookie value by hand too. Replica B shows
 * the timeline of a task whose records were written via A and C, paged, with the chain's verdict.
 * A sign-out at B is refused at A and C at once, and ends a live-update stream open at C.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import { migrate } from '../../src/audit/postgres.ts';
import { buildStories } from '../../src/audit/show.ts';
import type { AuditRecord } from '../../src/audit/types.ts';
import { freePort } from '../../src/cluster/local-cluster.ts';
import { ConsoleDatabase } from '../../src/console/db.ts';
import { StoreStories } from '../../src/console/store-timeline.ts';
import { brokerCli as cli, BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { browserAvailable, launchBrowser, type TestBrowser } from '../helpers/browser.ts';
import { CONSOLE_CLIENT_ID, TestProvider } from '../helpers/oidc-provider.ts';
import { postgresAvailable, TestPostgres } from '../helpers/postgres.ts';
import { auditTime, eventList, podEvent, taskUser } from '../helpers/kube-audit-events.ts';
import { until } from '../helpers/wait.ts';

const WEBHOOK = '/v1/audit/kubernetes';
/** More API requests than one page of the timeline holds (200). */
const REQUESTS = 230;

function policyFor(issuer: string): string {
  return `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  serviceAccount: task-broker
  tokenTTL: 10m
  identityAudience: task-broker
agents:
  - name: alpha
    identities:
      - serviceAccount: agents/alpha
templates:
  - name: read-pods
    namespaces: [team-a]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
issuers:
  - issuer: ${issuer}
    audience: [${CONSOLE_CLIENT_ID}]
    groupsClaim: groups
    login: { clientId: ${CONSOLE_CLIENT_ID} }
people:
  - name: bob
    identities: [{ oidc: { issuer: "${issuer}", subject: sre-bob } }]
approvers:
  - name: sre
    members:
      - oidcGroup: { issuer: "${issuer}", group: sre }
`;
}

// In CI (.ci/run sets CI) a missing chromium or PostgreSQL fails the test rather than skipping it.
const missing = !browserAvailable() ? 'chromium is not installed' : !postgresAvailable() ? 'PostgreSQL 15 is not installed' : undefined;
describe('web console on three replicas sharing a PostgreSQL audit store', { skip: missing && !process.env['CI'] ? missing : false }, () => {
  let pg: TestPostgres | undefined;
  let env: BrokerEnv | undefined;
  let idp: TestProvider | undefined;
  let browser: TestBrowser | undefined;
  let brokers: BrokerProcess[] = [];
  let store = '';
  let webhookToken = '';
  let context: BrowserContext;
  let page: Page;
  let taskId = '';
  let cookieValue = '';

  before(async () => {
    pg = await TestPostgres.start();
    const migrated = cli(['audit', 'migrate', pg.url('postgres'), '--grant', 'task_broker']);
    assert.equal(migrated.status, 0, migrated.stderr);
    const portA = await freePort();
    idp = await TestProvider.start([], { consoleRedirect: `http://127.0.0.1:${portA}/ui/callback` });
    env = await BrokerEnv.start({ policyText: policyFor(idp.issuer) });
    webhookToken = randomBytes(24).toString('base64url');
    const tokenFile = join(env.dir, 'webhook.token');
    writeFileSync(tokenFile, webhookToken + '\n', { mode: 0o600 });
    store = pg.url('task_broker');
    const args = ['--ui', '--audit-webhook-token-file', tokenFile];
    brokers = await Promise.all([`127.0.0.1:${portA}`, '127.0.0.1:0', '127.0.0.1:0'].map((listen) => env!.startBroker({ auditStore: store, listen, extraArgs: args })));
    browser = await launchBrowser();
    context = await browser.newContext();
    page = await context.newPage();
  });
  after(async () => {
    await context?.close().catch(() => undefined);
    await browser?.close();
    for (const b of brokers) await b.stop().catch(() => undefined);
    await env?.stop();
    await idp?.stop();
    await pg?.remove();
  });

  const replica = (i: number) => () => brokers[i]!;
  const [A, B, C] = [replica(0), replica(1), replica(2)];

  test('signed in at A over plain HTTP on loopback (cookie without Secure); B and C take the same cookie', async () => {
    await page.goto(`${A().url}/ui/`);
    assert.match(page.url(), /\/ui\/signin$/);
    await page.getByRole('link', { name: /Sign in at/ }).click();
    for (let step = 0; step < 6 && !page.url().startsWith(`${A().url}/ui/`); step++) {
      await page.waitForLoadState();
      if (page.url().startsWith(A().url)) break;
      const login = page.locator('input[name="login"]');
      if (await login.count()) {
        await login.fill('sre-bob');
        await page.locator('input[name="password"]').fill('any-password');
      }
      await Promise.all([page.waitForNavigation(), page.locator('button[type="submit"]').first().click()]);
    }
    await page.waitForURL(`${A().url}/ui/approvals`);
    const cookies = await context.cookies(A().url);
    const session = cookies.find((c) => c.name === 'broker-session');
    assert.ok(session, JSON.stringify(cookies.map((c) => c.name)));
    assert.equal(session.secure, false, 'plain HTTP on loopback: no Secure flag (the browser would drop it)');
    assert.equal(session.httpOnly, true);
    assert.equal(session.sameSite, 'Strict');
    cookieValue = session.value;

    // The same browser context at B: signed in (cookies are per host, not per port).
    await page.goto(`${B().url}/ui/approvals`);
    assert.equal(page.url(), `${B().url}/ui/approvals`);
    assert.equal(await page.getByRole('button', { name: 'Sign out' }).count(), 1);
    // An HTTP client with the cookie at C; without it, refused.
    const withCookie = await fetch(`${C().url}/ui/approvals/list`, { headers: { cookie: `broker-session=${cookieValue}` } });
    assert.equal(withCookie.status, 200);
    const without = await fetch(`${C().url}/ui/approvals/list`);
    assert.equal(without.status, 401);

    // The store holds only hashes of the cookie's id; the brokers' role may not update or delete sessions.
    const hash = createHash('sha256').update(cookieValue).digest();
    const rows = await pg!.query<{ n: string }>('postgres', `SELECT count(*) AS n FROM task_broker.console_sessions WHERE id = $1`, [hash]);
    assert.equal(rows.rows[0]!.n, '1');
    const plain = await pg!.query<{ n: string }>('postgres', `SELECT count(*) AS n FROM task_broker.console_sessions WHERE position($1 in caller::text || encode(id, 'escape')) > 0`, [cookieValue]);
    assert.equal(plain.rows[0]!.n, '0', 'the cookie value itself is nowhere in the table');
    for (const sql of ['DELETE FROM task_broker.console_signouts', 'UPDATE task_broker.console_sessions SET expires = now() + interval \'1 day\'']) {
      await assert.rejects(pg!.query('task_broker', sql), /permission denied/, sql);
    }
  });

  test("B shows the timeline of a task written via A and C (refusal, start, credential, requests, end), paged, and the chain's verdict", async () => {
    const alpha = await env!.agentToken('alpha');
    // Refused at C (a TTL above the template's maximum): belongs to the task started next with that name.
    const refused = await C().request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'shared', ttl: '5h', reason: 'too long' });
    assert.equal(refused.status, 400, JSON.stringify(refused.body));
    const start = await A().request('POST', '/v1/tasks', alpha, { template: 'read-pods', namespace: 'team-a', name: 'shared', ttl: '10m', reason: 'three replicas' });
    assert.equal(start.status, 201, JSON.stringify(start.body));
    taskId = start.body.id as string;
    await until('C to mint for the task', 15_000, async () => {
      const r = await C().request('POST', '/v1/tasks/shared/credential', alpha);
      return r.status === 200 ? r : undefined;
    });
    const at = new Date();
    // n microseconds after `at` (n < 1000): all within the millisecond the batch was made, before the task's end.
    const items = Array.from({ length: REQUESTS }, (_, n) => podEvent({ username: taskUser(env!.policy.broker.taskNamespace, taskId), name: `p${n}`, time: auditTime(at, n) }));
    const posted = await fetch(C().url + WEBHOOK, { method: 'POST', headers: { authorization: `Bearer ${webhookToken}`, 'content-type': 'application/json' }, body: JSON.stringify(eventList(items)) });
    assert.equal(posted.status, 200, await posted.text());
    const ended = await A().request('DELETE', '/v1/tasks/shared', alpha);
    assert.equal(ended.status, 200);

    await page.goto(`${B().url}/ui/tasks/${taskId}`);
    assert.match((await page.locator('.chain').textContent({ timeout: 10_000 }))!, /Audit chain verifies: \d+ records/);
    const first = (await page.locator('.timeline').textContent())!;
    const pager = (await page.locator('.pager').first().textContent())!;
    assert.match(pager, /page 1 of 2 \((\d+) events\)/);
    const total = Number(/\((\d+) events\)/.exec(pager)![1]);
    assert.ok(total >= REQUESTS + 4, `${total} events`);
    // In order: the refusal at C, the start at A, the credential at C, the first requests.
    const order = [/refused/, /task started/, /credential minted/, /ALLOW get pods\/p0 -n team-a/].map((re) => first.search(re));
    assert.ok(order.every((i, n) => i >= 0 && (n === 0 || i > order[n - 1]!)), `in order: ${JSON.stringify(order)} in ${first.slice(0, 2000)}`);
    await Promise.all([page.waitForURL(/offset=200/), page.getByRole('link', { name: 'Later' }).first().click()]);
    const second = (await page.locator('.timeline').textContent())!;
    assert.match(second, new RegExp(`ALLOW get pods/p${REQUESTS - 1} -n team-a`));
    assert.match(second, /task ended/);

    // The same story as `broker audit show --task` on the store.
    const shown = cli(['audit', 'show', '--task', taskId, '-o', 'json', store]);
    assert.equal(shown.status, 0, shown.stderr);
    const doc = JSON.parse(shown.stdout) as { records: Array<{ type: string }> };
    assert.equal(doc.records.length, total, 'as many events as the CLI shows');
    assert.equal(doc.records[0]!.type, 'task.refused');
  });

  test("a task page's story read through the store's indexes equals the whole table's, for every task of a table of 1- to 4-digit seqs (names reused, refusals and approval requests before starts, approval records naming only their request)", async () => {
    // A database of its own (the brokers' chain stays whole), migrated as the brokers' store is.
    await pg!.query('postgres', 'CREATE DATABASE synthetic');
    await migrate(pg!.url('postgres', 'synthetic'), ['task_broker']);
    const lines: string[] = [];
    const add = (rec: Record<string, unknown>) => lines.push(JSON.stringify({ seq: lines.length, time: new Date(Date.UTC(2026, 0, 1) + lines.length).toISOString(), actor: 'agent:alpha', ...rec }));
    const TASKS = 120;
    for (let i = 0; i < TASKS; i++) {
      const key = { agent: 'alpha', taskName: `n${i % 7}`, template: i % 3 === 0 ? 'other' : 'read-pods', namespace: 'team-a' };
      const ar = `ar-${String(i).padStart(12, '0')}`;
      if (i % 2 === 0) add({ type: 'task.refused', ...key });
      if (i % 4 !== 3) add({ type: 'approval.requested', ...key, details: { approvalRequest: ar } });
      add({ type: 'task.started', task: `t${i}`, ...key, details: { approvalId: ar } });
      for (let n = 0; n < 4; n++) add({ type: 'k8s.request', task: `t${i}`, agent: 'alpha', details: { verb: 'get' } });
      add({ type: 'approval.token_issued', details: { approvalRequest: ar } });
      if (i % 5 !== 4) add({ type: 'task.ended', task: `t${i}`, ...key });
    }
    const client = pg!.client('postgres', 'synthetic');
    await client.connect();
    try {
      await client.query(
        `INSERT INTO task_broker.audit (seq, time, type, task, line) SELECT (l::jsonb ->> 'seq')::bigint, (l::jsonb ->> 'time')::timestamptz, l::jsonb ->> 'type', l::jsonb ->> 'task', l FROM unnest($1::text[]) l`,
        [lines],
      );
    } finally {
      await client.end();
    }
    const whole = buildStories(lines.map((l) => JSON.parse(l) as AuditRecord)).stories;
    const db = new ConsoleDatabase(pg!.url('task_broker', 'synthetic'));
    try {
      const stories = new StoreStories(db);
      for (let i = 0; i < TASKS; i++) {
        const found = await stories.taskStory(`t${i}`);
        const expected = whole.find((s) => s.id === `t${i}`)!.records.map((r) => r.seq);
        assert.deepEqual(found?.story.records.map((r) => r.seq), expected, `t${i}`);
      }
      assert.equal(await stories.taskStory('t-none'), undefined);
    } finally {
      await db.close();
    }
  });

  test('signed out at B: A and C refuse the cookie at once; the sign-out is recorded', async () => {
    // A live-update stream open at C with this session: it ends once C sees the sign-out made at B.
    const stream = await fetch(`${C().url}/ui/events`, { headers: { cookie: `broker-session=${cookieValue}` } });
    assert.equal(stream.status, 200);
    const streamEnded = (async () => {
      const reader = stream.body!.getReader();
      while (!(await reader.read()).done);
      return Date.now();
    })();
    await page.goto(`${B().url}/ui/approvals`);
    await Promise.all([page.waitForURL(/\/ui\/signin\?signedout/), page.getByRole('button', { name: 'Sign out' }).click()]);
    const signedOut = Date.now();
    for (const replica of [A(), C(), B()]) {
      const r = await fetch(`${replica.url}/ui/approvals/list`, { headers: { cookie: `broker-session=${cookieValue}` } });
      assert.equal(r.status, 401, replica.url);
    }
    // The browser (its cookie cleared by B, so sent again by hand) is sent to sign in at A.
    await context.addCookies([{ name: 'broker-session', value: cookieValue, domain: '127.0.0.1', path: '/', httpOnly: true, sameSite: 'Strict' }]);
    await page.goto(`${A().url}/ui/tasks`);
    assert.match(page.url(), /\/ui\/signin$/);
    const endedAt = await Promise.race([streamEnded, new Promise<undefined>((done) => setTimeout(() => done(undefined), 5000))]);
    assert.ok(endedAt !== undefined, "C's live-update stream still open 5 s after the sign-out at B");
    assert.ok(endedAt - signedOut < 5000);
    const out = await pg!.query<{ line: string }>('postgres', `SELECT line FROM task_broker.audit WHERE type = 'console.signed_out'`);
    assert.equal(out.rows.length, 1);
    assert.equal(JSON.parse(out.rows[0]!.line).actor, `user:${idp!.issuer}#sre-bob`);
  });
});
