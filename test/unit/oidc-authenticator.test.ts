/**
 * The OIDC authenticator's decisions that need no identity provider (the rest, with a real one, is
 * test/integration/identity-oidc.test.ts): whose tokens it leaves to others, what it refuses before
 * any key is fetched, and an issuer it cannot reach.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import * as jose from 'jose';
import { OidcAuthenticator } from '../../src/identity/oidc.ts';
import { parsePolicy } from '../../src/policy/parse.ts';

/** A loopback port nothing listens on. */
function closedPort(): Promise<number> {
  return new Promise((done) => {
    const srv = createServer().listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => done(port));
    });
  });
}

async function setup() {
  const issuer = `http://127.0.0.1:${await closedPort()}`;
  const policy = parsePolicy(
    `apiVersion: task-broker/v1alpha1\nkind: Policy\nbroker: { taskNamespace: tasks }\nissuers:\n  - { issuer: "${issuer}", audience: task-broker, algorithms: [ES256] }\n` +
      `agents:\n  - name: ci\n    identities: [{ oidc: { issuer: "${issuer}", subject: job } }]\ntemplates: []\n`,
  );
  const { privateKey } = await jose.generateKeyPair('ES256');
  const now = Math.floor(Date.now() / 1000);
  const sign = (claims: jose.JWTPayload, alg = 'ES256') => new jose.SignJWT({ iat: now, exp: now + 300, ...claims }).setProtectedHeader({ alg, kid: 'k1' }).sign(privateKey);
  const auth = new OidcAuthenticator(policy, { retryMs: 60_000 });
  const req = (token: string) => ({ headers: { authorization: `Bearer ${token}` }, method: 'GET', url: '/v1/whoami' });
  return { issuer, sign, auth, req };
}

test('not its own: no bearer token, not a JWT, a ServiceAccount token (kubernetes.io claims) go to the next authenticator', async () => {
  const { auth, sign, req } = await setup();
  assert.equal(await auth.authenticate({ headers: {}, method: 'GET', url: '/' }), undefined);
  assert.equal(await auth.authenticate(req('opaque-token')), undefined);
  assert.equal(await auth.authenticate(req(await sign({ iss: 'https://kubernetes.default.svc', 'kubernetes.io': { namespace: 'agents' } }))), undefined);
  assert.equal(await auth.authenticate(req(await sign({ iss: 'https://kubernetes.default.svc', 'kubernetes.io/serviceaccount/namespace': 'agents' }))), undefined);
});

test('refused before any key is fetched: an issuer not listed (not quoted back), an algorithm off the allow-list', async () => {
  const { auth, sign, req, issuer } = await setup();
  await assert.rejects(auth.authenticate(req(await sign({ iss: 'https://evil.example/<script>' }))), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'unauthenticated');
    assert.equal(err.message, 'OIDC token refused: its issuer ("iss") is not one of the issuers the policy lists');
    return true;
  });
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
  await assert.rejects(auth.authenticate(req(`${b64({ alg: 'none' })}.${b64({ iss: issuer, sub: 'job', aud: 'task-broker' })}.`)), /"none" algorithm is not allowed for .* \(allowed: ES256\)/);
  await assert.rejects(auth.authenticate(req(`${b64({ alg: 'HS256' })}.${b64({ iss: issuer })}.c2ln`)), /"HS256" algorithm is not allowed/);
  await assert.rejects(auth.authenticate(req(`${b64({ alg: 'A'.repeat(40) })}.${b64({ iss: issuer })}.c2ln`)), /OIDC token refused: its algorithm is not allowed/);
});

test('a listed issuer that cannot be reached: identity_provider_unavailable (503), retried only after retryMs', async () => {
  const { auth, sign, req } = await setup();
  const token = await sign({ iss: auth.issuers[0]!, sub: 'job', aud: 'task-broker' });
  await assert.rejects(auth.authenticate(req(token)), (err: Error & { code?: string }) => err.code === 'identity_provider_unavailable' && /could not be reached: discovery failed/.test(err.message));
  const started = Date.now();
  await assert.rejects(auth.authenticate(req(token)), /its discovery failed moments ago/);
  assert.ok(Date.now() - started < 100, 'the second refusal does not ask the issuer again');
});
