/**
 * The task record's signature at a start (src/tasks/service.ts with StateSigner.startPendingSigning):
 * the pending record is signed with the key the signer holds, while the key Secret is read afresh; that
 * read is awaited only before the activating patch, which carries a new signature when the key
 * changed meanwhile; a failed read rolls the start back and is recorded. The API server and the key
 * Secret are stand-ins here (what each call asked, in order; a read held open by the test): the
 * integration tests (broker-lifecycle, task-start-record, approvals' key rotation) run the real ones.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { calculateJwkThumbprint, exportJWK, generateKeyPair, type JWK } from 'jose';
import type { ApprovalKeys } from '../../src/approvals/token.ts';
import type { AuditSink } from '../../src/audit/sink.ts';
import type { AuditEventInput, AuditRecord } from '../../src/audit/types.ts';
import type { Caller } from '../../src/identity/types.ts';
import type { KubeApis } from '../../src/kube/config.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import { SIGNATURE_ANNOTATION, StateSigner } from '../../src/state-signature.ts';
import { taskFacts } from '../../src/tasks/model.ts';
import { TaskService } from '../../src/tasks/service.ts';
import { TaskStore } from '../../src/tasks/store.ts';

type Key = JWK & { kid: string };
type KeySet = { current: Key; previous?: Key };

async function newKey(): Promise<Key> {
  const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
  const jwk = await exportJWK(privateKey);
  return { ...jwk, kid: await calculateJwkThumbprint(jwk) };
}

/** A key Secret whose next reads the test answers (or fails) when it chooses; until then they stay open. */
function heldKeys() {
  const waiting: Array<{ answer: (set: KeySet) => void; fail: (err: Error) => void }> = [];
  let reads = 0;
  const keys = {
    keySet: () => {
      reads++;
      return new Promise<KeySet>((answer, fail) => waiting.push({ answer, fail }));
    },
  } as unknown as ApprovalKeys;
  const next = async (): Promise<{ answer: (set: KeySet) => void; fail: (err: Error) => void }> => {
    const until = Date.now() + 2_000;
    while (waiting.length === 0) {
      if (Date.now() > until) throw new Error('no read of the key Secret within 2 s');
      await new Promise((done) => setTimeout(done, 1));
    }
    return waiting.shift()!;
  };
  return { keys, next, reads: () => reads, open: () => waiting.length };
}

/** What the task service asks of the API server, in order; every call succeeds. */
function fakeKube() {
  const calls: Array<{ call: string; body?: any }> = [];
  const ok = (call: string) => async (arg: { body?: any }) => {
    calls.push({ call, body: arg.body });
    return { ...(arg.body ?? {}), metadata: { ...(arg.body?.metadata ?? {}), uid: `uid-${calls.length}` } };
  };
  const kube = {
    core: {
      createNamespacedSecret: ok('create Secret'),
      createNamespacedServiceAccount: ok('create ServiceAccount'),
      patchNamespacedSecret: ok('patch Secret'),
      deleteNamespacedSecret: ok('delete Secret'),
      deleteNamespacedServiceAccount: ok('delete ServiceAccount'),
    },
    rbac: {
      createNamespacedRoleBinding: ok('create RoleBinding'),
      deleteNamespacedRoleBinding: ok('delete RoleBinding'),
    },
  } as unknown as KubeApis;
  const seen = async (call: string) => {
    const until = Date.now() + 2_000;
    while (!calls.some((c) => c.call === call)) {
      if (Date.now() > until) throw new Error(`no "${call}" within 2 s; the calls: ${calls.map((c) => c.call).join(', ') || 'none'}`);
      await new Promise((done) => setTimeout(done, 1));
    }
  };
  return { kube, calls, seen, names: () => calls.map((c) => c.call) };
}

function memoryAudit() {
  const records: AuditEventInput[] = [];
  const audit: AuditSink = {
    healthy: true,
    append: async (event) => {
      records.push(event);
      return event as unknown as AuditRecord;
    },
  };
  return { audit, records };
}

