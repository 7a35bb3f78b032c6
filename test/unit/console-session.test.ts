/**
 * The console's sessions and its answers before sign-in (src/console/session.ts, plugin.ts), with
 * fastify's inject: cookie attributes with and without TLS, sessions that end and expire, CSRF tokens
 * per session, the CSP and security headers on every answer, refusals of state changes without a
 * session, from another origin, or without the CSRF token.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import cookie from '@fastify/cookie';
import Fastify from 'fastify';
import { CSP, registerConsole, sessionCookie, type ConsoleDeps } from '../../src/console/plugin.ts';
import { sameToken, SessionStore } from '../../src/console/session.ts';
import type { Caller } from '../../src/identity/types.ts';
import type { Policy } from '../../src/policy/types.ts';

const caller: Caller = { agent: '', subject: 'https://idp#alice', method: 'oidc', principal: 'person:alice' };

test('the session cookie: HttpOnly, SameSite=Strict, 15 minutes, path /; with TLS __Host- and Secure', async () => {
  const f = Fastify();
  await f.register(cookie);
  const serialize = (name: string, options: object) => (f as unknown as { serializeCookie: (n: string, v: string, o: object) => string }).serializeCookie(name, 'id', options);
  const tls = sessionCookie(true);
  const header = serialize(tls.name, tls.options);
  assert.equal(tls.name, '__Host-broker-session');
  for (const part of ['HttpOnly', 'Secure', 'SameSite=Strict', 'Max-Age=900', 'Path=/']) assert.ok(header.includes(part), `${part} in ${header}`);
  assert.equal(header.includes('Domain'), false, '__Host- cookies name no domain');
  const plain = sessionCookie(false);
  assert.equal(plain.name, 'broker-session');
  assert.equal(serialize(plain.name, plain.options).includes('Secure'), false);
  await f.close();
});

test('sessions: random ids and CSRF tokens, ended at sign-out (listeners told), expired after their lifetime; sign-ins used once', () => {
  let now = 1_000_000;
  const store = new SessionStore({ now: () => now, maxSessions: 2 });
  const ended: string[] = [];
  store.onEnded((id) => ended.push(id));
  const a = store.create(caller, 'https://idp', 60);
  const b = store.create(caller, 'https://idp', 60);
  assert.notEqual(a.id, b.id);
  assert.notEqual(a.csrf, b.csrf);
  assert.ok(a.id.length >= 43);
  assert.equal(store.get(a.id), a);
  store.end(a.id);
  assert.equal(store.get(a.id), undefined);
  assert.deepEqual(ended, [a.id]);
  now += 61_000;
  assert.equal(store.get(b.id), undefined, 'expired');
  const c = store.create(caller, 'x');
  store.create(caller, 'x');
  store.create(caller, 'x');
  assert.equal(store.get(c.id), undefined, 'the oldest dropped beyond the cap');
  const login = store.startLogin({ issuer: 'i', clientId: 'c', verifier: 'v', state: 's', nonce: 'n', redirectUri: 'r' });
  assert.equal(store.takeLogin(login.id)?.verifier, 'v');
  assert.equal(store.takeLogin(login.id), undefined, 'used once');
  assert.equal(sameToken(undefined, 'x'), false);
  assert.equal(sameToken('xy', 'x'), false);
  assert.equal(sameToken(a.csrf, a.csrf), true);
});

test('before sign-in: the CSP and headers on every answer; pages send to sign-in; state changes refused (no session, another origin, no CSRF token)', async () => {
  const sessions = new SessionStore();
  const app = Fastify();
  const deps = {
    policy: () => ({ issuers: [] }) as unknown as Policy,
    approvals: () => ({ groupsOf: () => ['sre'] }),
    origin: () => 'http://127.0.0.1:1',
    secure: false,
    sessions,
    audit: { append: async () => undefined },
  } as unknown as ConsoleDeps;
  registerConsole(app, deps);
  await app.ready();
  try {
    const signin = await app.inject({ method: 'GET', url: '/ui/signin' });
    assert.equal(signin.statusCode, 200);
    assert.equal(signin.headers['content-security-policy'], CSP);
    assert.equal(signin.headers['x-frame-options'], 'DENY');
    assert.equal(signin.headers['cache-control'], 'no-store');
    assert.match(signin.body, /No identity provider is set up/);
    assert.doesNotMatch(signin.body, /<script>|\sstyle=|\son[a-z]+=/, 'no inline script, style or handler');
    const approvals = await app.inject({ method: 'GET', url: '/ui/approvals' });
    assert.equal(approvals.statusCode, 303);
    assert.equal(approvals.headers['location'], '/ui/signin');
    assert.equal(approvals.headers['content-security-policy'], CSP);
    const list = await app.inject({ method: 'GET', url: '/ui/approvals/list' });
    assert.equal(list.statusCode, 401);
    const form = { 'content-type': 'application/x-www-form-urlencoded' };
    const noSession = await app.inject({ method: 'POST', url: '/ui/approvals/ar-000000000000/decide', headers: form, payload: 'decision=approve&csrf=x' });
    assert.equal(noSession.statusCode, 401);
    // Signed in (a session made directly): the token is checked, and the origin.
    const s = sessions.create(caller, 'https://idp');
    const cookieHeader = { cookie: `broker-session=${s.id}` };
    const foreign = await app.inject({ method: 'POST', url: '/ui/signout', headers: { ...form, ...cookieHeader, origin: 'https://attacker.example' }, payload: `csrf=${s.csrf}` });
    assert.equal(foreign.statusCode, 403);
    const crossSite = await app.inject({ method: 'POST', url: '/ui/signout', headers: { ...form, ...cookieHeader, 'sec-fetch-site': 'cross-site' }, payload: `csrf=${s.csrf}` });
    assert.equal(crossSite.statusCode, 403);
    const noToken = await app.inject({ method: 'POST', url: '/ui/signout', headers: { ...form, ...cookieHeader }, payload: 'x=1' });
    assert.equal(noToken.statusCode, 403);
    assert.match(noToken.body, /CSRF token missing or wrong/);
    const other = sessions.create(caller, 'https://idp');
    const othersToken = await app.inject({ method: 'POST', url: '/ui/signout', headers: { ...form, ...cookieHeader }, payload: `csrf=${other.csrf}` });
    assert.equal(othersToken.statusCode, 403);
    const ok = await app.inject({ method: 'POST', url: '/ui/signout', headers: { ...form, ...cookieHeader, origin: 'http://127.0.0.1:1', 'sec-fetch-site': 'same-origin' }, payload: `csrf=${s.csrf}` });
    assert.equal(ok.statusCode, 303);
    assert.equal(ok.headers['location'], '/ui/signin?signedout');
    assert.match(String(ok.headers['set-cookie']), /broker-session=;/);
    assert.equal(sessions.get(s.id), undefined, 'the session is gone server-side');
    const asset = await app.inject({ method: 'GET', url: '/ui/assets/console.js' });
    assert.equal(asset.statusCode, 200);
    assert.match(String(asset.headers['content-type']), /text\/javascript/);
    assert.equal(asset.headers['content-security-policy'], CSP);
  } finally {
    await app.close();
  }
});
