/**
 * The console's sessions and its answers before sign-in (src/console/session.ts, plugin.ts), with
 * fastify's inject: cookie attributes with and without TLS, sessions that end and expire, CSRF tokens
 * per session, the CSP and security headers on every answer, refusals of state changes without a
 * session, from another origin, or without the CSRF token; the shared sessions' sign-in cookie.
 */
import { createHmac } from 'node:crypto';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import cookie from '@fastify/cookie';
import Fastify from 'fastify';
import { CSP, registerConsole, sessionCookie, type ConsoleDeps } from '../../src/console/plugin.ts';
import type { ConsoleDatabase } from '../../src/console/db.ts';
import { sameToken, SessionStore } from '../../src/console/session.ts';
import { csrfOf, SharedSessions } from '../../src/console/shared-sessions.ts';
import type { Caller } from '../../src/identity/types.ts';
import { canonicalJson } from '../../src/state-signature.ts';
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

test('shared sessions (several replicas): the sign-in in progress travels in its cookie; a forged, stale or foreign one is refused; CSRF tokens derive from the id', async () => {
  // The brokers' StateSigner is a key Secret in the cluster; here a keyed HMAC stands in for it (a signer per key).
  const signer = (key: string) => {
    const mac = (kind: string, facts: object) => `k.${createHmac('sha256', key).update(`${kind}\n${canonicalJson(facts)}`).digest('base64url')}`;
    return { sign: async (kind: string, facts: object) => mac(kind, facts), verify: async (kind: string, facts: object, sig: string | undefined) => sig === mac(kind, facts) };
  };
  const shared = new SharedSessions({} as ConsoleDatabase, signer('the brokers key'));
  const other = new SharedSessions({} as ConsoleDatabase, signer('another key'));
  try {
    const login = await shared.startLogin({ issuer: 'https://idp', clientId: 'console', verifier: 'v', state: 's', nonce: 'n', redirectUri: 'http://127.0.0.1:1/ui/callback' });
    assert.ok(login.id.length < 4096 && /^[A-Za-z0-9_.-]+$/.test(login.id), 'a cookie value');
    assert.deepEqual({ ...(await shared.takeLogin(login.id)), id: '' }, { ...login, id: '' });
    assert.equal(await other.takeLogin(login.id), undefined, 'signed with another key');
    assert.equal(await shared.takeLogin('not base64 json'), undefined);
    const [body, kid] = login.id.split('.');
    const planted = { issuer: 'https://idp', clientId: 'console', verifier: 'attacker', state: 's', nonce: 'n', redirectUri: 'http://127.0.0.1:1/ui/callback', expiresAt: login.expiresAt };
    assert.equal(await shared.takeLogin(`${Buffer.from(JSON.stringify(planted)).toString('base64url')}.${login.id.split('.').slice(1).join('.')}`), undefined, 'a verifier of its own under a real signature');
    assert.equal(await shared.takeLogin(`${body}.${kid}.AAAA`), undefined, 'a made-up signature');
    assert.equal(await shared.takeLogin(body), undefined, 'unsigned (as before signing)');
    assert.equal(await shared.takeLogin(Buffer.from('{"issuer":1}').toString('base64url') + '.k.x'), undefined, 'fields of the wrong type');
    const stale = { issuer: 'i', clientId: 'c', verifier: 'v', state: 's', nonce: 'n', redirectUri: 'r', expiresAt: Date.now() - 1 };
    const signed = async (facts: typeof stale) => `${Buffer.from(JSON.stringify(facts)).toString('base64url')}.${await signer('the brokers key').sign('console-login', facts)}`;
    assert.equal(await shared.takeLogin(await signed(stale)), undefined, 'expired');
    const far = { ...stale, expiresAt: Date.now() + 3600_000 };
    assert.equal(await shared.takeLogin(await signed(far)), undefined, 'longer than a sign-in may take');
    const fine = { ...stale, expiresAt: Date.now() + 60_000 };
    assert.equal((await shared.takeLogin(await signed(fine)))?.verifier, 'v', 'the same, well signed and in time, is taken');
    assert.equal(csrfOf('a'.repeat(43)), csrfOf('a'.repeat(43)));
    assert.notEqual(csrfOf('a'.repeat(43)), csrfOf('b'.repeat(43)));
    assert.equal(csrfOf('a'.repeat(43)).includes('a'.repeat(43)), false);

    // The callback takes only an issuer and client the policy offers, and this console's redirect: a forged cookie naming another is refused before any request to it.
    const app = Fastify();
    const deps = {
      policy: () => ({ issuers: [{ issuer: 'https://idp', login: { clientId: 'console' } }] }) as unknown as Policy,
      approvals: () => ({ groupsOf: () => [] }),
      origin: () => 'http://127.0.0.1:1',
      secure: false,
      sessions: shared,
      audit: { append: async () => undefined },
    } as unknown as ConsoleDeps;
    registerConsole(app, deps);
    await app.ready();
    try {
      for (const forged of [
        { ...login, issuer: 'http://169.254.169.254/latest' },
        { ...login, clientId: 'other' },
        { ...login, redirectUri: 'https://attacker.example/ui/callback' },
      ]) {
        const { id: _id, ...facts } = forged;
        const body = Buffer.from(JSON.stringify(facts)).toString('base64url');
        // Unsigned, or signed by another key: not a sign-in this console started.
        for (const value of [body, `${body}.${await signer('another key').sign('console-login', facts)}`]) {
          const r = await app.inject({ method: 'GET', url: '/ui/callback?code=x&state=s', headers: { cookie: `broker-login=${value}` } });
          assert.equal(r.statusCode, 401, JSON.stringify(forged));
          assert.match(r.body, /was not started in this browser/);
        }
        // Even signed with the brokers' key (say, the policy changed during the sign-in): refused before any request to it.
        const value = `${body}.${await signer('the brokers key').sign('console-login', facts)}`;
        const r = await app.inject({ method: 'GET', url: '/ui/callback?code=x&state=s', headers: { cookie: `broker-login=${value}` } });
        assert.equal(r.statusCode, 401, JSON.stringify(forged));
        assert.match(r.body, /names an identity provider the policy no longer offers/);
      }
    } finally {
      await app.close();
    }
  } finally {
    shared.close();
    other.close();
  }
});
