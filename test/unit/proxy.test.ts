/**
 * The proxy's pure parts: the API server's reading of a request (verb, resource, ...), which request
 * targets are refused, session tokens, the record's shape and its bounds, and the remote command
 * protocol's channels. The proxy as a whole runs against the real API server in
 * test/integration/proxy*.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { SignJWT } from 'jose';
import { isStreaming, requestInfo, targetProblem } from '../../src/proxy/request-info.ts';
import { outcomeOfStatus, proxyRecord, statusMessage } from '../../src/proxy/record.ts';
import { SessionTokens, SESSION_TYP } from '../../src/proxy/session.ts';
import { decodeFrame } from '../../src/proxy/stream-session.ts';
import type { StateSigner } from '../../src/state-signature.ts';

test('requestInfo reads verbs and resources as the API server does', () => {
  const cases: Array<[string, string, Partial<ReturnType<typeof requestInfo>>]> = [
    ['GET', '/api/v1/namespaces/web/pods', { verb: 'list', resource: 'pods', namespace: 'web', name: '' }],
    ['GET', '/api/v1/namespaces/web/pods?watch=1', { verb: 'watch', resource: 'pods' }],
    ['GET', '/api/v1/namespaces/web/pods?watch=false', { verb: 'list' }],
    ['GET', '/api/v1/watch/namespaces/web/pods', { verb: 'watch', resource: 'pods', namespace: 'web' }],
    ['GET', '/api/v1/namespaces/web/pods/p1', { verb: 'get', name: 'p1' }],
    ['GET', '/api/v1/namespaces/web/pods?fieldSelector=metadata.name%3Dp2', { verb: 'list', name: 'p2' }],
    ['GET', '/api/v1/namespaces/web/pods/p1/log?follow=true', { verb: 'get', subresource: 'log' }],
    ['POST', '/api/v1/namespaces/web/pods/p1/exec?command=ls', { verb: 'create', subresource: 'exec' }],
    ['DELETE', '/api/v1/namespaces/web/configmaps', { verb: 'deletecollection' }],
    ['DELETE', '/api/v1/namespaces/web/configmaps/c', { verb: 'delete', name: 'c' }],
    ['PATCH', '/apis/apps/v1/namespaces/web/deployments/d', { verb: 'patch', apiGroup: 'apps', apiVersion: 'v1', resource: 'deployments', name: 'd' }],
    ['PUT', '/apis/apps/v1/namespaces/web/deployments/d/scale', { verb: 'update', subresource: 'scale' }],
    ['GET', '/api/v1/namespaces/web', { verb: 'get', resource: 'namespaces', name: 'web', namespace: 'web' }],
    ['PUT', '/api/v1/namespaces/web/finalize', { verb: 'update', resource: 'namespaces', subresource: 'finalize' }],
    ['GET', '/api/v1/namespaces/web/services/s:80/proxy/x/y', { verb: 'get', resource: 'services', name: 's:80', subresource: 'proxy' }],
    ['GET', '/apis/rbac.authorization.k8s.io/v1/clusterroles', { verb: 'list', apiGroup: 'rbac.authorization.k8s.io', namespace: '' }],
    ['GET', '/api', { isResourceRequest: false, verb: 'get' }],
    ['GET', '/apis/apps/v1', { isResourceRequest: false }],
    ['GET', '/version', { isResourceRequest: false, verb: 'get' }],
  ];
  for (const [method, url, want] of cases) {
    const got = requestInfo(method, url);
    for (const [k, v] of Object.entries(want)) assert.equal(got[k as keyof typeof got], v, `${method} ${url}: ${k}`);
  }
  assert.equal(isStreaming(requestInfo('GET', '/api/v1/namespaces/web/pods/p/log?follow=true'), '/api/v1/namespaces/web/pods/p/log?follow=true'), true);
  assert.equal(isStreaming(requestInfo('GET', '/api/v1/namespaces/web/pods/p/log'), '/api/v1/namespaces/web/pods/p/log'), false);
  assert.equal(isStreaming(requestInfo('GET', '/api/v1/pods?watch=true'), '/api/v1/pods?watch=true'), true);
});

test('targetProblem refuses what could be read two ways, and nothing kubectl sends', () => {
  for (const ok of ['/', '/api', '/api/', '/apis/apps/v1/namespaces/web/deployments/d', '/api/v1/namespaces/web/pods?labelSelector=a%3Db&limit=500', '/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-admin']) {
    assert.equal(targetProblem(ok), undefined, ok);
  }
  for (const [bad, why] of [
    ['http://example.invalid/api', /absolute URI/],
    ['*', /absolute URI/],
    ['/api/v1/namespaces/web/../kube-system/secrets', /"\.\."/],
    ['/api/v1/namespaces/web/./pods', /"\."/],
    ['/api//v1', /empty/],
    ['/api/v1/namespaces/web%2f..%2fkube-system/secrets', /percent-encoded/],
    ['/api/v1/namespaces/web\\pods', /character/],
    ['/api/v1/pods?x=a b', /query/],
  ] as const) {
    assert.match(targetProblem(bad) ?? 'accepted', why, bad);
  }
});

function signerWith(kid: string, key: { privateKey: KeyObject; publicKey: KeyObject }): StateSigner {
  return {
    signingKey: async () => ({ kid, privateKey: key.privateKey }),
    publicKey: async (k: string) => (k === kid ? key.publicKey : undefined),
  } as unknown as StateSigner;
}

test('session tokens: issued for the proxy, verified once, refused when expired, for another proxy, or not ours', async () => {
  let now = Date.parse('2026-01-01T00:00:00Z');
  const key = generateKeyPairSync('ed25519');
  const sessions = new SessionTokens(signerWith('k1', key), 'https://proxy.example.invalid:8444', { now: () => now });
  const taskEnd = new Date(now + 3600_000);
  const s = await sessions.issue({ task: 't1', agent: 'alpha', subject: 'system:serviceaccount:agents:alpha', taskExpiresAt: taskEnd });
  assert.equal(s.expiresAt.getTime(), now + 600_000, 'at most 10 minutes');
  const claims = await sessions.verify(s.token);
  assert.deepEqual({ task: claims.task, agent: claims.agent, sid: claims.sid }, { task: 't1', agent: 'alpha', sid: s.sid });
  // Never past the task's end.
  const short = await sessions.issue({ task: 't2', agent: 'alpha', subject: 'x', taskExpiresAt: new Date(now + 60_000) });
  assert.equal(short.expiresAt.getTime(), now + 60_000);
  // Another proxy's audience.
  const other = new SessionTokens(signerWith('k1', key), 'https://other.example.invalid', { now: () => now });
  await assert.rejects(other.verify(s.token), /not for this proxy/);
  // Another key.
  const stranger = await new SignJWT({ task: 't1', agent: 'alpha' })
    .setProtectedHeader({ alg: 'EdDSA', kid: 'k2', typ: SESSION_TYP })
    .setIssuer('task-broker')
    .setSubject('x')
    .setAudience('https://proxy.example.invalid:8444')
    .setExpirationTime(Math.floor(now / 1000) + 60)
    .setJti('j')
    .sign(generateKeyPairSync('ed25519').privateKey);
  await assert.rejects(sessions.verify(stranger), /key this broker does not have/);
  // Not a session token at all (a ServiceAccount token, garbage).
  await assert.rejects(sessions.verify('eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln'), /not a task-broker session token/);
  await assert.rejects(sessions.verify('nonsense'), /not a task-broker session token/);
  // Expired, also once remembered.
  now += 601_000;
  await assert.rejects(sessions.verify(s.token), /expired/);
});

test('the proxy record: the webhook record\'s shape, bounded, with what only the gateway knows', () => {
  const info = requestInfo('DELETE', '/api/v1/namespaces/vault/configmaps/root-key');
  const r = proxyRecord(
    { id: 't1', agent: 'alpha', name: 'fix', template: 'tpl', sid: 's1' },
    { method: 'DELETE', url: '/api/v1/namespaces/vault/configmaps/root-key', info, source: '192.0.2.2', userAgent: 'kubectl/v1.36.3', kubectlCommand: 'kubectl delete', kubectlSession: 'k1' },
    { code: 403, auditID: 'a1', outcome: outcomeOfStatus(403), reason: 'forbidden', bytesIn: 0, bytesOut: 300, durationMs: 4.25 },
  );
  assert.equal(r.type, 'k8s.request');
  assert.equal(r.outcome, 'denied');
  assert.equal(r.namespace, 'vault');
  assert.deepEqual(r.details, {
    via: 'proxy',
    session: 's1',
    verb: 'delete',
    requestURI: '/api/v1/namespaces/vault/configmaps/root-key',
    resource: 'configmaps',
    apiVersion: 'v1',
    name: 'root-key',
    userAgent: 'kubectl/v1.36.3',
    sourceIPs: ['192.0.2.2'],
    code: 403,
    auditID: 'a1',
    kubectlCommand: 'kubectl delete',
    kubectlSession: 'k1',
    bytesIn: 0,
    bytesOut: 300,
    durationMs: 4.3,
  });
  // An agent's huge values stay within the log's bounds.
  const huge = 'x'.repeat(100_000);
  const big = proxyRecord({ id: 't', agent: 'a', sid: 's' }, { method: 'GET', url: `/api/v1/pods?labelSelector=${huge}`, info: requestInfo('GET', '/api/v1/pods'), source: 's', userAgent: huge, kubectlCommand: huge }, { outcome: 'allowed', code: 200 });
  assert.ok(JSON.stringify(big.details).length < 8192);
  assert.equal(outcomeOfStatus(200), 'allowed');
  assert.equal(outcomeOfStatus(404), 'error');
  assert.equal(outcomeOfStatus(503), 'error');
  assert.equal(statusMessage(Buffer.from('{"kind":"Status","message":"nope"}')), 'nope');
  assert.equal(statusMessage(Buffer.from('{"kind":"Pod"}')), undefined);
  assert.equal(statusMessage(Buffer.from('not json')), undefined);
});

test('decodeFrame: the channel byte of v5.channel.k8s.io, the base64 variant, and anything else as is', () => {
  assert.deepEqual(decodeFrame('v5.channel.k8s.io', Buffer.from([0, 104, 105]), true), { channel: 0, data: Buffer.from('hi') });
  assert.deepEqual(decodeFrame('v4.channel.k8s.io', Buffer.from([2, 33]), true), { channel: 2, data: Buffer.from('!') });
  assert.deepEqual(decodeFrame('v4.base64.channel.k8s.io', Buffer.from(`1${Buffer.from('out').toString('base64')}`), false), { channel: 1, data: Buffer.from('out') });
  assert.deepEqual(decodeFrame('', Buffer.from('raw'), true), { channel: undefined, data: Buffer.from('raw') });
});
