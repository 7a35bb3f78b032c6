/**
 * broker mcp's own parts, in process: the MCP server (src/mcp/server.ts) over the SDK's in-memory
 * transport with a stand-in for the broker client, and the tool errors (src/mcp/errors.ts). The real
 * broker, API server and stdio are in test/integration/mcp.test.ts.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { InMemoryTransport } from '@modelcontextprotocol/sdk/inMemory.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import type { BrokerClient } from '../../src/client/broker-client.ts';
import { BrokerError } from '../../src/errors.ts';
import { errorCodeOf, toolError } from '../../src/mcp/errors.ts';
import { createMcpServer } from '../../src/mcp/server.ts';
import { TOOLS } from '../../src/mcp/tools.ts';

const dir = mkdtempSync(join(tmpdir(), 'tb-mcp-unit-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const TASK = { id: 'k3v9x0a1b2c3', name: 'debug', agent: 'alpha', template: 'read-pods', namespace: 'web', createdAt: '2026-11-24T02:00:00.000Z', expiresAt: '2026-11-24T02:15:00.000Z' };

/** A stand-in for BrokerClient: records the calls, answers what `over` says. */
function fakeClient(over: Partial<Record<keyof BrokerClient, unknown>> = {}) {
  const calls: string[] = [];
  const client = {
    url: 'https://broker.example:8443',
    brokerCa: undefined,
    cluster: async () => (calls.push('cluster'), { server: 'https://api.example:6443', certificateAuthorityData: 'Q0E=' }),
    startTask: async () => (calls.push('startTask'), TASK),
    endTask: async () => (calls.push('endTask'), TASK),
    close: async () => undefined,
    ...over,
  };
  return { client: client as unknown as BrokerClient, calls };
}

async function connect(client: BrokerClient, kubeconfigDir: string) {
  const server = createMcpServer({ client: () => client, kubeconfigDir, readFile: readFileSync, exists: existsSync, version: '0.0.0', log: () => undefined });
  const [a, b] = InMemoryTransport.createLinkedPair();
  await server.connect(a);
  const c = new Client({ name: 'unit', version: '1' });
  await c.connect(b);
  return c;
}
const text = (r: CallToolResult) => r.content.map((x) => (x.type === 'text' ? x.text : '')).join('\n');
const start = (c: Client, args: Record<string, unknown> = { template: 'read-pods', namespace: 'web', reason: 'r', name: 'debug' }) =>
  c.callTool({ name: 'start_task', arguments: args }) as Promise<CallToolResult>;

test('every tool has an input schema that refuses unknown arguments, an output schema, and all three hints', () => {
  for (const t of TOOLS) {
    assert.equal(t.inputSchema.additionalProperties, false, t.name);
    assert.equal(t.outputSchema?.type, 'object', t.name);
    for (const hint of ['readOnlyHint', 'destructiveHint', 'idempotentHint'] as const) assert.equal(typeof t.annotations?.[hint], 'boolean', `${t.name} ${hint}`);
  }
});

test('start_task writes NAME.kubeconfig, 0600 in a 0700 directory, with the exec entry and no secret', async () => {
  const kdir = join(dir, 'ok');
  const { client, calls } = fakeClient();
  const c = await connect(client, kdir);
  const res = await start(c);
  assert.ok(!res.isError, text(res));
  const path = join(kdir, 'debug.kubeconfig');
  assert.deepEqual(res.structuredContent?.['kubeconfig'], { path, context: 'task-broker-debug', namespace: 'web', server: 'https://api.example:6443', via: 'direct' });
  assert.equal(statSync(path).mode & 0o777, 0o600);
  assert.equal(statSync(kdir).mode & 0o777, 0o700);
  const kc = readFileSync(path, 'utf8');
  assert.match(kc, /- --task\n\s+- debug/);
  assert.doesNotMatch(kc, /token/i);
  assert.deepEqual(calls, ['cluster', 'startTask']);
  await c.close();
});

test('a kubeconfig directory others may write, or a symlink, is refused before anything starts (a person must fix it)', async () => {
  const open = join(dir, 'open');
  mkdirSync(open, { mode: 0o777 });
  chmodSync(open, 0o777);
  const link = join(dir, 'link');
  symlinkSync(join(dir, 'ok'), link);
  for (const kdir of [open, link]) {
    const { client, calls } = fakeClient();
    const c = await connect(client, kdir);
    const res = await start(c);
    assert.equal(errorCodeOf(res), 'invalid_argument', text(res));
    assert.match(text(res), /^argument: --kubeconfig-dir$/m);
    assert.match(text(res), /^next: this needs a person/m);
    assert.deepEqual(calls, [], 'nothing was asked of the broker');
    await c.close();
  }
  assert.equal(existsSync(join(open, 'debug.kubeconfig')), false);
});

test('what the broker answers is escaped: no control character reaches the agent, in the text or the structured content', async () => {
  const { client } = fakeClient({ listTasks: async () => [{ ...TASK, reason: 'ok\u001b[2J\u202eevil', cause: 'x\u0007' }] });
  const c = await connect(client, join(dir, 'ok'));
  const res = (await c.callTool({ name: 'list_tasks', arguments: {} })) as CallToolResult;
  const [task] = res.structuredContent?.['tasks'] as Array<Record<string, string>>;
  assert.equal(task!['reason'], 'ok\\x1b[2J\\u202eevil');
  assert.equal(task!['cause'], 'x\\x07');
  assert.doesNotMatch(text(res), /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202a-\u202e]/);
  await c.close();
});

test('an unexpected failure is internal, with no stack and no message of the cause; a broker refusal keeps its code and field', async () => {
  const unexpected = toolError(new TypeError('cannot read properties of undefined (reading \'x\') at /src/mcp/server.ts:12'));
  assert.equal(errorCodeOf(unexpected), 'internal');
  assert.doesNotMatch(text(unexpected), /TypeError|server\.ts|reading/);
  const refused = toolError(new BrokerError('task_exists', 'agent "alpha" already has an active task "debug": end it with: broker task end debug (or choose another --name)', { field: 'name' }));
  assert.equal(
    text(refused),
    'task_exists: agent "alpha" already has an active task "debug"\nargument: name\nnext: use that task (task_status shows it), end it with end_task, or call start_task with another "name"',
  );
});
