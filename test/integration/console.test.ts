/**
 * The web console (`broker serve --ui`, issue 17) in a real browser (Debian's chromium driven by
 * playwright-core), against real parts: a certified OpenID provider on loopback where people sign in,
 * the whole local cluster (a node whose containers are local processes, for an exec session), a
 * broker process over TLS with its Kubernetes API proxy (which records the exec session), and the
 * `broker` CLI as the agent.
 *
 * One story in order: an agent asks for a gated task (2 approvals needed) with a reason full of markup;
 * it appears live on the approvers' page; the requester, signed in, cannot approve it; an approver
 * whose very name holds markup, a bidi override and a terminal escape approves first (rendered inert
 * everywhere), a second one next, by keyboard; the agent's `task start --wait` proceeds; the audit log
 * names both; the agent runs an exec session through the proxy and the task page replays it. Then the
 * security checks (CSRF, origin, cookie flags, CSP, sign-out) and screenshots of every page at 1280
 * and 375 px (kept in $TEST_OUTPUT_DIR/console, else .cache/test-output/console; with CONSOLE_SCREENSHOTS_TO_DOCS=1
 * they also refresh docs/images/console/).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import { freePort, kubectlPath } from '../../src/cluster/local-cluster.ts';
import { CSP } from '../../src/console/plugin.ts';
import { BrokerEnv, type BrokerProcess } from '../helpers/broker.ts';
import { browserAvailable, launchBrowser, type TestBrowser } from '../helpers/browser.ts';
import { run, type RunResult } from '../helpers/kube.ts';
import { BROKER_RESOURCE, CONSOLE_CLIENT_ID, TestProvider } from '../helpers/oidc-provider.ts';
import { until } from '../helpers/wait.ts';

const ROOT = new URL('../..', import.meta.url).pathname;
const BROKER = join(ROOT, 'bin/broker');
/** Markup, a closing script tag and quotes: must show as typed, never act. (The API refuses control characters in reasons.) */
const REASON = `incident <img src=x onerror="alert('reason')"> </script><script>alert(2)</script> & "quotes" 'too'`;
/** An approver's account id at the provider (its `sub`): markup, a bidi override, a terminal escape. */
const EVIL = `sre-<img src=x onerror=alert('name')></script>\u202eevil\u001b[31m`;
const EVIL_SHOWN = `sre-<img src=x onerror=alert('name')></script>\\u202eevil\\x1b[31m`;

