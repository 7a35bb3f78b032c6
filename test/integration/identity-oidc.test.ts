/**
 * OIDC identities against real parts: a certified OpenID provider (oidc-provider) on loopback, the
 * broker process, the real kube-apiserver. CI-like tokens come from the client credentials grant;
 * the attacks are tokens that provider would not issue, signed (or not) by the test.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as jose from 'jose';
import { BrokerEnv, POLICY_FILE, type BrokerProcess } from '../helpers/broker.ts';
import { kubectl, writeTokenKubeconfig } from '../helpers/kube.ts';
import { BROKER_RESOURCE, TestProvider, type CiClient } from '../helpers/oidc-provider.ts';
import { kubectlWith, pluginBuilds, writePluginKubeconfig } from '../helpers/exec-plugin.ts';
import { readFileSync } from 'node:fs';

const secret = () => `s-${crypto.randomUUID()}`;
const main: CiClient = { clientId: 'shop-deploy', clientSecret: secret(), repository: 'acme/shop', ref: 'refs/heads/main' };
const branch: CiClient = { clientId: 'shop-deploy-branch', clientSecret: secret(), repository: 'acme/shop', ref: 'refs/heads/feature' };
const foreign: CiClient = { clientId: 'other-org', clientSecret: secret(), repository: 'evil/shop', ref: 'refs/heads/main' };

function policyText(issuer: string): string {
  return (
    readFileSync(POLICY_FILE, 'utf8') +
    `issuers:
  - issuer: ${issuer}
    audience: [${BROKER_RESOURCE}, task-broker-cli]
    groupsClaim: groups
    claims: { repository: [acme/shop, acme/web] }
`
  ).replace(
    'agents:\n',
    `agents:
  - name: ci
    identities:
      - oidc: { issuer: ${issuer}, subject: ${main.clientId}, claims: { ref: refs/heads/main } }
      - oidc: { issuer: ${issuer}, subject: ${branch.clientId}, claims: { ref: refs/heads/main } }
`,
  ).replace('agents: [alpha, beta]', 'agents: [alpha, beta, ci]');
}

describe('OIDC identities (issue 14)', () => {
  let idp: TestProvider;
  let stranger: TestProvider;
  let env: BrokerEnv;
  let broker: BrokerProcess;

  before(async () => {
    idp = await TestProvider.start([main, branch, foreign]);
    stranger = await TestProvider.start([main]); // the same client, at an issuer the policy does not list
    env = await BrokerEnv.start({ policyText: policyText(idp.issuer) });
    broker = await env.startBroker({ extraArgs: ['--auth-failure-log-interval', '1s', '--auth-failure-limit', '1000/10s'] });
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
    await idp?.stop();
    await stranger?.stop();
  });

  test('a CI token with the right claims starts a task whose token the API server takes', async (t) => {
    const token = await idp.ciToken(main);
    const who = await broker.request('GET', '/v1/whoami', token);
    assert.equal(who.status, 200, JSON.stringify(who.body));
    assert.deepEqual(who.body, { subject: `${idp.issuer}#shop-deploy`, method: 'oidc', agent: 'ci', principal: 'agent:ci', approverGroups: [] });
    const start = await broker.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a', name: 'ci-run' });
    t.after(() => broker.request('DELETE', '/v1/tasks/ci-run', token));
    assert.equal(start.status, 201, JSON.stringify(start.body));
    assert.equal(start.body.agent, 'ci');
    const cred = await broker.request('POST', '/v1/tasks/ci-run/credential', token);
    assert.equal(cred.status, 200, JSON.stringify(cred.body));
    const res = await kubectl(writeTokenKubeconfig(join(env.dir, 'ci.kubeconfig'), env.cluster, cred.body.token), 'get', 'pods', '-n', 'team-a');
    assert.equal(res.code, 0, res.stderr);
    const started = broker.auditRecords().find((r) => r.type === 'task.started' && r.task === start.body.id);
    assert.equal(started?.actor, 'agent:ci');
    // Through real kubectl and each exec plugin build, the CI token in the environment as the identity.
    for (const build of pluginBuilds()) {
      const kc = writePluginKubeconfig(env.dir, env.cluster, broker.url, 'ci-run', build);
      const viaPlugin = await kubectlWith(kc, { BROKER_IDENTITY_TOKEN: token }, 'get', 'pods', '-n', 'team-a');
      assert.equal(viaPlugin.code, 0, `${build}: ${viaPlugin.stderr}`);
    }
  });

  test('a CI token of a known subject with the wrong claims is refused 403; outside the issuer conditions 401', async () => {
    const wrongRef = await broker.request('POST', '/v1/tasks', await idp.ciToken(branch), { template: 'read-pods', namespace: 'team-a' });
    assert.equal(wrongRef.status, 403, JSON.stringify(wrongRef.body));
    assert.equal(wrongRef.body.error.code, 'forbidden');
    assert.match(wrongRef.body.error.message, /does not meet the claim condition of agent "ci" on "ref"/);
    const wrongRepo = await broker.request('GET', '/v1/whoami', await idp.ciToken(foreign));
    assert.equal(wrongRepo.status, 401);
    await reasonRecorded(/does not meet the issuer's claim condition on "repository"/);
  });

  test('the API server refuses an identity credential itself (401): the OIDC token, the broker-audience ServiceAccount token', async () => {
    // The tokens on kubectl's command line, never in a file.
    const kc = writeTokenKubeconfig(join(env.dir, 'no-token.kubeconfig'), env.cluster, 'none');
    for (const [what, token] of [
      ['OIDC token', await idp.ciToken(main)],
      ['ServiceAccount token with the broker audience', await env.agentToken('alpha')],
    ] as const) {
      const res = await kubectl(kc, '--token', token, 'get', 'pods', '-n', 'team-a');
      assert.notEqual(res.code, 0, what);
      assert.match(res.stderr, /Unauthorized|must be logged in|provide credentials/, what);
    }
  });

  test('attacks: each answered 401, never 5xx, with an auth.failed record giving the reason', async () => {
    const now = Math.floor(Date.now() / 1000);
    const base = { iss: idp.issuer, aud: BROKER_RESOURCE, sub: main.clientId, repository: main.repository, ref: main.ref };
    const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const { privateKey: unpublished } = await jose.generateKeyPair('RS256', { extractable: true });
    const cases: Array<[string, string, RegExp]> = [
      // expired beyond the 60 s of skew the broker allows
      ['expired', await idp.sign({ ...base, iat: now - 900, exp: now - 61 }), /OIDC token refused: it has expired/],
      // a real token of a real provider the policy does not list
      ['wrong issuer', await stranger.ciToken(main), /its issuer \("iss"\) is not one of the issuers the policy lists/],
      // a real token of the listed provider, for another audience
      ['wrong audience', await idp.ciToken(main, 'https://other.example'), /not for this broker's audience/],
      ['alg none', `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ ...base, iat: now, exp: now + 300 })}.`, /"none" algorithm is not allowed/],
      [
        'unknown key',
        await new jose.SignJWT({ ...base, iat: now, exp: now + 300 }).setProtectedHeader({ alg: 'RS256', kid: 'never-published' }).sign(unpublished),
        /signed with a key .* does not publish/,
      ],
      [
        'HS256 with the public key',
        await new jose.SignJWT({ ...base, iat: now, exp: now + 300 })
          .setProtectedHeader({ alg: 'HS256', kid: idp.keys[0]!.kid! })
          .sign(new TextEncoder().encode(await idp.publicKeyPem())),
        /"HS256" algorithm is not allowed/,
      ],
    ];
    for (const [name, token, reason] of cases) {
      const res = await broker.request('POST', '/v1/tasks', token, { template: 'read-pods', namespace: 'team-a' });
      assert.equal(res.status, 401, `${name}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.code, 'unauthenticated', name);
      await reasonRecorded(reason, name);
    }
    // The 401's hint names what this broker takes, the policy's issuer among them; nothing of the token sent.
    const hinted = await broker.request('GET', '/v1/whoami', 'not-a-token');
    assert.match(hinted.body.error.hint, new RegExp(`an OIDC token of ${idp.issuer} for a subject the policy names \\(broker login, or a CI system's token\\); or a proof signed with an enrolled agent key`));
    // Nothing of the tokens reached the log.
    const log = readFileSync(broker.auditLog, 'utf8');
    for (const [name, token] of cases) assert.ok(!log.includes(token.split('.')[2] || token.split('.')[1]!), `${name}: token in the audit log`);
  });

  test('key rotation: a token signed with a newly published key is accepted once the broker reads the JWKS again', async () => {
    const before = await idp.ciToken(main);
    await idp.rotate();
    const after = await idp.ciToken(main);
    assert.notEqual(jose.decodeProtectedHeader(after).kid, jose.decodeProtectedHeader(before).kid);
    // The broker fetches the JWKS again for an unknown key id at most once per 10 s (its cooldown).
    const started = Date.now();
    let status = 0;
    while (Date.now() - started < 15_000) {
      status = (await broker.request('GET', '/v1/whoami', after)).status;
      if (status === 200) break;
      assert.equal(status, 401);
      await sleep(500);
    }
    assert.equal(status, 200, 'the rotated key was not picked up within 15 s');
    console.log(`rotated key accepted after ${Date.now() - started} ms`);
    assert.equal((await broker.request('GET', '/v1/whoami', before)).status, 200, 'the old key is still published');
  });

  /** Waits for an auth.failed summary that carries a reason matching `re`. */
  async function reasonRecorded(re: RegExp, what = re.source): Promise<void> {
    let failures: Array<Record<string, any>> = [];
    for (let i = 0; i < 30; i++) {
      failures = broker.auditRecords().filter((r) => r.type === 'auth.failed');
      if (failures.some((r) => (r.details?.reasons ?? []).some((x: string) => re.test(x)))) return;
      await sleep(200);
    }
    assert.fail(`${what}: no auth.failed record with reason ${re}: ${JSON.stringify(failures.slice(-3))}`);
  }
});
