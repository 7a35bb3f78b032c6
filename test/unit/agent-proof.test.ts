/**
 * Agent keys and proofs (src/identity/agent-proof.ts), and the policy's `administrators`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newAgentKey, parseAgentKey, parseProofHeader, proofHeader, publicKeyOf, verifyProofSignature } from '../../src/identity/agent-proof.ts';
import { PolicyError, parsePolicy } from '../../src/policy/parse.ts';

test('a key round-trips through its text form; its proof verifies with the public key alone, and a changed byte does not', () => {
  const pair = newAgentKey();
  const key = parseAgentKey(pair.forAgent('code-agent'));
  assert.equal(key.agent, 'code-agent');
  assert.equal(key.publicKey, pair.publicKey);
  const header = proofHeader(key, 'post', 'https://broker.example/v1/tasks', Date.parse('2026-01-01T00:00:00Z'));
  const proof = parseProofHeader(header)!;
  assert.deepEqual({ ...proof.claims, jti: 'x' }, { sub: 'code-agent', htm: 'POST', htu: 'https://broker.example/v1/tasks', iat: 1767225600, exp: 1767225630, jti: 'x' });
  assert.ok(verifyProofSignature(proof, publicKeyOf(key.publicKey)!));
  const other = parseAgentKey(newAgentKey().forAgent('code-agent'));
  assert.ok(!verifyProofSignature(proof, publicKeyOf(other.publicKey)!), 'another key');
  const [h, p, s] = header.slice('AgentProof '.length).split('.');
  const forged = JSON.parse(Buffer.from(p!, 'base64url').toString());
  forged.htu = 'https://broker.example/v1/agents';
  const tampered = parseProofHeader(`AgentProof ${h}.${Buffer.from(JSON.stringify(forged)).toString('base64url')}.${s}`)!;
  assert.ok(!verifyProofSignature(tampered, publicKeyOf(key.publicKey)!), 'a changed claim');
  // Two proofs for the same request differ (their jti).
  assert.notEqual(proofHeader(key, 'GET', 'https://b/v1/whoami'), proofHeader(key, 'GET', 'https://b/v1/whoami'));
});

test('proof headers: other schemes are not proofs; malformed ones say what is wrong without quoting them', () => {
  assert.equal(parseProofHeader(undefined), undefined);
  assert.equal(parseProofHeader('Bearer abc'), undefined);
  assert.throws(() => parseProofHeader('AgentProof abc'), /not a compact JWS/);
  const b = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
  assert.throws(() => parseProofHeader(`AgentProof ${b({ alg: 'none', typ: 'agent-proof+jwt' })}.${b({})}.`), /header must be exactly/);
  assert.throws(() => parseProofHeader(`AgentProof ${b({ alg: 'EdDSA', typ: 'agent-proof+jwt' })}.${b({ sub: 'a', htm: 'GET', htu: 'u' })}.x`), /"jti" claim is missing/);
  assert.throws(() => parseAgentKey('tbak1.a.c2VjcmV0'), /seed is 32 bytes/);
  assert.throws(() => parseAgentKey('something-else'), /has the form tbak1\.AGENT\.SEED/);
  assert.equal(publicKeyOf('short'), undefined);
});

test('administrators name approver groups declared in approvers', () => {
  const base = 'apiVersion: task-broker/v1alpha1\nkind: Policy\nbroker: { taskNamespace: tasks }\nagents: [{ name: bot }]\ntemplates: []\npeople:\n  - name: root\n    identities: [{ serviceAccount: admins/root }]\napprovers:\n  - name: admins\n    members: [{ person: root }]\n';
  assert.deepEqual(parsePolicy(base + 'administrators: [admins]\n').administrators, ['admins']);
  assert.deepEqual(parsePolicy(base).administrators, []);
  assert.throws(
    () => parsePolicy(base + 'administrators: [admins, sre]\n'),
    (err: PolicyError) => err.issues.length === 1 && err.issues[0]!.path === 'administrators[1]' && /approver group "sre" is not declared in "approvers" \(declared: admins\)/.test(err.issues[0]!.message),
  );
});
