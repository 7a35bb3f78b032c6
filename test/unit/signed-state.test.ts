/**
 * The pure parts of the security review's fixes: signatures on the state the broker trusts, who
 * stands behind an identity, how long a task's token may live, and what reaches a chat message.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { calculateJwkThumbprint, exportJWK, generateKeyPair, type JWK } from 'jose';
import type { ApprovalKeys } from '../../src/approvals/token.ts';
import { chatText } from '../../src/approvals/notify.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import { principalIndex, principalOf } from '../../src/policy/principals.ts';
import { StateSigner } from '../../src/state-signature.ts';
import { taskFacts, type Task } from '../../src/tasks/model.ts';
import { tokenSeconds } from '../../src/tasks/service.ts';

async function newKey(): Promise<JWK & { kid: string }> {
  const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
  const jwk = await exportJWK(privateKey);
  return { ...jwk, kid: await calculateJwkThumbprint(jwk) };
}

/** An ApprovalKeys stand-in holding a key set in memory, counting reads. */
function keysOf(set: { current: JWK & { kid: string }; previous?: JWK & { kid: string } }) {
  const state = { set, reads: 0 };
  const keys = {
    keySet: async () => (state.reads++, state.set),
    signingKey: async () => (state.reads++, state.set.current),
    verificationKeys: async () => [state.set.current, ...(state.set.previous ? [state.set.previous] : [])].map(({ d: _d, ...pub }) => pub as JWK & { kid: string }),
  } as unknown as ApprovalKeys;
  return { keys, state };
}

const task: Task = {
  id: 'abc123def456',
  name: 'extend',
  agent: 'other',
  template: 'read-pods',
  namespace: 'web',
  createdAt: new Date('2026-01-01T00:00:00Z'),
  expiresAt: new Date('2026-01-01T00:10:00Z'),
  state: 'active',
  secretName: 'task-0123',
  serviceAccount: 'task-abc123def456',
  roleBinding: 'task-broker-abc123def456',
};

describe('signed state', () => {
  test('a task record verifies as signed, and fails once its expiry (or any signed fact) is changed', async () => {
    const { keys } = keysOf({ current: await newKey() });
    const signer = new StateSigner(keys);
    const sig = await signer.sign('task', taskFacts(task));
    assert.equal(await signer.verify('task', taskFacts(task), sig), true);
    assert.equal(await signer.verify('task', taskFacts({ ...task, expiresAt: new Date('2030-01-01T00:00:00Z') }), sig), false);
    assert.equal(await signer.verify('task', taskFacts({ ...task, agent: 'alice' }), sig), false);
    assert.equal(await signer.verify('approval', taskFacts(task), sig), false, 'a signature is bound to its kind');
    assert.equal(await signer.verify('task', taskFacts(task), undefined), false);
    assert.equal(await signer.verify('task', taskFacts(task), 'garbage'), false);
    assert.equal(await signer.verify('task', taskFacts(task), `${sig.split('.')[0]}.AAAA`), false);
  });

  test('a signature by another key is refused, even with a known kid', async () => {
    const mine = await newKey();
    const theirs = await newKey();
    const forger = new StateSigner(keysOf({ current: { ...theirs, kid: mine.kid } }).keys);
    const signer = new StateSigner(keysOf({ current: mine }).keys);
    assert.equal(await signer.verify('task', taskFacts(task), await forger.sign('task', taskFacts(task))), false);
  });

  test('rotation: signing always uses the current key; previous keeps verifying until it is removed', async () => {
    const old = await newKey();
    const { keys, state } = keysOf({ current: old });
    const signer = new StateSigner(keys, { cacheMs: 60_000 });
    const before = await signer.sign('task', taskFacts(task));
    const fresh = await newKey();
    state.set = { current: fresh, previous: old };
    const after = await signer.sign('task', taskFacts(task));
    assert.equal(after.split('.')[0], fresh.kid, 'no stale cached key signs after a rotation');
    assert.equal(await signer.verify('task', taskFacts(task), before), true);
    state.set = { current: fresh };
    const reader = new StateSigner(keys);
    assert.equal(await reader.verify('task', taskFacts(task), before), false, 'what previous signed fails once it is removed');
    assert.equal(await reader.verify('task', taskFacts(task), after), true);
  });
});

describe('principals', () => {
  const policy = parsePolicy(`
apiVersion: task-broker/v1alpha1
kind: Policy
broker: { taskNamespace: tasks }
agents:
  - name: alice-agent
    identities: [{ serviceAccount: agents/alice }, { serviceAccount: agents/alice2 }]
people:
  - name: carol
    identities: [{ serviceAccount: people/carol }, { oidc: { issuer: "https://idp.example", subject: "c-1" } }]
approvers:
  - name: sre
    members: [{ person: carol }, { serviceAccount: people/dave }]
templates: []
`);
  const index = principalIndex(policy);

  test("an agent's identities share one principal; a person's too; a bare approver identity is its own", () => {
    assert.deepEqual(index.get('system:serviceaccount:agents:alice'), { agent: 'alice-agent', principal: 'agent:alice-agent' });
    assert.deepEqual(index.get('system:serviceaccount:agents:alice2'), { agent: 'alice-agent', principal: 'agent:alice-agent' });
    assert.deepEqual(index.get('system:serviceaccount:people:carol'), { agent: '', principal: 'person:carol' });
    assert.deepEqual(index.get('https://idp.example#c-1'), { agent: '', principal: 'person:carol' });
    assert.deepEqual(index.get('system:serviceaccount:people:dave'), { agent: '', principal: 'identity:system:serviceaccount:people:dave' });
    assert.deepEqual(principalOf(index, 'https://idp.example#someone'), { agent: '', principal: 'identity:https://idp.example#someone' });
  });
});

describe('token lifetime', () => {
  test('the lesser of tokenTTL and the task time left, raised to the 600 s floor only when shorter', () => {
    assert.equal(tokenSeconds(3600, 900), 900);
    assert.equal(tokenSeconds(600, 900), 600);
    assert.equal(tokenSeconds(3600, 20), 600);
    assert.equal(tokenSeconds(3600, 899.2), 900);
    assert.equal(tokenSeconds(3600, 7200), 3600);
  });
});

describe('notification text', () => {
  test('chat markup that makes links and mentions is escaped', () => {
    assert.equal(chatText('<!channel> & <http://evil|x>'), '&lt;!channel&gt; &amp; &lt;http://evil|x&gt;');
  });
});
