/**
 * The exec plugin's start-up with each identity source (issue 14): both builds, a stand-in broker on
 * loopback answering every credential request, a real keychain (gnome-keyring on a private D-Bus
 * session) and a real OpenID provider for the login path. Interleaved rounds (every variant once per
 * round, 31 rounds, medians), so a change of machine load hits them all alike; each figure also as a
 * multiple of `node -e 0` in the same rounds. Also: one keychain read and one proof, in process.
 *
 * Where the Node build's keychain path goes, cold, each in a process of its own in the same rounds:
 * small CommonJS files that do the plugin's steps cumulatively (an empty file; + node:net; +
 * node:crypto; + a key's import and a signature; that with the key read over D-Bus, node:crypto
 * loaded while the Secret Service answers, as the plugin does; or read by @napi-rs/keyring): the
 * difference of two medians is one step's cost. (`node -e 0` loads node:crypto and the streams at start, to offer
 * them as globals: an empty file starts faster than the floor.)
 *   bin/bench identity-plugin [--baseline-plugin DIR]   (DIR: another build's dist/credential, run in the same rounds)
 * (needs dist/ built: npm run build; the native build: ./install.sh)
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import * as oidc from 'openid-client';
import { TestKeyring } from '../test/helpers/keyring.ts';
import { TestProvider, signInAs, CLI_CLIENT_ID } from '../test/helpers/oidc-provider.ts';
import { newAgentKey, parseAgentKey, proofHeader } from '../src/identity/agent-proof.ts';
import { reapedChildrenCpuMs } from './_common.ts';

const { values: flags } = parseArgs({ options: { 'baseline-plugin': { type: 'string' } } });
const baselinePlugin = flags['baseline-plugin'] ? resolve(flags['baseline-plugin'], 'main.cjs') : undefined;
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
const scripts = mkdtempSync(join(tmpdir(), 'tb-bench-steps-')); // code only: the steps below
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
  /** Name, wall-time median, mean CPU time of the process (the spawned runs only). */
  const rows: Array<[string, number, number?]> = [];
  const variants: Array<[string, string, string[], NodeJS.ProcessEnv]> = [
    ['node -e 0', node, ['-e', '0'], base],
    ['node plugin, BROKER_IDENTITY_TOKEN', node, [nodeEntry, ...args], { ...base, BROKER_IDENTITY_TOKEN: 'tok' }],
    ['node plugin, BROKER_AGENT_KEY', node, [nodeEntry, ...args], { ...base, BROKER_AGENT_KEY: key }],
    ['node plugin, keychain agent key', node, [nodeEntry, ...args], base],
    ['native plugin, BROKER_IDENTITY_TOKEN', native, args, { ...base, BROKER_IDENTITY_TOKEN: 'tok' }],
    ['native plugin, BROKER_AGENT_KEY', native, args, { ...base, BROKER_AGENT_KEY: key }],
    ['native plugin, keychain agent key', native, args, base],
    ...(baselinePlugin ? [[`node plugin (${flags['baseline-plugin']}), keychain agent key`, node, [baselinePlugin, ...args], base] as [string, string, string[], NodeJS.ProcessEnv]] : []),
  ];
  // The keychain path's steps, cold, cumulative (see the header).
  const ss = resolve('dist/credential/secret-service.cjs');
  const account = JSON.stringify(agentKeyAccount(broker));
  const step = {
    net: `process.getBuiltinModule('node:net');`,
    crypto: `const c = process.getBuiltinModule('node:crypto');`,
    sign: `const sign = (seed) => { const k = c.createPrivateKey({ key: Buffer.concat([Buffer.from('302e020100300506032b657004220420', 'hex'), seed]), format: 'der', type: 'pkcs8' }); c.sign(null, Buffer.from('x'.repeat(200)), k); c.randomBytes(16); };`,
    dbus: `require(${JSON.stringify(ss)}).secretServiceGet(require(${JSON.stringify(ss)}).sessionBusPath(process.env.DBUS_SESSION_BUS_ADDRESS), 'task-broker', ${account}, 5000)`,
    addon: `const { Entry } = require(${JSON.stringify(resolve('node_modules/@napi-rs/keyring'))});`,
    addonRead: `new Entry('task-broker', ${account}, { linux: { store: 'secret-service' } }).getPassword()`,
  };
  const seedOf = (v: string) => `Buffer.from(${v}.split('.')[2], 'base64url')`;
  // As the plugin: the read sent, node:crypto loaded while the Secret Service answers, then the key.
  const files: Array<[string, string]> = [
    ['step: an empty file', ''],
    ['step: + node:net', step.net],
    ['step: + node:crypto', `${step.net} ${step.crypto}`],
    ['step: + a key imported, a signature', `${step.net} ${step.crypto} ${step.sign} sign(Buffer.alloc(32, 7));`],
    ['step: the key read over D-Bus instead (node:crypto meanwhile)', `${step.net} const read = ${step.dbus}; ${step.crypto} ${step.sign} read.then((v) => sign(${seedOf('v')}));`],
    ['step: the key read by @napi-rs/keyring instead', `${step.net} ${step.addon} const v = ${step.addonRead}; ${step.crypto} ${step.sign} sign(${seedOf('v')});`],
  ];
  for (const [i, [name, code]] of files.entries()) {
    const file = join(scripts, `step${i}.cjs`);
    writeFileSync(file, code);
    variants.push([name, node, [file], base]);
  }
  // Interleaved rounds: each round runs every variant once, so load changes hit them all alike.
  const samples = variants.map(() => [] as number[]);
  const cpu = variants.map(() => 0); // each run's CPU is its process's alone: one child at a time
  for (let round = 0; round < 31; round++) {
    for (const [i, [, cmd, a, e]] of variants.entries()) {
      const before = reapedChildrenCpuMs('self');
      samples[i]!.push(await time(cmd, a, e, 1));
      cpu[i]! += reapedChildrenCpuMs('self') - before;
    }
  }
  variants.forEach(([name], i) => rows.push([name, median(samples[i]!), cpu[i]! / 31]));
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
  const { loadavg } = await import('node:os');
  console.log(`load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}; medians of 31 interleaved rounds`);
  const floorCpu = rows[0]![2]!;
  console.log(`${''.padEnd(60)} wall (median)             CPU (user+sys, mean)`);
  for (const [n, ms, c] of rows) {
    const cpuText = c === undefined ? '' : `${c.toFixed(1).padStart(6)} ms  ${(c / floorCpu).toFixed(2)}x`;
    console.log(`${n.padEnd(60)} ${ms.toFixed(2).padStart(7)} ms  ${(ms / floor).toFixed(2)}x node -e 0   ${cpuText}`);
  }
} finally {
  await keyring.stop();
  await idp.stop();
  server.close();
  rmSync(scripts, { recursive: true, force: true });
}
