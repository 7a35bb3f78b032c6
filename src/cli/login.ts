import { Command, Option } from 'commander';
import type { BrokerClient } from '../client/broker-client.ts';
import { BrokerError } from '../errors.ts';
import { clientFor } from './broker-options.ts';
import { fields, outputOption, printJson, safe, style, type OutputFormat } from './output.ts';

/** `broker login`, `broker logout`: a person's OIDC sign-in, kept in the OS keychain (docs/identity.md). */
export function loginCommands(): Command[] {
  const login = new Command('login')
    .description('sign in with your identity provider (OIDC): device code, or browser with PKCE; only the refresh token is kept, in the OS keychain')
    .addOption(new Option('--issuer <url>', 'the OIDC issuer (default: the one the broker names for sign-in, GET /v1/login)').env('BROKER_OIDC_ISSUER'))
    .addOption(new Option('--client-id <id>', 'the public client registered for task-broker at the issuer (default: the broker\'s for that issuer, else task-broker-cli)').env('BROKER_OIDC_CLIENT_ID'))
    .option('--device', 'use the device flow: print a URL and a code to confirm on any device (default: the browser flow, with a redirect to 127.0.0.1)')
    .addOption(outputOption())
    .addHelpText(
      'after',
      '\nThe broker is then asked who it takes you for; if it does not accept the identity, nothing is kept.\nWith no OS keychain it fails, naming the alternatives; nothing is ever written to a file.\n\nExample:\n  broker login --issuer https://login.example.com\n  broker login --issuer https://login.example.com --device',
    )
    .action(async (flags: { issuer?: string; clientId?: string; device?: boolean; output: OutputFormat }, cmd: Command) => {
      const { login: signIn, storeLogin } = await import('../identity/login.ts');
      const { keychainGet, loginAccount } = await import('../identity/keychain.ts');
      const { BearerIdentity } = await import('../identity/client-identity.ts');
      const probe = await clientFor(cmd, null);
      const brokerUrl = probe.url;
      let issuer: string;
      let clientId: string;
      try {
        ({ issuer, clientId } = await signInAt(probe, flags));
      } finally {
        await probe.close();
      }
      keychainGet(loginAccount(brokerUrl)); // no keychain: fail before the user signs in
      const { stored, idToken } = await signIn({
        issuer,
        clientId,
        flow: flags.device ? 'device' : 'browser',
        tell: (line) => process.stderr.write(`${line}\n`),
      });
      const client = await clientFor(cmd, new BearerIdentity(idToken, `login at ${issuer}`));
      try {
        const me = await client.whoami(); // refused: nothing is kept
        storeLogin(brokerUrl, stored);
        if (flags.output === 'json') return printJson({ ...me, identitySource: `keychain (login at ${stored.issuer})`, broker: brokerUrl });
        process.stdout.write(fields([['signed in as', safe(me.subject)], ['agent', me.agent === null ? '(none)' : safe(me.agent)], ['principal', safe(me.principal)], ['approver of', me.approverGroups.map(safe).join(', ') || '(no approver group)']]));
        process.stderr.write(style.dim(`the refresh token is in the OS keychain (service task-broker); broker logout forgets it\n`));
      } finally {
        await client.close();
      }
    });
  const logout = new Command('logout')
    .description('forget the login for this broker (the keychain entry) and revoke its refresh token at the issuer')
    .addOption(outputOption())
    .addHelpText('after', '\nExample:\n  broker logout')
    .action(async (flags: { output: OutputFormat }, cmd: Command) => {
      const { logout: signOut } = await import('../identity/login.ts');
      const probe = await clientFor(cmd, null);
      const brokerUrl = probe.url;
      await probe.close();
      const r = await signOut(brokerUrl);
      if (flags.output === 'json') return printJson({ broker: brokerUrl, loggedOut: r !== undefined, revoked: r?.revoked ?? false });
      if (!r) process.stdout.write(`no login for ${safe(brokerUrl)}\n`);
      else process.stdout.write(`logged out of ${safe(brokerUrl)}${r.revoked ? `; the refresh token was revoked at ${safe(r.issuer ?? '')}` : ''}\n`);
    });
  return [login, logout];
}

/**
 * The issuer and client to sign in with: `--issuer` (with `--client-id`, else the broker's client for
 * that issuer, else `task-broker-cli`), or the one issuer the broker names for sign-in.
 */
async function signInAt(client: BrokerClient, flags: { issuer?: string | undefined; clientId?: string | undefined }): Promise<{ issuer: string; clientId: string }> {
  const DEFAULT_CLIENT = 'task-broker-cli';
  let offered: Array<{ issuer: string; clientId: string }> = [];
  try {
    offered = (await client.loginIssuers()).issuers;
  } catch (err) {
    if (!flags.issuer) throw err;
  }
  if (flags.issuer) return { issuer: flags.issuer, clientId: flags.clientId ?? offered.find((o) => o.issuer === flags.issuer)?.clientId ?? DEFAULT_CLIENT };
  if (offered.length === 1) return { issuer: offered[0]!.issuer, clientId: flags.clientId ?? offered[0]!.clientId };
  if (offered.length === 0) {
    throw new BrokerError('invalid_argument', `the broker at ${client.url} names no issuer to sign in at (its policy's issuers have no login.clientId): pass --issuer URL`, { field: '--issuer' });
  }
  throw new BrokerError('invalid_argument', `the broker at ${client.url} names ${offered.length} issuers to sign in at: pass --issuer with one of ${offered.map((o) => safe(o.issuer)).join(', ')}`, { field: '--issuer' });
}
