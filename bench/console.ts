/**
 * The web console's task page for a task with 10 000 recorded API requests (issue 17): the time to
 * the page's first content (First Contentful Paint, measured in the browser: Debian's chromium driven
 * by playwright-core), against the same page for a task with 10 requests in the same log (baseline,
 * same run). The log is a real hash-chained audit log (AuditLog) holding both tasks and 10 000
 * records of other tasks; the console is the real plugin (src/console/plugin.ts) in a fastify server,
 * its cluster-facing services replaced by empty ones (no task store, no history: the page reads the
 * audit log only) and the session made directly (no identity provider).
 *
 *   bin/bench console [--requests 10000] [--rounds 7]
 *
 * The first load (cold) also verifies the whole chain once; later loads verify only what was
 * appended since. Reported: cold, then the median of the warm rounds, each task alternately.
 */
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Fastify from 'fastify';
import { AuditLog } from '../src/audit/log.ts';
import { registerConsole, sessionCookie, type ConsoleDeps } from '../src/console/plugin.ts';
import { SessionStore } from '../src/console/session.ts';
import type { Policy } from '../src/policy/types.ts';
import { launchBrowser } from '../test/helpers/browser.ts';

const arg = (name: string, fallback: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i === -1 ? fallback : Number(process.argv[i + 1]);
};
const REQUESTS = arg('requests', 10_000);
const ROUNDS = arg('rounds', 7);
const BIG = 'bench10kreqs';
const SMALL = 'bench10reqs';

async function writeLog(path: string): Promise<AuditLog> {
  const log = await AuditLog.open(path, { lockCommand: 'bench console' });
  const base = { agent: 'alpha', template: 'read-pods', namespace: 'shop' };
  const t0 = Date.parse('2026-01-01T00:00:00Z');
  const request = (task: string, i: number) => ({
    ...base,
    type: 'k8s.request' as const,
    actor: 'agent:alpha',
    task,
    outcome: i % 10 === 0 ? ('denied' as const) : ('allowed' as const),
    ...(i % 10 === 0 ? { reason: 'RBAC: forbidden' } : {}),
    details: {
      verb: i % 3 === 0 ? 'list' : 'get',
      resource: 'pods',
      name: `web-${i % 50}`,
      namespace: 'shop',
      requestURI: `/api/v1/namespaces/shop/pods/web-${i % 50}`,
      code: i % 10 === 0 ? 403 : 200,
      requestReceivedTimestamp: new Date(t0 + i * 10).toISOString(),
      kubectlSession: `s-${Math.floor(i / 5)}`,
      kubectlCommand: 'kubectl get',
      via: 'proxy',
    },
  });
  for (const [task, n] of [
    [BIG, REQUESTS],
    [SMALL, 10],
  ] as const) {
    await log.append({ ...base, type: 'task.started', actor: 'agent:alpha', task, taskName: task, outcome: 'ok' });
    for (let i = 0; i < n; i += 500) await Promise.all(Array.from({ length: Math.min(500, n - i) }, (_, k) => log.append(request(task, i + k))));
    // Noise: other tasks' records between and after.
    for (let i = 0; i < REQUESTS / 2; i += 500) await Promise.all(Array.from({ length: 500 }, (_, k) => log.append(request(`other${i % 7}`, i + k))));
  }
  return log;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'tb-bench-console-'));
  const path = join(dir, 'audit.jsonl');
  const app = Fastify();
  let browser: Awaited<ReturnType<typeof launchBrowser>> | undefined;
  let log: AuditLog | undefined;
  try {
    log = await writeLog(path);
    const sessions = new SessionStore();
    let origin = '';
    const deps = {
      policy: () => ({ issuers: [], agents: [], templates: [] }) as unknown as Policy,
      approvals: () => ({ groupsOf: () => ['sre'] }),
      tasks: () => ({ history: { list: async () => [] } }),
      store: { list: () => [], get: () => undefined },
      audit: { append: async () => undefined },
      auditLogPath: path,
      origin: () => origin,
      secure: false,
      sessions,
    } as unknown as ConsoleDeps;
    registerConsole(app, deps);
    origin = await app.listen({ host: '127.0.0.1', port: 0 });
    const session = sessions.create({ agent: '', subject: 'bench#reviewer', method: 'oidc', principal: 'person:reviewer' }, 'bench', 3600);
    browser = await launchBrowser();
    const ctx = await browser.newContext();
    await ctx.addCookies([{ name: sessionCookie(false).name, value: session.id, url: origin }]);
    const page = await ctx.newPage();
    const load = async (task: string) => {
      await page.goto(`${origin}/ui/tasks/${task}`, { waitUntil: 'load' });
      // The paint entry may be reported a frame after load: wait for it (buffered), up to 5 s.
      return page.evaluate(
        () =>
          new Promise<{ ttfb: number; fcp: number; bytes: number; items: number }>((done) => {
            const w = globalThis as any; // the page's globals (no DOM types here)
            const nav = w.performance.getEntriesByType('navigation')[0];
            const answer = (fcp: number) => done({ ttfb: nav.responseStart, fcp, bytes: nav.transferSize, items: w.document.querySelectorAll('.timeline li').length });
            const timer = setTimeout(() => answer(Number.NaN), 5000);
            new w.PerformanceObserver((list: any) => {
              const e = list.getEntriesByName('first-contentful-paint')[0];
              if (e) {
                clearTimeout(timer);
                answer(e.startTime);
              }
            }).observe({ type: 'paint', buffered: true });
          }),
      );
    };
    const cold = await load(BIG);
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const mb = (statSync(path).size / 1e6).toFixed(1);
    console.log(`audit log: ${mb} MB, ${REQUESTS} requests of the measured task among ${REQUESTS * 2 + 12} records`);
    console.log(`cold (the first load after start; the first pass over the chain runs meanwhile): first contentful paint ${cold.fcp.toFixed(0)} ms, first byte ${cold.ttfb.toFixed(0)} ms`);
    let worst = cold.fcp;
    // Growing: a record is appended before each load, so every load reads the log again (the usual case while tasks run).
    for (const growing of [true, false]) {
      const big: number[] = [];
      const small: number[] = [];
      const ttfb: number[] = [];
      let shown = { big: 0, small: 0, bytes: 0 };
      for (let r = 0; r < ROUNDS; r++) {
        const grow = () => (growing ? log!.append({ type: 'k8s.request', actor: 'agent:beta', agent: 'beta', task: 'othergrow', outcome: 'allowed', details: { verb: 'get', resource: 'pods' } }) : undefined);
        await grow();
        const b = await load(BIG);
        await grow();
        const s = await load(SMALL);
        big.push(b.fcp);
        small.push(s.fcp);
        ttfb.push(b.ttfb);
        shown = { big: b.items, small: s.items, bytes: b.bytes };
      }
      worst = Math.max(worst, median(big));
      console.log(
        `${growing ? 'log growing (read again each load)' : 'log unchanged (the story kept)'}: ${REQUESTS} requests: first contentful paint median ${median(big).toFixed(0)} ms (first byte ${median(ttfb).toFixed(0)} ms; ${shown.big} timeline items on the first page, ${(shown.bytes / 1024).toFixed(0)} KiB); ` +
          `baseline, a task of 10 requests in the same log: ${median(small).toFixed(0)} ms (${shown.small} items); ratio ${(median(big) / median(small)).toFixed(2)}x`,
      );
    }
    console.log(`goal: first content <= 1000 ms: ${worst <= 1000 ? 'met' : 'NOT met'} (worst: ${worst.toFixed(0)} ms)`);
  } finally {
    await browser?.close();
    await app.close();
    await log?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
