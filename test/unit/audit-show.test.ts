/**
 * `broker audit show`: a task's story from a log written by the real AuditLog, and the command run
 * as a child process (bin/broker when dist/ is built from these sources, else src/cli/main.ts).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { AuditLog } from '../../src/audit/log.ts';
import type { AuditEventInput } from '../../src/audit/types.ts';
import { recordingFrames } from '../../src/audit/recordings.ts';
import { eventLine, formatSelection, printable, readAuditFile, requestLine, select } from '../../src/audit/show.ts';

const ROOT = new URL('../..', import.meta.url).pathname;

/** bin/broker runs dist/: use it when dist/ holds this show command, else the sources. */
function cli(): [string, string[]] {
  const built = (src: string, out: string) => existsSync(join(ROOT, out)) && statSync(join(ROOT, out)).mtimeMs >= statSync(join(ROOT, src)).mtimeMs;
  return built('src/audit/show.ts', 'dist/audit/show.js') && built('src/cli/audit.ts', 'dist/cli/audit.js')
    ? [join(ROOT, 'bin/broker'), []]
    : [process.execPath, [join(ROOT, 'src/cli/main.ts')]];
}

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function broker(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Result> {
  const [cmd, pre] = cli();
  return new Promise((done, fail) => {
    const child = spawn(cmd, [...pre, ...args], { env: { PATH: process.env['PATH'], HOME: process.env['HOME'], ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString('latin1')));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', fail);
    child.on('close', (code) => done({ code, stdout, stderr }));
  });
}

/** Runs the command on a pseudo-terminal (script(1)), as a person's shell would. */
function onTerminal(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Result> {
  const [cmd, pre] = cli();
  const quote = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;
  const line = [cmd, ...pre, ...args].map(quote).join(' ');
  return new Promise((done, fail) => {
    const child = spawn('script', ['-q', '-e', '-c', line, '/dev/null'], {
      env: { PATH: process.env['PATH'], HOME: process.env['HOME'], TERM: 'xterm', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString('latin1')));
    child.on('error', fail);
    child.on('close', (code) => done({ code, stdout, stderr: '' }));
  });
}

const T0 = Date.parse('2025-05-01T09:30:00.000Z');
const at = (s: number) => new Date(T0 + s * 1000);
const iso = (s: number) => at(s).toISOString();
/** The API server's timestamps carry microseconds. */
const micro = (s: number, us: number) => iso(s).replace('Z', `${String(us).padStart(3, '0')}Z`);

function request(over: {
  task: string;
  agent: string;
  taskName: string;
  template: string;
  namespace: string;
  outcome: 'allowed' | 'denied' | 'error';
  reason?: string;
  jti: string;
  verb: string;
  resource: string;
  name?: string;
  subresource?: string;
  code: number;
  received: string;
}): AuditEventInput {
  return {
    type: 'k8s.request',
    actor: `agent:${over.agent}`,
    agent: over.agent,
    task: over.task,
    taskName: over.taskName,
    template: over.template,
    namespace: over.namespace,
    outcome: over.outcome,
    ...(over.reason === undefined ? {} : { reason: over.reason }),
    jti: over.jti,
    details: {
      auditID: `aud-${over.verb}-${over.received}`,
      verb: over.verb,
      resource: over.resource,
      subresource: over.subresource ?? '',
      apiGroup: '',
      apiVersion: 'v1',
      name: over.name ?? '',
      requestURI: `/api/v1/namespaces/${over.namespace}/${over.resource}${over.name ? `/${over.name}` : ''}`,
      userAgent: 'kubectl/v1.36.3 (linux/amd64) kubernetes/abcdef',
      sourceIPs: ['127.0.0.1'],
      code: over.code,
      decision: over.outcome === 'denied' ? 'forbid' : 'allow',
      stage: 'ResponseComplete',
      requestReceivedTimestamp: over.received,
      stageTimestamp: over.received,
      username: `system:serviceaccount:task-broker:task-${over.task}`,
    },
  };
}

const EVIL = 'RBAC: \u001b[31mfake\u0000 \u009b2J done';

/**
 * A log as the broker and the webhook write it: two tasks named read-pods (two agents), a gated task
 * that waited for an approval, API requests appended a batch late and out of order, a failed login.
 */
async function writeLog(path: string): Promise<void> {
  let clock = at(0);
  const log = await AuditLog.open(path, { now: () => clock, checkIntervalMs: 0 });
  const put = async (s: number, e: AuditEventInput) => {
    clock = at(s);
    await log.append(e);
  };
  const t1 = { agent: 'alpha', task: 't-aaa111', taskName: 'read-pods', template: 'read-pods', namespace: 'web' };
  await put(1, { ...t1, type: 'task.requested', actor: 'agent:alpha', outcome: 'ok', reason: 'look at the pods', expiresAt: iso(601) });
  await put(2, { ...t1, type: 'task.started', actor: 'agent:alpha', outcome: 'allowed', expiresAt: iso(601) });
  await put(3, { ...t1, type: 'credential.minted', actor: 'agent:alpha', outcome: 'allowed', jti: 'jti-1', expiresAt: iso(603) });
  await put(4, { type: 'auth.failed', actor: 'anonymous', outcome: 'denied', reason: 'unauthenticated: no bearer token' });
  await put(6, { type: 'credential.served', actor: 'agent:alpha', agent: 'alpha', task: 't-aaa111', outcome: 'allowed', jti: 'jti-1', expiresAt: iso(603) });
  await put(9, { ...t1, type: 'task.ended', actor: 'agent:alpha', outcome: 'ok' });
  // The webhook's batch arrives after the task ended, and not in the order the requests were made.
  const r = { ...t1, jti: 'jti-1' };
  await put(10, request({ ...r, outcome: 'denied', reason: EVIL, verb: 'delete', resource: 'pods', name: 'web-1', code: 403, received: micro(7, 250), namespace: 'prod' }));
  await put(10, request({ ...r, outcome: 'allowed', verb: 'get', resource: 'pods', code: 200, received: micro(3, 500) }));
  await put(10, request({ ...r, outcome: 'allowed', verb: 'get', resource: 'pods', name: 'web-1', code: 200, received: micro(3, 900) }));
  await put(10, request({ ...r, outcome: 'allowed', verb: 'get', resource: 'pods', name: 'web-1', subresource: 'log', code: 200, received: micro(6, 100) }));

  // The same task name, another agent.
  const t2 = { agent: 'beta', task: 't-bbb222', taskName: 'read-pods', template: 'read-pods', namespace: 'web' };
  await put(20, { ...t2, type: 'task.requested', actor: 'agent:beta', outcome: 'ok', expiresAt: iso(620) });
  await put(21, { ...t2, type: 'task.started', actor: 'agent:beta', outcome: 'allowed', expiresAt: iso(620) });
  await put(22, { ...t2, type: 'credential.minted', actor: 'agent:beta', outcome: 'allowed', jti: 'jti-2', expiresAt: iso(622) });
  await put(24, request({ ...t2, jti: 'jti-2', outcome: 'allowed', verb: 'list', resource: 'pods', code: 200, received: micro(23, 0) }));

  // A gated task: refused, approved by a person, then started with the approval.
  const g = { agent: 'alpha', taskName: 'debug', template: 'exec-pods', namespace: 'web' };
  await put(30, { ...g, type: 'task.refused', actor: 'agent:alpha', outcome: 'denied', reason: 'approval_required: template "exec-pods" is gated (request ar-000000000001)' });
  await put(30, { ...g, type: 'approval.requested', actor: 'agent:alpha', outcome: 'ok', details: { approvalRequest: 'ar-000000000001', required: 1, approvers: ['oncall'] } });
  await put(31, { type: 'approval.refused', actor: 'agent:alpha', outcome: 'denied', reason: 'forbidden: agents do not approve', details: { approvalRequest: 'ar-000000000001', decision: 'approve' } });
  await put(32, { ...g, type: 'approval.granted', actor: 'person:alice', outcome: 'ok', details: { approvalRequest: 'ar-000000000001', approver: 'alice', approvals: 1, required: 1, state: 'approved' } });
  await put(32, { agent: 'alpha', template: 'exec-pods', namespace: 'web', type: 'approval.token_issued', actor: 'system:broker', outcome: 'ok', jti: 'ap-1', details: { approvalRequest: 'ar-000000000001' } });
  await put(33, { ...g, type: 'approval.used', actor: 'agent:alpha', outcome: 'ok', jti: 'ap-1', details: { approvalRequest: 'ar-000000000001' } });
  const t3 = { ...g, task: 't-ccc333' };
  await put(33, { ...t3, type: 'task.requested', actor: 'agent:alpha', outcome: 'ok', expiresAt: iso(633) });
  await put(34, { ...t3, type: 'task.started', actor: 'agent:alpha', outcome: 'allowed', expiresAt: iso(633) });
  await put(40, { ...t3, type: 'task.expired', actor: 'system:sweeper', outcome: 'ok' });
  await log.close();
}

async function withLog(fn: (path: string, dir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'tb-show-'));
  try {
    const path = join(dir, 'audit.jsonl');
    await writeLog(path);
    await fn(path, dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('a task story is in time order: API requests by when the API server received them, before the end they preceded', async () => {
  await withLog(async (path) => {
    const { records, chain } = await readAuditFile(path);
    assert.equal(chain.ok, true);
    const sel = select(records, { task: 't-aaa111' });
    assert.equal(sel.stories.length, 1);
    const lines = sel.stories[0]!.records.map(eventLine);
    assert.deepEqual(lines.slice(0, 3), ['task requested: read-pods in web, until 2025-05-01T09:40:01.000Z, reason: look at the pods', 'task started, until 2025-05-01T09:40:01.000Z', 'credential minted jti jti-1 until 2025-05-01T09:40:03.000Z']);
    assert.deepEqual(lines.slice(3), [
      'ALLOW get pods -n web',
      'ALLOW get pods/web-1 -n web',
      'credential served jti jti-1 until 2025-05-01T09:40:03.000Z',
      'ALLOW get pods/web-1/log -n web',
      'DENY delete pods/web-1 -n prod (403: RBAC: \\x1b[31mfake\\x00 \\u009b2J done)',
      'task ended',
    ]);
    assert.deepEqual(sel.summary, { records: 9, requests: 4, denied: 1 });
    assert.equal(sel.other.length, 0, '--task shows nothing that is not about the task');
  });
});

test('the DENY line reads like the kubectl command, with the code and the authorization reason', () => {
  const base = { seq: 0, time: iso(0), actor: 'agent:a', agent: 'a', task: 't', namespace: 'prod', prev: '0'.repeat(64), hash: '0'.repeat(64) };
  const details = { verb: 'delete', resource: 'pods', name: 'web-1', subresource: '', apiGroup: '', code: 403, decision: 'forbid' };
  assert.equal(requestLine({ ...base, type: 'k8s.request', outcome: 'denied', reason: 'RBAC: no rule', details }), 'DENY delete pods/web-1 -n prod (403: RBAC: no rule)');
  assert.equal(requestLine({ ...base, type: 'k8s.request', outcome: 'denied', details }), 'DENY delete pods/web-1 -n prod (403: forbid)', 'the decision when the API server gives no reason');
  const deploy = { ...details, verb: 'list', resource: 'deployments', name: '', apiGroup: 'apps', code: 200 };
  assert.equal(requestLine({ ...base, type: 'k8s.request', outcome: 'allowed', details: deploy }), 'ALLOW list deployments.apps -n prod');
  assert.equal(requestLine({ ...base, type: 'k8s.request', outcome: 'allowed', details: { ...details, verb: 'get', code: 404 } }), 'ALLOW get pods/web-1 -n prod (404)');
  const { namespace: _ns, ...clusterScoped } = base;
  assert.equal(requestLine({ ...clusterScoped, type: 'k8s.request', outcome: 'allowed', details: { verb: 'get', resource: '', requestURI: '/version', code: 200 } }), 'ALLOW get /version');
});

test('printable escapes C0, DEL, C1, ESC sequences, separators and bidi overrides, and doubles backslashes', () => {
  assert.equal(printable('a\u001b[31mb\u0000c\u007fd\u009be\u0085f'), 'a\\x1b[31mb\\x00c\\x7fd\\u009be\\u0085f');
  assert.equal(printable('x\ny\rz\tw'), 'x\\x0ay\\x0dz\\x09w');
  assert.equal(printable('evil\u202eexe.txt\u2028'), 'evil\\u202eexe.txt\\u2028');
  assert.equal(printable('C:\\x1b'), 'C:\\\\x1b', 'a backslash cannot fake an escape');
  assert.equal(printable('pods/web-1 ünïcödé ok'), 'pods/web-1 ünïcödé ok');
});

test('--task NAME shows every task of that name with its id; --task ID one; --agent and --since narrow', async () => {
  await withLog(async (path) => {
    const byName = await broker(['audit', 'show', '--task', 'read-pods', path]);
    assert.equal(byName.code, 0, byName.stderr);
    assert.match(byName.stdout, /^task read-pods \(t-aaa111\): template read-pods, in web, agent alpha$/m);
    assert.match(byName.stdout, /^task read-pods \(t-bbb222\): template read-pods, in web, agent beta$/m);
    assert.ok(byName.stdout.indexOf('t-aaa111') < byName.stdout.indexOf('t-bbb222'), 'tasks in the order they began');
    assert.match(byName.stdout, /^ {2}4 requests, 1 denied$/m);
    assert.match(byName.stdout, /^ {2}1 request, 0 denied$/m);
    assert.match(byName.stdout, /^total: 2 tasks, 5 requests, 1 denied$/m);
    assert.doesNotMatch(byName.stdout, /auth failed|debug/);

    const byId = await broker(['audit', 'show', '--task', 't-bbb222', path]);
    assert.equal(byId.code, 0, byId.stderr);
    assert.doesNotMatch(byId.stdout, /t-aaa111/);
    assert.match(byId.stdout, /ALLOW list pods -n web/);

    const beta = await broker(['audit', 'show', '--task', 'read-pods', '--agent', 'beta', path]);
    assert.doesNotMatch(beta.stdout, /alpha/);
    assert.match(beta.stdout, /t-bbb222/);

    const since = await broker(['audit', 'show', '--task', 't-aaa111', '--since', iso(6), path]);
    assert.equal(since.code, 0, since.stderr);
    assert.doesNotMatch(since.stdout, /task requested|task started|ALLOW get pods -n web/);
    assert.match(since.stdout, /credential served[\s\S]*ALLOW get pods\/web-1\/log[\s\S]*DENY delete[\s\S]*task ended/);

    const none = await broker(['audit', 'show', '--task', 'nope', path]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no task with id or name "nope".*\[not_found\]/);
    const badSince = await broker(['audit', 'show', '--since', 'yesterday', path]);
    assert.equal(badSince.code, 2);
    assert.match(badSince.stderr, /\(--since\) \[invalid_argument\]/);
  });
});

test('a gated task: the refused start, the approval request, decisions and token, then the task, in one story', async () => {
  await withLog(async (path) => {
    const res = await broker(['audit', 'show', '--task', 't-ccc333', path]);
    assert.equal(res.code, 0, res.stderr);
    const lines = res.stdout.split('\n').filter((l) => l.startsWith('  2025')).map((l) => l.slice(28));
    assert.deepEqual(lines, [
      'task refused [denied]: approval_required: template "exec-pods" is gated (request ar-000000000001)',
      'approval requested ar-000000000001, needs 1',
      'approval refused ar-000000000001 by agent:alpha [denied]: forbidden: agents do not approve',
      'approval granted ar-000000000001 by person:alice, approver alice, 1 of 1',
      'approval token issued ar-000000000001 by system:broker',
      'approval used ar-000000000001',
      'task requested: exec-pods in web, until 2025-05-01T09:40:33.000Z',
      'task started, until 2025-05-01T09:40:33.000Z',
      'task expired by system:sweeper',
    ]);
    const all = await broker(['audit', 'show', path]);
    assert.match(all.stdout, /^not about a task:\n {2}\S+ {2}auth failed by anonymous \[denied\]: unauthenticated: no bearer token$/m);
    assert.match(all.stdout, /^total: 3 tasks, 5 requests, 1 denied$/m);
  });
});

test('agent text is escaped: no control character from the log reaches the output', async () => {
  await withLog(async (path) => {
    const res = await broker(['audit', 'show', '--task', 't-aaa111', path]);
    assert.equal(res.code, 0, res.stderr);
    assert.ok(res.stdout.includes('DENY delete pods/web-1 -n prod (403: RBAC: \\x1b[31mfake\\x00 \\u009b2J done)'), res.stdout);
    assert.doesNotMatch(res.stdout, /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/, 'no raw control byte (stdout read as latin1, so C1 shows too)');
    const json = await broker(['audit', 'show', '--task', 't-aaa111', '-o', 'json', path]);
    assert.doesNotMatch(json.stdout, /[\u0000-\u0009\u000b-\u001f\u007f-\u00ff]/, 'JSON output escapes them too');
  });
});

test('on a terminal denials are red; piped, or with NO_COLOR, nothing is coloured', async () => {
  await withLog(async (path) => {
    const tty = await onTerminal(['audit', 'show', '--task', 't-aaa111', path]);
    assert.equal(tty.code, 0, tty.stdout);
    assert.match(tty.stdout, /\x1b\[31mDENY delete pods\/web-1 -n prod \(403: RBAC: \\x1b\[31mfake\\x00 \\u009b2J done\)\x1b\[39m/);
    assert.match(tty.stdout, /\x1b\[31m4 requests, 1 denied\x1b\[39m/);
    assert.doesNotMatch(tty.stdout, /\x1b\[31mALLOW/);
    const noColor = await onTerminal(['audit', 'show', '--task', 't-aaa111', path], { NO_COLOR: '1' });
    assert.equal(noColor.code, 0);
    assert.match(noColor.stdout, /DENY delete/);
    assert.doesNotMatch(noColor.stdout, /\x1b/);
    const piped = await broker(['audit', 'show', '--task', 't-aaa111', path], { TERM: 'xterm' });
    assert.doesNotMatch(piped.stdout, /\x1b/);
  });
});

test('-o json is one document: the chain verdict, the tasks with their counts, the records, the summary', async () => {
  await withLog(async (path) => {
    const res = await broker(['audit', 'show', '--task', 'read-pods', '-o', 'json', path]);
    assert.equal(res.code, 0, res.stderr);
    const doc = JSON.parse(res.stdout) as { chain: { ok: boolean; records: number }; tasks: Array<Record<string, unknown>>; records: Array<Record<string, any>>; summary: unknown };
    assert.equal(doc.chain.ok, true);
    assert.equal(doc.chain.records, 23);
    assert.deepEqual(doc.tasks, [
      { id: 't-aaa111', name: 'read-pods', agent: 'alpha', template: 'read-pods', namespace: 'web', records: 9, requests: 4, denied: 1, leftBehind: [] },
      { id: 't-bbb222', name: 'read-pods', agent: 'beta', template: 'read-pods', namespace: 'web', records: 4, requests: 1, denied: 0, leftBehind: [] },
    ]);
    assert.deepEqual(doc.summary, { records: 13, requests: 5, denied: 1 });
    const requests = doc.records.filter((r) => r['type'] === 'k8s.request');
    assert.deepEqual(requests.map((r) => [r['agent'], r['jti'], r['details']['verb']]), [
      ['alpha', 'jti-1', 'get'],
      ['alpha', 'jti-1', 'get'],
      ['alpha', 'jti-1', 'get'],
      ['alpha', 'jti-1', 'delete'],
      ['beta', 'jti-2', 'list'],
    ]);
    assert.equal(requests[3]!['reason'], EVIL, 'the record as written, exactly');
  });
});

test('a tampered log: the records before the break are shown, then exit 1 naming the record', async () => {
  await withLog(async (path) => {
    const lines = readFileSync(path, 'utf8').split('\n');
    lines[7] = lines[7]!.replace('"outcome":"allowed"', '"outcome":"denied"'); // seq 7: the allowed `get pods -n web`
    writeFileSync(path, lines.join('\n'));
    const res = await broker(['audit', 'show', '--task', 't-aaa111', path]);
    assert.equal(res.code, 1);
    assert.match(res.stderr, /broken at line 8 \(seq 7\): hash does not match the record's contents.*\[audit_chain_broken\]/);
    assert.match(res.stdout, /DENY delete pods\/web-1/, 'the valid records before it');
    assert.doesNotMatch(res.stdout, /get pods -n web/, 'nothing from the altered record on');
    const json = await broker(['audit', 'show', '-o', 'json', path]);
    assert.equal(json.code, 1);
    const doc = JSON.parse(json.stdout) as { chain: { ok: boolean; line: number; seq: number } };
    assert.deepEqual([doc.chain.ok, doc.chain.line, doc.chain.seq], [false, 8, 7]);
    const cut = readFileSync(path, 'utf8');
    writeFileSync(path, cut.slice(0, -10));
    assert.match((await broker(['audit', 'show', path])).stderr, /broken at line 8/);
  });
});

test('--follow prints records as they are appended, with a header when the task changes, and stops on SIGINT', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tb-show-'));
  try {
    const path = join(dir, 'audit.jsonl');
    const log = await AuditLog.open(path, { checkIntervalMs: 0 });
    const t = { agent: 'alpha', task: 't-fff000', taskName: 'follow-me', template: 'read-pods', namespace: 'web' };
    await log.append({ ...t, type: 'task.started', actor: 'agent:alpha', outcome: 'allowed' });
    await log.append({ type: 'task.started', actor: 'agent:other', agent: 'other', task: 't-other', taskName: 'x', template: 'read-pods', namespace: 'web', outcome: 'allowed' });
    const [cmd, pre] = cli();
    const child = spawn(cmd, [...pre, 'audit', 'show', '--follow', '--task', 'follow-me', path], { env: { PATH: process.env['PATH'] }, stdio: ['ignore', 'pipe', 'pipe'] });
    after(() => child.kill('SIGKILL'));
    const closed = new Promise<number | null>((done) => child.on('close', done));
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    const waitFor = async (re: RegExp) => {
      for (let i = 0; i < 100 && !re.test(out); i++) await sleep(100);
      assert.match(out, re);
    };
    await waitFor(/task started/);
    assert.match(out, /^task follow-me \(t-fff000\): template read-pods, in web, agent alpha$/m);
    await log.append({ type: 'credential.served', actor: 'agent:alpha', agent: 'alpha', task: 't-fff000', outcome: 'allowed', jti: 'j-9' });
    await log.append(request({ ...t, jti: 'j-9', outcome: 'denied', reason: 'RBAC: nope', verb: 'delete', resource: 'pods', name: 'p', code: 403, received: new Date().toISOString(), namespace: 'prod' }));
    await log.append({ type: 'task.ended', actor: 'agent:other', agent: 'other', task: 't-other', outcome: 'ok' });
    await waitFor(/DENY delete pods\/p -n prod \(403: RBAC: nope\)/);
    assert.match(out, /credential served jti j-9/);
    assert.doesNotMatch(out, /t-other/, 'other tasks are not followed');
    child.kill('SIGINT');
    assert.equal(await closed, 0, err);
    assert.match(err, /1 request, 1 denied/);
    await log.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('--follow stops with exit 1 when the file it follows is cut', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tb-show-'));
  try {
    const path = join(dir, 'audit.jsonl');
    await writeLog(path);
    const [cmd, pre] = cli();
    const child = spawn(cmd, [...pre, 'audit', 'show', '--follow', path], { env: { PATH: process.env['PATH'] }, stdio: ['ignore', 'pipe', 'pipe'] });
    after(() => child.kill('SIGKILL'));
    const closed = new Promise<number | null>((done) => child.on('close', done));
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    for (let i = 0; i < 100 && !/task expired/.test(out); i++) await sleep(100);
    writeFileSync(path, readFileSync(path, 'utf8').split('\n').slice(0, 3).join('\n') + '\n');
    assert.equal(await closed, 1);
    assert.match(err, /got shorter.*\[audit_chain_broken\]/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('formatSelection without colour has no escape sequences', async () => {
  await withLog(async (path) => {
    const { records } = await readAuditFile(path);
    assert.doesNotMatch(formatSelection(select(records)), /\x1b/);
  });
});

test('a session recording read as frames: channels in order, no channel is stdout, resize and non-JSON lines left out, the end status', () => {
  const b64 = (t: string) => Buffer.from(t).toString('base64');
  const raw = Buffer.from(
    [
      JSON.stringify({ v: 1, session: 'header line' }),
      JSON.stringify({ t: 1, ch: 'stdin', b64: b64('ls\n') }),
      JSON.stringify({ t: 2, b64: b64('a b\n') }),
      JSON.stringify({ t: 3, ch: 'resize', b64: b64('{"Width":80}') }),
      'not json',
      JSON.stringify({ t: 4, ch: 'stderr', b64: b64('oops\n') }),
      JSON.stringify({ ch: 'error', b64: b64(JSON.stringify({ status: 'Failure', message: 'exit code 2' })) }),
      '',
    ].join('\n'),
  );
  assert.deepEqual(recordingFrames(raw), [
    { t: 1, channel: 'stdin', data: 'ls\n' },
    { t: 2, channel: 'stdout', data: 'a b\n' },
    { t: 4, channel: 'stderr', data: 'oops\n' },
    { t: undefined, channel: 'end', success: false, message: 'exit code 2' },
  ]);
  const ok = Buffer.from(`{}\n${JSON.stringify({ ch: 'error', b64: b64('{"status":"Success"}') })}\n`);
  assert.deepEqual(recordingFrames(ok), [{ t: undefined, channel: 'end', success: true, message: '{"status":"Success"}' }]);
});
