/**
 * `broker login` / `logout` for people, against real parts: a certified OpenID provider on loopback
 * (device flow, authorization code + PKCE with a loopback redirect, driven by a test user agent), a
 * real OS keychain (gnome-keyring on a private D-Bus session), the broker and the API server.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { keychainGet, keychainSet, loginAccount } from '../../src/identity/keychain.ts';
import { BrokerEnv, POLICY_FILE, type BrokerProcess } from '../helpers/broker.ts';
import { TestKeyring } from '../helpers/keyring.ts';
import { kubectl, run, writeTokenKubeconfig, type RunResult } from '../helpers/kube.ts';
import { scanFiles } from '../helpers/scan.ts';
import { kubectlWith, pluginBuilds, writePluginKubeconfig } from '../helpers/exec-plugin.ts';
import { BROKER_RESOURCE, CLI_CLIENT_ID, signInAs, TestProvider } from '../helpers/oidc-provider.ts';

const MAIN = new URL('../../src/cli/main.ts', import.meta.url).pathname;

describe('broker login (issue 14)', () => {
  let idp: TestProvider;
  let keyring: TestKeyring;
  let env: BrokerEnv;
  let broker: BrokerProcess;
  const secrets: string[] = [];

  // No issuer given: `broker login` asks the broker where to sign in (GET /v1/login, from the policy's issuers[].login).
  const baseEnv = (): NodeJS.ProcessEnv => ({ PATH: process.env['PATH'] ?? '/usr/bin:/bin', BROKER_URL: broker.url, NO_COLOR: '1', ...keyring.env });
  const cli = (args: string[], base: NodeJS.ProcessEnv = baseEnv()): Promise<RunResult> => run(process.execPath, [MAIN, ...args], base);

  /** `broker login ...` in the background; the test user agent signs in at the URL it prints. */
  function loginAs(account: string, args: string[] = []): Promise<RunResult & { url: string }> {
    return new Promise((done, fail) => {
      const child = spawn(process.execPath, [MAIN, 'login', ...args], { env: baseEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      let url = '';
      const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
        const m = /to sign in, open (\S+)/.exec(stderr);
        if (m && !url) {
          url = m[1]!;
          signInAs(url, account).catch(fail);
        }
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        done({ code, stdout, stderr, url });
      });
    });
  }

  before(async () => {
    assert.ok(TestKeyring.available(), 'gnome-keyring and dbus-run-session are not installed (.ci/run installs them)');
    idp = await TestProvider.start();
    keyring = await TestKeyring.start();
    const policy =
      readFileSync(POLICY_FILE, 'utf8')
        .replace('agents:\n', `agents:\n  - name: carol\n    identities: [{ oidc: { issuer: "${idp.issuer}", subject: dev-carol } }]\n`)
        .replace('agents: [alpha, beta]', 'agents: [alpha, beta, carol]') +
      `issuers:
  - issuer: ${idp.issuer}
    audience: [${CLI_CLIENT_ID}, ${BROKER_RESOURCE}]
    groupsClaim: groups
    login: { clientId: ${CLI_CLIENT_ID} }
people:
  - name: alice
    identities: [{ oidc: { issuer: "${idp.issuer}", subject: alice } }]
approvers:
  - name: sre
    members:
      - oidcGroup: { issuer: "${idp.issuer}", group: sre }
`;
    env = await BrokerEnv.start({ policyText: policy });
    broker = await env.startBroker();
  });
  after(async () => {
    await broker?.stop();
    await env?.stop();
    await keyring?.stop();
    await idp?.stop();
  });

  test('browser flow (authorization code + PKCE, loopback redirect): signed in, whoami says from where; logout forgets it', async () => {
    const login = await loginAs('alice');
    assert.equal(login.code, 0, login.stderr);
    const url = new URL(login.url);
    assert.equal(url.searchParams.get('code_challenge_method'), 'S256');
    assert.match(url.searchParams.get('redirect_uri')!, /^http:\/\/127\.0\.0\.1:\d+\/callback$/);
    assert.match(login.stdout, new RegExp(`signed in as +${idp.issuer}#alice`));
    const stored = keychainFor();
    assert.ok(stored, 'the login is in the keychain');
    secrets.push(JSON.parse(stored).refreshToken);
    assert.deepEqual(Object.keys(JSON.parse(stored)).sort(), ['clientId', 'issuer', 'refreshToken'], 'only the refresh token is kept');

    const who = await cli(['whoami', '-o', 'json']);
    assert.equal(who.code, 0, who.stderr);
    const me = JSON.parse(who.stdout);
    assert.deepEqual([me.subject, me.method, me.principal, me.agent, me.identitySource], [`${idp.issuer}#alice`, 'oidc', 'person:alice', null, `keychain (login at ${idp.issuer})`]);

    // The ID token a login yields is refused by the API server itself (401). Fetched as the CLI does
    // (a refresh), the rotated refresh token put back; it goes on kubectl's command line, not in a file.
    const now = JSON.parse(keychainFor()!) as { refreshToken: string };
    const refreshed = (await (
      await fetch(`${idp.issuer}/token`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: now.refreshToken, client_id: CLI_CLIENT_ID }),
      })
    ).json()) as { id_token: string; refresh_token: string };
    keychainSet(loginAccount(broker.url), JSON.stringify({ ...JSON.parse(keychainFor()!), refreshToken: refreshed.refresh_token }));
    secrets.push(refreshed.refresh_token);
    const kc = writeTokenKubeconfig(join(env.dir, 'no-token.kubeconfig'), env.cluster, 'none');
    const apiserver = await kubectl(kc, '--token', refreshed.id_token, 'get', 'pods', '-n', 'team-a');
    assert.notEqual(apiserver.code, 0);
    assert.match(apiserver.stderr, /Unauthorized|must be logged in|provide credentials/);

    const out = await cli(['logout']);
    assert.equal(out.code, 0, out.stderr);
    assert.match(out.stdout, /logged out of .*; the refresh token was revoked at /);
    assert.equal(keychainFor(), undefined);
    // Revoked at the issuer too: the refresh token no longer works anywhere.
    const refresh = await fetch(`${idp.issuer}/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshed.refresh_token, client_id: CLI_CLIENT_ID }),
    });
    assert.equal(refresh.status, 400);
    assert.equal(((await refresh.json()) as { error: string }).error, 'invalid_grant');
    const after = await cli(['whoami']);
    assert.equal(after.code, 4);
    assert.match(after.stderr, /no identity: .*the keychain holds no agent key or login/);
  });

  test('device flow: the code and URL are printed; an oidcGroup approver signs in', async () => {
    const login = await loginAs('sre-bob', ['--device']);
    assert.equal(login.code, 0, login.stderr);
    assert.match(login.stderr, /to sign in, open \S+ and confirm the code \S+/);
    secrets.push(JSON.parse(keychainFor()!).refreshToken);
    const who = await cli(['whoami', '-o', 'json']);
    const me = JSON.parse(who.stdout);
    assert.deepEqual([me.principal, me.approverGroups], [`identity:${idp.issuer}#sre-bob`, ['sre']]);
    assert.equal((await cli(['logout'])).code, 0);
  });

  test('the exec plugin (each build) with a login: a fresh ID token from the keychain per run; after logout it refuses, saying why', async () => {
    const login = await loginAs('dev-carol', ['--device']);
    assert.equal(login.code, 0, login.stderr);
    secrets.push(JSON.parse(keychainFor()!).refreshToken);
    const start = await cli(['task', 'start', 'read-pods', '--namespace', 'team-a', '--name', 'carol-run']);
    assert.equal(start.code, 0, start.stderr);
    for (const build of pluginBuilds()) {
      const kc = writePluginKubeconfig(env.dir, env.cluster, broker.url, 'carol-run', build);
      const res = await kubectlWith(kc, keyring.env, 'get', 'pods', '-n', 'team-a');
      assert.equal(res.code, 0, `${build}: ${res.stderr}`);
    }
    assert.equal((await cli(['logout'])).code, 0);
    for (const build of pluginBuilds()) {
      const kc = writePluginKubeconfig(env.dir, env.cluster, broker.url, 'carol-run', build);
      const res = await kubectlWith(kc, keyring.env, 'get', 'pods', '-n', 'team-a');
      assert.notEqual(res.code, 0, build);
      assert.match(res.stderr, /no identity: set BROKER_IDENTITY_TOKEN_FILE .*or keep an agent key or a login in the OS keychain \(broker agent enroll, broker login\)/, build);
    }
  });

  test('an identity the broker does not accept: login fails and nothing is kept', async () => {
    const login = await loginAs('mallory');
    assert.equal(login.code, 4, login.stderr);
    assert.match(login.stderr, /\[unauthenticated\]/);
    assert.equal(keychainFor(), undefined);
  });

  test('no keychain: login fails before anyone signs in, naming the alternatives', async () => {
    const bare = { PATH: process.env['PATH'] ?? '/usr/bin:/bin', BROKER_URL: broker.url, BROKER_OIDC_ISSUER: idp.issuer, HOME: keyring.home };
    const r = await cli(['login'], bare);
    assert.equal(r.code, 4, r.stderr);
    assert.doesNotMatch(r.stderr, /to sign in, open/);
    assert.match(r.stderr, /the OS keychain cannot be used: .*BROKER_AGENT_KEY.*BROKER_IDENTITY_TOKEN.*\[keychain_unavailable\]/);
  });

  test('no refresh token in any file under HOME or TMPDIR', () => {
    assert.equal(secrets.length, 4);
    const found: string[] = [];
    for (const root of new Set([keyring.home, tmpdir()])) scanFiles(root, secrets, found, 0);
    assert.deepEqual(found, []);
  });

  test('where to sign in: GET /v1/login names the policy\'s login issuers without a credential; every other route still needs one', async () => {
    const res = await fetch(`${broker.url}/v1/login`);
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { issuers: [{ issuer: idp.issuer, clientId: CLI_CLIENT_ID }] });
    assert.equal((await fetch(`${broker.url}/v1/tasks`)).status, 401);
  });

  function keychainFor(): string | undefined {
    process.env['DBUS_SESSION_BUS_ADDRESS'] = keyring.address;
    return keychainGet(loginAccount(broker.url));
  }
});