const policy = parsePolicy(`apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
agents:
  - name: bot
    identities:
      - serviceAccount: agents/bot
templates:
  - name: read-pods
    namespaces: [dev]
    rules:
      - { resources: [pods], verbs: [get, list] }
    ttl: { default: 10m, max: 1h }
    agents: [bot]
`);

const bot: Caller = { agent: 'bot', subject: 'system:serviceaccount:agents:bot', method: 'serviceAccount', principal: 'agent:bot' } as Caller;

function harness() {
  const keys = heldKeys();
  const signer = new StateSigner(keys.keys, { cacheMs: 60_000 });
  const kube = fakeKube();
  const { audit, records } = memoryAudit();
  const service = new TaskService(kube.kube, policy, audit, new TaskStore(), { signer });
  return { keys, signer, kube, records, service };
}

/** The signer holds `set` (one read, answered), as after an earlier start or verification. */
async function hold(h: ReturnType<typeof harness>, set: KeySet): Promise<void> {
  const signed = h.signer.sign('warm-up', {});
  (await h.keys.next()).answer(set);
  await signed;
}

const signatureOf = (body: any): string => body.metadata.annotations[SIGNATURE_ANNOTATION];
const kidOf = (signature: string): string => signature.split('.')[0]!;

describe('task start: the record signed with the key held, confirmed by a fresh read before activation', () => {
  test('with a key held, the Secret is created while the fresh read of the key is still open; activation waits for it', async () => {
    const h = harness();
    const key = await newKey();
    await hold(h, { current: key });
    const started = h.service.start(bot, { template: 'read-pods', namespace: 'dev', name: 'quick' });
    const read = await h.keys.next(); // the fresh read: held open
    await h.kube.seen('create RoleBinding');
    await h.kube.seen('create ServiceAccount');
    assert.deepEqual(h.kube.names(), ['create Secret', 'create ServiceAccount', 'create RoleBinding'], 'created without waiting for the read');
    assert.equal(h.keys.open(), 0);
    assert.equal(h.keys.reads(), 2, 'one read for the warm-up, one afresh for this start');
    const secret = h.kube.calls[0]!.body;
    assert.equal(kidOf(signatureOf(secret)), key.kid);
    assert.equal(secret.metadata.labels['task-broker.dev/state'], 'pending');
    assert.ok(!h.records.some((r) => r.type === 'task.started'), 'task.started waits for the read too');
    // Not activated until the read is in.
    await new Promise((done) => setTimeout(done, 20));
    assert.ok(!h.kube.names().includes('patch Secret'), 'no activation before the fresh read');
    read.answer({ current: key });
    const task = await started;
    assert.equal(task.state, 'active');
    const patch = h.kube.calls.find((c) => c.call === 'patch Secret')!.body;
    assert.deepEqual(patch, [{ op: 'replace', path: '/metadata/labels/task-broker.dev~1state', value: 'active' }], 'the same key: the signature stands');
    assert.equal(task.signature, signatureOf(secret));
    assert.equal(await h.signer.verify('task', taskFacts(task), task.signature), true);
    assert.ok(h.records.some((r) => r.type === 'task.started'));
  });

  test('with no key held, the Secret waits for the read (as every signature did)', async () => {
    const h = harness();
    const key = await newKey();
    const started = h.service.start(bot, { template: 'read-pods', namespace: 'dev', name: 'cold' });
    const read = await h.keys.next();
    await new Promise((done) => setTimeout(done, 20));
    assert.deepEqual(h.kube.names(), [], 'nothing created before the key is read');
    read.answer({ current: key });
    const task = await started;
    assert.equal(kidOf(task.signature!), key.kid);
    assert.equal(h.keys.reads(), 1, 'one read: the one that signed is the fresh one');
    assert.equal(h.kube.calls.find((c) => c.call === 'patch Secret')!.body.length, 1);
  });

  test('a key rotated between the pending create and activation: the activating patch carries a signature by the new key', async () => {
    const h = harness();
    const old = await newKey();
    const fresh = await newKey();
    await hold(h, { current: old });
    const started = h.service.start(bot, { template: 'read-pods', namespace: 'dev', name: 'rotated', reason: 'across a rotation' });
    const read = await h.keys.next();
    await h.kube.seen('create Secret');
    const pending = signatureOf(h.kube.calls[0]!.body);
    assert.equal(kidOf(pending), old.kid, 'the pending record: the key held');
    read.answer({ current: fresh, previous: old });
    const task = await started;
    const patch = h.kube.calls.find((c) => c.call === 'patch Secret')!.body;
    assert.equal(patch.length, 2, JSON.stringify(patch));
    assert.deepEqual(patch[0], { op: 'replace', path: '/metadata/labels/task-broker.dev~1state', value: 'active' });
    assert.equal(patch[1].op, 'replace');
    assert.equal(patch[1].path, '/metadata/annotations/task-broker.dev~1signature');
    assert.equal(kidOf(patch[1].value), fresh.kid, 'the active record: the key current at activation');
    assert.equal(task.signature, patch[1].value);
    assert.equal(await h.signer.verify('task', taskFacts(task), patch[1].value), true, 'over the same facts');
    // Once previous is gone, only the new signature holds.
    const reader = new StateSigner({ keySet: async () => ({ current: fresh }) } as unknown as ApprovalKeys);
    assert.equal(await reader.verify('task', taskFacts(task), patch[1].value), true);
    assert.equal(await reader.verify('task', taskFacts(task), pending), false);
  });

  test('the same kid with other key material counts as a change: re-signed', async () => {
    const h = harness();
    const old = await newKey();
    const other = { ...(await newKey()), kid: old.kid };
    await hold(h, { current: old });
    const started = h.service.start(bot, { template: 'read-pods', namespace: 'dev', name: 'samekid' });
    (await h.keys.next()).answer({ current: other });
    const task = await started;
    const patch = h.kube.calls.find((c) => c.call === 'patch Secret')!.body;
    assert.equal(patch.length, 2);
    assert.notEqual(patch[1].value, signatureOf(h.kube.calls[0]!.body));
    assert.equal(task.signature, patch[1].value);
  });

  test('StateSigner alone: with a key held, the fresh read starts at read() or, at the latest, at confirm()', async () => {
    const h = harness();
    const key = await newKey();
    await hold(h, { current: key });
    const pending = h.signer.startPendingSigning('task');
    const signature = await pending.sign({ a: 1 });
    assert.equal(kidOf(signature), key.kid);
    assert.equal(h.keys.reads(), 1, 'signed with the key held, no read yet');
    const confirmed = pending.confirm();
    (await h.keys.next()).answer({ current: key });
    assert.equal(await confirmed, undefined, 'the same key: no new signature');
    assert.equal(h.keys.reads(), 2);
    const again = h.signer.startPendingSigning('task');
    again.read();
    again.read();
    assert.equal(h.keys.reads(), 3, 'read() starts one read, once');
    (await h.keys.next()).answer({ current: key });
    await again.sign({ a: 1 });
    assert.equal(await again.confirm(), undefined);
    assert.equal(h.keys.reads(), 3);
  });

  test('a fresh read that fails: nothing is activated, what was created is removed, the refusal is recorded', async () => {
    const h = harness();
    await hold(h, { current: await newKey() });
    const started = h.service.start(bot, { template: 'read-pods', namespace: 'dev', name: 'unread' });
    const read = await h.keys.next();
    await h.kube.seen('create RoleBinding');
    read.fail(new Error('reading the approval signing key: the API server said 503'));
    await assert.rejects(started, /reading the approval signing key/);
    assert.deepEqual(h.kube.names(), ['create Secret', 'create ServiceAccount', 'create RoleBinding', 'delete RoleBinding', 'delete ServiceAccount', 'delete Secret']);
    assert.deepEqual(
      h.records.map((r) => r.type),
      ['task.requested', 'task.refused'],
    );
    assert.match(String(h.records[1]!.reason), /reading the approval signing key/);
  });
});