function policyFor(issuer: string): string {
  return `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
  tokenTTL: 10m
  identityAudience: task-broker
agents:
  - name: alpha
    identities:
      - serviceAccount: agents/alpha
      - oidc: { issuer: "${issuer}", subject: dev-alpha }
templates:
  - name: read-pods
    namespaces: [shop]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
    ttl: { default: 15m, max: 1h }
    agents: [alpha]
  - name: debug-shop
    description: exec into the shop's pods
    namespaces: [shop]
    rules:
      - { apiGroups: [""], resources: [pods], verbs: [get, list] }
      - { apiGroups: [""], resources: [pods/exec], verbs: [get, create] }
      - { apiGroups: [""], resources: [configmaps], verbs: [get] }
    ttl: { default: 20m, max: 30m }
    agents: [alpha]
    approval: { approvers: [sre], required: 2 }
issuers:
  - issuer: ${issuer}
    audience: [${CONSOLE_CLIENT_ID}, ${BROKER_RESOURCE}]
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

// In CI (.ci/run sets CI) a missing chromium fails the test rather than skipping it.
describe('web console (broker serve --ui)', { skip: !browserAvailable() && !process.env['CI'] ? 'chromium is not installed (apt-get install chromium; .ci/run installs it)' : false }, () => {
  let idp: TestProvider;
  let env: BrokerEnv;
  let broker: BrokerProcess;
  let browser: TestBrowser;
  let agentEnv: NodeJS.ProcessEnv;
  let shots: string;
  const contexts: BrowserContext[] = [];
  /** Signed-in pages: the requester (agent alpha's OIDC identity), two approvers. */
  const pages: Record<'requester' | 'bob' | 'evil', Page> = {} as never;
  /** What each page saw that must never happen. */
  const incidents: string[] = [];
  let brokerOrigin = '';
  let requestId = '';
  let taskId = '';
  let agentStart: Promise<RunResult>;

  before(async () => {
    // The broker serves TLS (as in production; kubectl sends the proxy its session token over https only) on a port chosen first: the provider registers its redirect.
    const port = await freePort();
    idp = await TestProvider.start([], { consoleRedirect: `https://127.0.0.1:${port}/ui/callback` });
    env = await BrokerEnv.start({ policyText: policyFor(idp.issuer), namespaces: ['shop'], cluster: { full: true } });
    broker = await env.startBroker({ listen: `127.0.0.1:${port}`, tls: env.cluster.servingCert, extraArgs: ['--ui', '--proxy-listen', '127.0.0.1:0'] });
    brokerOrigin = new URL(broker.url).origin;
    agentEnv = {
      PATH: `${join(ROOT, '.node/node_modules/node/bin')}:${process.env['PATH']}`,
      HOME: env.dir,
      NO_COLOR: '1',
      BROKER_URL: broker.url,
      BROKER_CA: env.cluster.caFile,
      BROKER_IDENTITY_TOKEN: await env.agentToken('alpha'),
    };
    // Kept as test output (not a temporary directory): $TEST_OUTPUT_DIR/console, else the git-ignored .cache/test-output/console.
    shots = join(process.env['TEST_OUTPUT_DIR'] ?? join(ROOT, '.cache/test-output'), 'console');
    mkdirSync(shots, { recursive: true });
    browser = await launchBrowser();
    // A pod to exec into, as the administrator.
    const manifest = join(env.dir, 'shell.json');
    writeFileSync(
      manifest,
      JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'shell', namespace: 'shop' }, spec: { restartPolicy: 'Never', containers: [{ name: 'shell', image: 'local', command: ['sh', '-c', 'sleep 3600'] }] } }),
    );
    const admin = (...args: string[]) => run(kubectlPath(), ['--kubeconfig', env.cluster.kubeconfig, ...args]);
    await until("the namespace's default ServiceAccount", 30_000, async () => (await admin('get', 'serviceaccount', 'default', '-n', 'shop')).code === 0);
    const applied = await admin('apply', '-f', manifest);
    assert.equal(applied.code, 0, applied.stderr);
    await until('pod shell Running', 60_000, async () => (await admin('get', 'pod', 'shell', '-n', 'shop', '-o', 'jsonpath={.status.phase}')).stdout === 'Running');
    for (const [who, account] of [['requester', 'dev-alpha'], ['bob', 'sre-bob'], ['evil', EVIL]] as const) pages[who] = await signIn(account);
  });
  after(async () => {
    for (const c of contexts) await c.close().catch(() => undefined);
    await browser?.close();
    await broker?.stop();
    await env?.stop();
    await idp?.stop();
    console.log(`console screenshots: ${shots}`);
  });

  const cli = (args: string[]) => run(BROKER, args, agentEnv, 120_000);

  /** A browser context of its own, watched for dialogs, console errors, failed requests and any request to another origin than the broker's or the provider's. */
  async function newContext(width = 1280): Promise<BrowserContext> {
    const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width, height: 900 } });
    contexts.push(ctx);
    const allowed = new Set([brokerOrigin, idp.issuer]);
    ctx.on('page', (page) => watch(page));
    // The console's pages may reach only the broker (and navigate to the provider to sign in); the provider's own pages are its business (they ask for web fonts: refused here, there is no internet).
    ctx.on('request', (req) => {
      const target = new URL(req.url()).origin;
      const from = req.frame().url();
      if (from.startsWith(`${brokerOrigin}/`) && target !== brokerOrigin && !(req.isNavigationRequest() && target === idp.issuer)) incidents.push(`request to another origin: ${req.url()}`);
    });
    await ctx.route((url) => !allowed.has(url.origin), (route) => route.abort());
    return ctx;
  }
  function watch(page: Page): void {
    page.on('dialog', (d) => {
      incidents.push(`dialog: ${d.message()}`);
      void d.dismiss();
    });
    page.on('console', (m) => {
      // A refused request the test makes on purpose is logged as "Failed to load resource"; anything else (a CSP violation: injected markup parsed) is an incident.
      if (m.type() === 'error' && new URL(page.url()).origin === brokerOrigin && !/^Failed to load resource/.test(m.text())) incidents.push(`console error on ${page.url()}: ${m.text()}`);
    });
    page.on('pageerror', (e) => incidents.push(`page error: ${e.message}`));
  }

  /** Signs `account` in at the provider (its development login and consent pages), as a person would; returns the approvals page. */
  async function signIn(account: string, ctx?: BrowserContext): Promise<Page> {
    const context = ctx ?? (await newContext());
    const page = await context.newPage();
    await page.goto(`${broker.url}/ui/`);
    assert.match(page.url(), /\/ui\/signin$/);
    await page.getByRole('link', { name: /Sign in at/ }).click();
    for (let step = 0; step < 6 && !page.url().startsWith(`${brokerOrigin}/ui/`); step++) {
      await page.waitForLoadState();
      if (page.url().startsWith(brokerOrigin)) break;
      const login = page.locator('input[name="login"]');
      if (await login.count()) {
        await login.fill(account);
        await page.locator('input[name="password"]').fill('any-password');
      }
      await Promise.all([page.waitForNavigation(), page.locator('button[type="submit"]').first().click()]);
    }
    await page.waitForURL(`${brokerOrigin}/ui/approvals`);
    return page;
  }

  const card = (page: Page) => page.locator(`article#${requestId}`);

  test('signed in: the session cookie is HttpOnly, Secure, SameSite=Strict, short-lived; no page before sign-in', async () => {
    const cookies = await contexts[1]!.cookies(brokerOrigin);
    const session = cookies.find((c) => c.name === '__Host-broker-session');
    assert.ok(session, JSON.stringify(cookies.map((c) => c.name)));
    assert.equal(session.httpOnly, true);
    assert.equal(session.secure, true);
    assert.equal(session.sameSite, 'Strict');
    assert.equal(session.path, '/');
    const left = session.expires - Date.now() / 1000;
    assert.ok(left > 60 && left <= 15 * 60, `expires in ${left} s`);
    assert.equal(cookies.some((c) => c.name === 'broker-login'), false, 'the sign-in cookie is gone');
    // Signed out (a fresh context): every page sends to sign-in, every fragment answers 401.
    const stranger = await (await newContext()).newPage();
    await stranger.goto(`${broker.url}/ui/tasks`);
    assert.match(stranger.url(), /\/ui\/signin$/);
    const res = await stranger.request.get(`${broker.url}/ui/approvals/list`);
    assert.equal(res.status(), 401);
    // The empty state, before any request.
    await pages.bob.reload();
    await assert.doesNotReject(pages.bob.getByText('No approval request waits for you').waitFor());
    await screenshot(pages.bob, 'approvals-empty');
  });

  test('a gated request appears live; its requester cannot approve it; approvers do, N of M; the agent proceeds; the log names them', async () => {
    const navigations: string[] = [];
    pages.bob.on('framenavigated', (f) => f === pages.bob.mainFrame() && navigations.push(f.url()));
    agentStart = cli(['task', 'start', 'debug-shop', '--namespace', 'shop', '--reason', REASON, '--wait', '--timeout', '2m', '-o', 'json']);
    // Live: no reload.
    await pages.bob.locator('article.approval').waitFor({ timeout: 20_000 });
    assert.deepEqual(navigations, [], 'the request appeared without a reload');
    requestId = (await pages.bob.locator('article.approval').getAttribute('id'))!;
    assert.match(requestId, /^ar-[0-9a-f]{12}$/);
    const bobCard = card(pages.bob);
    assert.equal(await bobCard.locator('.reason').textContent(), REASON, 'the reason as typed');
    assert.match((await bobCard.locator('.grants').textContent())!, /create on pods\/exec in shop/);
    assert.match((await bobCard.locator('.gated').textContent())!, /Gated: create pods\/exec: can run commands inside a running container/);
    assert.match((await bobCard.textContent())!, /0 of 2/);

    // The requester, signed in as the agent's OIDC identity: sees it as its own, no buttons; a forged post is refused by the approval service.
    await pages.requester.reload();
    const own = card(pages.requester);
    await own.waitFor();
    assert.match((await own.locator('.cannot').textContent())!, /your own request/);
    assert.equal(await own.getByRole('button', { name: 'Approve' }).count(), 0);
    const forged = await postForm(pages.requester, `/ui/approvals/${requestId}/decide`, { decision: 'approve' });
    assert.equal(forged.status, 403, forged.text);
    assert.match(forged.text, /who requested .* and cannot decide it/);

    // The first approver (a name full of markup): 1 of 2, still pending.
    await pages.evil.reload();
    await card(pages.evil).getByLabel(/Comment/).fill('looks fine <b>bold</b>');
    await Promise.all([pages.evil.waitForURL(/done=approve/), card(pages.evil).getByRole('button', { name: 'Approve' }).click()]);
    // bob sees the count change live, and who approved, inert.
    await until('1 of 2 on bob\'s page', 15_000, async () => /1 of 2/.test((await card(pages.bob).textContent()) ?? ''));
    const approvals = (await card(pages.bob).locator('dd').nth(3).textContent())!;
    assert.ok(approvals.includes(`${idp.issuer}#${EVIL_SHOWN}`), approvals);
    assert.ok(approvals.includes('looks fine <b>bold</b>'), approvals);
    await screenshot(pages.bob, 'approvals');
    await screenshotAt375('/ui/approvals', 'approvals', pages.bob.context());

    // bob approves by keyboard alone: the comment, Tab to Approve, Enter.
    await card(pages.bob).getByLabel(/Comment/).focus();
    await pages.bob.keyboard.type('on call, ok');
    await pages.bob.keyboard.press('Tab');
    // (globalThis as any): the page's globals; the tests' TypeScript has no DOM types.
    assert.equal(await pages.bob.evaluate(() => (globalThis as any).document.activeElement?.textContent), 'Approve');
    await Promise.all([pages.bob.waitForURL(/done=approve/), pages.bob.keyboard.press('Enter')]);

    const started = await agentStart;
    assert.equal(started.code, 0, started.stderr);
    taskId = (JSON.parse(started.stdout) as { id: string }).id;
    const records = broker.auditRecords();
    const granted = records.filter((r) => r.type === 'approval.granted' && r.details.approvalRequest === requestId);
    assert.deepEqual(
      granted.map((r) => r.details.approver),
      [`${idp.issuer}#${EVIL}`, `${idp.issuer}#sre-bob`],
    );
    assert.equal(granted[1]!.reason, 'on call, ok');
    // One approval token: the one the agent's --wait collected; the console's approval signs none.
    assert.equal(records.filter((r) => r.type === 'approval.token_issued' && r.details.approvalRequest === requestId).length, 1);
    assert.ok(records.some((r) => r.type === 'task.started' && r.task === taskId));
    assert.ok(records.some((r) => r.type === 'console.signed_in' && r.actor === `user:${idp.issuer}#sre-bob`));
    // Gone from the pending list once decided.
    await pages.requester.reload();
    assert.equal(await card(pages.requester).count(), 0);
  });

  test('an exec session through the proxy: the task page shows the timeline, the chain verifies, the player replays it in order, inert', async () => {
    const kc = join(env.dir, 'agent.kubeconfig');
    const made = await cli(['kubeconfig', '--task', taskId, '--via', 'proxy', '-n', 'shop', '--output', kc]);
    assert.equal(made.code, 0, made.stderr);
    // Typed: two commands; back: their output, a terminal escape and a bidi override among it.
    const exec = await typed(kc, [
      ['echo first-$((20+1))\n', /first-21/],
      ['printf "\\033[2J\\033[31mred\\342\\200\\256desrever\\n"\n', /desrever/],
      ['echo second >&2\n', /second/],
      ['exit 0\n', undefined],
    ]);
    assert.equal(exec.code, 0, exec.stderr);
    // A denied request too, grouped under its kubectl command.
    const denied = await run(kubectlPath(), ['--kubeconfig', kc, 'delete', 'pod', 'shell'], agentEnv);
    assert.notEqual(denied.code, 0);
    await until('the exec session\'s end record', 15_000, async () =>
      broker.auditRecords().some((r) => r.task === taskId && r.details?.subresource === 'exec' && r.details?.phase === 'end'),
    );

    const page = pages.bob;
    await page.goto(`${broker.url}/ui/tasks/${taskId}`);
    assert.match((await page.locator('.chain').textContent())!, /Audit chain verifies: \d+ records/);
    const timeline = (await page.locator('.timeline').textContent())!;
    assert.match(timeline, /approval granted/);
    assert.match(timeline, /\$ kubectl exec/);
    assert.match(timeline, /\$ kubectl delete/);
    assert.match(timeline, /DENY delete pods\/shell -n shop/);
    const player = page.locator('.player').first();
    await player.getByLabel('Speed').selectOption('0');
    await player.getByRole('button', { name: /Replay exec session/ }).click();
    await until('the player to finish', 10_000, async () => (await player.getAttribute('data-state')) === 'done');
    const shown = (await player.locator('.term').textContent())!;
    const order = ['echo first-$((20+1))', 'first-21', 'printf', '␛[2J␛[31mred<U+202E>desrever', 'echo second', 'second', 'exit 0'].map((s) => shown.indexOf(s));
    assert.ok(order.every((i, n) => i >= 0 && (n === 0 || i > order[n - 1]!)), `in order: ${JSON.stringify(order)} in ${JSON.stringify(shown)}`);
    assert.equal(/[\u0000-\u0008\u000b-\u001f\u202e]/.test(shown), false, 'no control or bidi character reaches the page');
    await screenshot(page, 'task');
    await screenshotAt375(`/ui/tasks/${taskId}`, 'task', page.context());
  });

  test('tasks: listed and filtered; the agent ends its own task from the console; reviewers cannot', async () => {
    const page = pages.bob;
    await page.goto(`${broker.url}/ui/tasks`);
    const row = page.locator(`li.task[data-key="${taskId}"]`);
    await row.waitFor();
    assert.match((await row.textContent())!, /active/);
    await screenshot(page, 'tasks');
    await screenshotAt375('/ui/tasks', 'tasks', page.context());
    await page.getByLabel('Template').selectOption('read-pods');
    await Promise.all([page.waitForURL(/template=read-pods/), page.getByRole('button', { name: 'Filter' }).click()]);
    assert.match((await page.locator('#tasks').textContent())!, /No task matches these filters/);
    // A reviewer is not the task's agent: no button, and a forged post is refused by the task service.
    await page.goto(`${broker.url}/ui/tasks/${taskId}`);
    assert.equal(await page.getByRole('button', { name: 'End this task' }).count(), 0);
    const forged = await postForm(page, `/ui/tasks/${taskId}/end`, {});
    assert.notEqual(forged.status, 303);
    assert.ok(forged.status >= 400, forged.text);
    // The agent itself (its OIDC identity) may.
    const mine = pages.requester;
    await mine.goto(`${broker.url}/ui/tasks/${taskId}`);
    await Promise.all([mine.waitForNavigation(), mine.getByRole('button', { name: 'End this task' }).click()]);
    await mine.reload();
    assert.match((await mine.locator('.facts').textContent())!, /State\s*ended/);
    assert.ok(broker.auditRecords().some((r) => r.type === 'task.ended' && r.task === taskId && r.actor === 'agent:alpha'));
  });

  test('security: no CSRF token, another user\'s token, another origin: refused; every page has the CSP; signed out is refused', async () => {
    const bob = pages.bob;
    await bob.goto(`${broker.url}/ui/approvals`);
    // A request to decide: made by the agent, pending, so a refusal is the console's and not the service's.
    const waiting = cli(['task', 'start', 'debug-shop', '--namespace', 'shop', '--name', 'second', '--reason', 'csrf check', '-o', 'json']);
    const refusedStart = await waiting;
    const second = /request (ar-[0-9a-f]{12})/.exec(refusedStart.stderr)?.[1];
    assert.ok(second, refusedStart.stderr);
    const url = `/ui/approvals/${second}/decide`;
    const none = await postForm(bob, url, { decision: 'approve' }, { csrf: '' });
    assert.equal(none.status, 403);
    assert.match(none.text, /CSRF token missing or wrong/);
    const evilToken = await pages.evil.locator('meta[name="csrf-token"]').getAttribute('content');
    const other = await postForm(bob, url, { decision: 'approve' }, { csrf: evilToken! });
    assert.equal(other.status, 403);
    // From another origin: the browser's own cross-site form post (its Origin header).
    const res = await bob.request.post(`${broker.url}${url}`, {
      form: { decision: 'approve', csrf: (await bob.locator('meta[name="csrf-token"]').getAttribute('content'))! },
      headers: { origin: 'https://attacker.example' },
      maxRedirects: 0,
    });
    assert.equal(res.status(), 403);
    assert.match(await res.text(), /came from another site/);
    const stillPending = await bob.request.get(`${broker.url}/ui/approvals/list`);
    assert.ok((await stillPending.text()).includes(`id="${second}"`), 'nothing was decided');
    assert.equal(broker.auditRecords().filter((r) => r.type === 'approval.granted' && r.details.approvalRequest === second).length, 0);

    // Every page's CSP and headers.
    for (const path of ['/ui/signin', '/ui/approvals', '/ui/tasks', `/ui/tasks/${taskId}`, '/ui/assets/console.js', '/ui/assets/console.css', '/ui/nothing-here']) {
      const r = await bob.request.get(`${broker.url}${path}`, { maxRedirects: 0 });
      assert.equal(r.headers()['content-security-policy'], CSP, path);
      assert.equal(r.headers()['x-content-type-options'], 'nosniff', path);
    }
    assert.match(CSP, /script-src 'self'/);
    assert.doesNotMatch(CSP, /unsafe-inline|unsafe-eval/);

    // Sign out: the old cookie, replayed, is refused.
    const cookie = (await bob.context().cookies(brokerOrigin)).find((c) => c.name === '__Host-broker-session')!;
    await Promise.all([bob.waitForURL(/\/ui\/signin\?signedout/), bob.getByRole('button', { name: 'Sign out' }).click()]);
    assert.match((await bob.locator('.flash').textContent())!, /signed out/);
    const replay = await newContext();
    await replay.addCookies([{ ...cookie }]);
    const again = await replay.request.get(`${broker.url}/ui/approvals/list`);
    assert.equal(again.status(), 401);
    const post = await replay.request.post(`${broker.url}${url}`, { form: { decision: 'approve', csrf: 'x' }, maxRedirects: 0 });
    assert.equal(post.status(), 401);
    assert.ok(broker.auditRecords().some((r) => r.type === 'console.signed_out' && r.actor === `user:${idp.issuer}#sre-bob`));
  });

  test('screenshots: sign-in page; no horizontal overflow at 375 px; nothing untoward happened on any page', async () => {
    const ctx = await newContext();
    const page = await ctx.newPage();
    await page.goto(`${broker.url}/ui/signin`);
    await screenshot(page, 'signin');
    await screenshotAt375('/ui/signin', 'signin', ctx);
    assert.deepEqual(incidents, []);
  });

  // -------------------------------------------------------------------------------------------

  /** A form post from the page itself (same origin), with its CSRF token unless `override` gives one. */
  async function postForm(page: Page, path: string, fields: Record<string, string>, override?: { csrf: string }): Promise<{ status: number; text: string }> {
    return page.evaluate(
      async ({ path, fields, override }) => {
        const csrf = override ? override.csrf : ((globalThis as any).document.querySelector('meta[name="csrf-token"]')?.getAttribute('content') ?? '');
        const res = await fetch(path, { method: 'POST', body: new URLSearchParams({ ...fields, ...(csrf ? { csrf } : {}) }), redirect: 'manual' });
        return { status: res.type === 'opaqueredirect' ? 303 : res.status, text: await res.text() };
      },
      { path, fields, override },
    );
  }

  /** kubectl exec -i ... sh, typing each line once the answer to the one before has come back. */
  function typed(kc: string, lines: Array<[string, RegExp | undefined]>): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return new Promise((done, fail) => {
      const child = spawn(kubectlPath(), ['--kubeconfig', kc, 'exec', '-i', 'shell', '--', 'sh'], { env: agentEnv, stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      let waiting: RegExp | undefined;
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        fail(new Error(`kubectl exec: stuck waiting for ${waiting}; stdout ${stdout}; stderr ${stderr}`));
      }, 60_000);
      const next = () => {
        while (lines.length > 0 && (waiting === undefined || waiting.test(stdout + stderr))) {
          const [line, answer] = lines.shift()!;
          child.stdin.write(line);
          if (lines.length === 0) child.stdin.end();
          waiting = answer;
          if (answer) return;
        }
      };
      child.stdout.on('data', (d: Buffer) => ((stdout += d.toString()), next()));
      child.stderr.on('data', (d: Buffer) => ((stderr += d.toString()), next()));
      child.on('close', (code) => {
        clearTimeout(timer);
        done({ code, stdout, stderr });
      });
      next();
    });
  }

  async function screenshot(page: Page, name: string): Promise<void> {
    const file = join(shots, `${name}-${page.viewportSize()!.width}.png`);
    await page.screenshot({ path: file, fullPage: true });
    if (process.env['CONSOLE_SCREENSHOTS_TO_DOCS'] === '1') copyFileSync(file, join(ROOT, 'docs/images/console', `${name}-${page.viewportSize()!.width}.png`));
  }

  /** The same page at 375 px wide (a phone), in the same session: no horizontal overflow. */
  async function screenshotAt375(path: string, name: string, ctx: BrowserContext): Promise<void> {
    const page = await ctx.newPage();
    await page.setViewportSize({ width: 375, height: 800 });
    await page.goto(`${broker.url}${path}`);
    const overflow = await page.evaluate(() => { const w = (globalThis as any); return w.document.documentElement.scrollWidth - w.innerWidth; });
    assert.ok(overflow <= 0, `${path} overflows by ${overflow} px at 375 px`);
    await screenshot(page, name);
    await page.close();
  }
});
