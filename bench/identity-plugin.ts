/**
 * The exec plugin's start-up with each identity source (issue 14): both builds, a stand-in broker on
 * loopback answering every credential request, a real keychain (gnome-keyring on a private D-Bus
 * session) and a real OpenID provider for the login path. Interleaved rounds (every variant once per
 * round, 31 rounds, medians), so a change of machine load hits them all alike; each figure also as a
 * multiple of `node -e 0` in the same rounds. Also: one keychain read and one proof, in process.
 *   bin/bench identity-plugin        (needs dist/ built: npm run build; the native build: ./install.sh)
 */
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as oidc from 'openid-client';
import { TestKeyring } from '../test/helpers/keyring.ts';
import { TestProvider, signInAs, CLI_CLIENT_ID } from '../test/helpers/oidc-provider.ts';
import { newAgentKey, parseAgentKey, proofHeader } from '../src/identity/agent-proof.ts';

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
async function time(cmd: string, args: string[], env: NodeJS.ProcessEnv, n = 15): Promise<number> {
  const xs: number[] = [];
  for (let i = 0; i < n + (n > 1 ? 2 : 0); i++) {
    const t = process.hrtime.bigint();
    const { code, stderr } = await new Promise<{ code: number | null; stderr: string }>((done) => {
      const c = spawn(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
      let e = '';
      c.stderr.on('data', (d: Buffer) => (e += d));
      c.on('close', (code) => done({ code, stderr: e }));
    });
    const ms = Number(process.hrtime.bigint() - t) / 1e6;
    if (code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${stderr}`);
    if (n === 1 || i >= 2) xs.push(ms);
  }
  return median(xs);
}
const server = createServer((req, res) => {
  req.resume();
  req.on('end', () => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: 't', expirationTimestamp: '2030-01-01T00:00:00Z' })));
});
await new Promise<void>((d) => server.listen(0, '127.0.0.1', d));
const broker = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
const keyring = await TestKeyring.start();
const idp = await TestProvider.start();
try {
  const base = { PATH: process.env['PATH']!, ...keyring.env };
  const node = process.execPath;
  const nodeEntry = 'dist/credential/main.cjs';
  const native = '.cache/bin/broker-credential';
  const args = ['--task', 'x', '--broker', broker];
  const key = newAgentKey().forAgent('bench');
  process.env['DBUS_SESSION_BUS_ADDRESS'] = keyring.address;
  const { keychainSet, keychainGet, agentKeyAccount, loginAccount } = await import('../src/identity/keychain.ts');
  keychainSet(agentKeyAccount(broker), key);
  const rows: Array<[string, number]> = [];
  const variants: Array<[string, string, string[], NodeJS.ProcessEnv]> = [
    ['node -e 0', node, ['-e', '0'], base],
    ['node plugin, BROKER_IDENTITY_TOKEN', node, [nodeEntry, ...args], { ...base, BROKER_IDENTITY_TOKEN: 'tok' }],
    ['node plugin, BROKER_AGENT_KEY', node, [nodeEntry, ...args], { ...base, BROKER_AGENT_KEY: key }],
    ['node plugin, keychain agent key', node, [nodeEntry, ...args], base],
    ['native plugin, BROKER_IDENTITY_TOKEN', native, args, { ...base, BROKER_IDENTITY_TOKEN: 'tok' }],
    ['native plugin, BROKER_AGENT_KEY', native, args, { ...base, BROKER_AGENT_KEY: key }],
    ['native plugin, keychain agent key', native, args, base],
  ];
  // Interleaved rounds: each round runs every variant once, so load changes hit them all alike.
  const samples = variants.map(() => [] as number[]);
  for (let round = 0; round < 31; round++) {
    for (const [i, [, cmd, a, e]] of variants.entries()) samples[i]!.push(await time(cmd, a, e, 1));
  }
  variants.forEach(([name], i) => rows.push([name, median(samples[i]!)]));
  // In-process costs: one keychain read, one proof.
  const reads: number[] = [];
  for (let i = 0; i < 50; i++) { const t = process.hrtime.bigint(); keychainGet(agentKeyAccount(broker)); reads.push(Number(process.hrtime.bigint() - t) / 1e6); }
  const k = parseAgentKey(key);
  const signs: number[] = [];
  for (let i = 0; i < 200; i++) { const t = process.hrtime.bigint(); proofHeader(k, 'POST', `${broker}/v1/tasks/x/credential`); signs.push(Number(process.hrtime.bigint() - t) / 1e6); }
  rows.push(['keychain read (in process, Secret Service)', median(reads)]);
  rows.push(['proof signing (in process)', median(signs)]);
  // The login path: a refresh per plugin run (discovery + token endpoint at the local issuer).
  const config = await oidc.discovery(new URL(idp.issuer), CLI_CLIENT_ID, undefined, oidc.None(), { execute: [oidc.allowInsecureRequests] });
  const da = await oidc.initiateDeviceAuthorization(config, { scope: 'openid offline_access profile' });
  await signInAs(da.verification_uri_complete!, 'bench-user');
  const tokens = await oidc.pollDeviceAuthorizationGrant(config, da);
  keychainSet(agentKeyAccount(broker), ''); // so the login is what is found
  const { keychainDelete } = await import('../src/identity/keychain.ts');
  keychainDelete(agentKeyAccount(broker));
  keychainSet(loginAccount(broker), JSON.stringify({ issuer: idp.issuer, clientId: CLI_CLIENT_ID, refreshToken: tokens.refresh_token }));
  for (const [name, cmd, pre] of [['node plugin', node, [nodeEntry]], ['native plugin', native, []]] as const) {
    rows.push([`${name}, keychain login (refresh each run)`, await time(cmd, [...pre, ...args], base)]);
  }
  const floor = rows[0]![1];
  for (const [n, ms] of rows) console.log(`${n.padEnd(48)} ${ms.toFixed(2)} ms  ${(ms / floor).toFixed(2)}x node -e 0`);
} finally {
  await keyring.stop();
  await idp.stop();
  server.close();
}
