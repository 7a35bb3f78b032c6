/**
 * The exec plugin's identities beyond a bearer token in the environment (docs/identity.md), loaded by
 * src/credential/main.cts only when the environment names no token, so that path stays as lean:
 *   - BROKER_AGENT_KEY: an agent key; a proof signed for this one request (node:crypto only);
 *   - the OS keychain (service `task-broker`; on Linux the Secret Service, or the kernel keyring with
 *     BROKER_KEYCHAIN=keyutils): this broker's agent key, else a person's login, whose refresh token
 *     is traded for a fresh ID token at the issuer on each run (the ID token is kept nowhere; a
 *     rotated refresh token goes back to the keychain). On Linux the Secret Service is read over the
 *     session bus directly (src/credential/secret-service.cts: @napi-rs/keyring's addon and its
 *     session's key exchange cost each run about 7 ms more); elsewhere, with the kernel keyring, and
 *     for every write, through @napi-rs/keyring.
 * The proof is the format of src/identity/agent-proof.ts, written again here with no imports (this
 * file is CommonJS, like the plugin); the integration tests run both against the same broker.
 */
import type * as CryptoModule from 'node:crypto';
import type * as HttpModule from 'node:http';
import type { SecretServiceModule } from './secret-service.cts';

export interface PluginIdentity {
  source: string;
  /** The Authorization header value for one request. */
  authorization(method: string, url: string): Promise<string>;
}

export interface IdentityModule {
  fromAgentKeyOrKeychain(env: NodeJS.ProcessEnv, brokerUrl: string, fail: (message: string) => Error, timeoutMs: number): Promise<PluginIdentity | undefined>;
}

const SERVICE = 'task-broker';
const PKCS8_ED25519_PREFIX = '302e020100300506032b657004220420';

function agentKeyIdentity(text: string, source: string, fail: (message: string) => Error): PluginIdentity {
  const parts = text.trim().split('.');
  const seed = parts.length === 3 && parts[0] === 'tbak1' && parts[1] ? Buffer.from(parts[2]!, 'base64url') : undefined;
  if (!seed || seed.length !== 32) throw fail(`${source} is not an agent key (the form is tbak1.AGENT.SEED)`);
  const crypto = process.getBuiltinModule('node:crypto') as typeof CryptoModule;
  const key = crypto.createPrivateKey({ key: Buffer.concat([Buffer.from(PKCS8_ED25519_PREFIX, 'hex'), seed]), format: 'der', type: 'pkcs8' });
  const agent = parts[1]!;
  const b64 = (s: string) => Buffer.from(s).toString('base64url');
  return {
    source,
    async authorization(method, url) {
      const iat = Math.floor(Date.now() / 1000);
      const claims = { sub: agent, htm: method, htu: url, iat, exp: iat + 30, jti: crypto.randomBytes(16).toString('base64url') };
      const input = `${b64('{"alg":"EdDSA","typ":"agent-proof+jwt"}')}.${b64(JSON.stringify(claims))}`;
      return `AgentProof ${input}.${crypto.sign(null, Buffer.from(input), key).toString('base64url')}`;
    },
  };
}

interface KeyringEntry {
  getPassword(): string | null;
  setPassword(value: string): void;
}

function keychainEntry(env: NodeJS.ProcessEnv, account: string): KeyringEntry {
  const store = env['BROKER_KEYCHAIN'] === 'keyutils' ? 'keyutils' : 'secret-service';
  const { Entry } = require('@napi-rs/keyring') as { Entry: new (s: string, a: string, o: object) => KeyringEntry };
  return new Entry(SERVICE, account, { linux: { store } });
}

function unusable(fail: (message: string) => Error, why: string): Error {
  return fail(
    'no identity: set BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN, or BROKER_AGENT_KEY; ' +
      `the OS keychain, where broker agent enroll and broker login keep theirs, cannot be used: ${why.replace(/\s+/g, ' ').slice(0, 160)}`,
  );
}

/**
 * The keychain's entry ACCOUNT. On Linux with the Secret Service and a session bus on a Unix socket,
 * read over the bus (secret-service.cts); node:crypto is loaded while the Secret Service answers, as
 * the agent key, the likely answer, needs it. Otherwise through @napi-rs/keyring.
 */
async function keychainGet(env: NodeJS.ProcessEnv, account: string, fail: (message: string) => Error, timeoutMs: number): Promise<string | undefined> {
  if (process.platform === 'linux' && env['BROKER_KEYCHAIN'] !== 'keyutils') {
    const ss = require(__filename.endsWith('.cts') ? './secret-service.cts' : './secret-service.cjs') as SecretServiceModule;
    const socket = ss.sessionBusPath(env['DBUS_SESSION_BUS_ADDRESS']);
    if (socket !== undefined) {
      const read = ss.secretServiceGet(socket, SERVICE, account, timeoutMs);
      read.catch(() => {}); // handled below; loading node:crypto first must not leave it unhandled
      process.getBuiltinModule('node:crypto');
      try {
        return await read;
      } catch (err) {
        throw unusable(fail, (err as Error).message);
      }
    }
  }
  try {
    return keychainEntry(env, account).getPassword() ?? undefined;
  } catch (err) {
    throw unusable(fail, String((err as Error).message));
  }
}

/**
 * One GET (or, with `form`, a form POST) to the issuer, its body as text; no redirect followed, 10 s
 * at most. node:http(s) rather than fetch: fetch's first use costs the plugin far more start-up.
 */
function request(url: string, form?: string): Promise<string> {
  const u = new URL(url);
  const http = process.getBuiltinModule(u.protocol === 'https:' ? 'node:https' : 'node:http') as typeof HttpModule;
  return new Promise((done, failed) => {
    const req = http.request(
      u,
      {
        method: form === undefined ? 'GET' : 'POST',
        timeout: 10_000,
        headers: { accept: 'application/json', ...(form === undefined ? {} : { 'content-type': 'application/x-www-form-urlencoded', 'content-length': Buffer.byteLength(form) }) },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          const status = res.statusCode ?? 0;
          if (status >= 300 && status < 400) failed(new Error(`status ${status}, a redirect (not followed)`));
          else if (status >= 400 && !text.startsWith('{')) failed(new Error(`status ${status}`));
          else done(text);
        });
        res.on('error', failed);
      },
    );
    req.on('timeout', () => req.destroy(new Error('timed out after 10 s')));
    req.on('error', failed);
    req.end(form);
  });
}

/** A person's login: the refresh token traded for an ID token at the issuer's token endpoint. */
function loginIdentity(text: string, env: NodeJS.ProcessEnv, account: string, fail: (message: string) => Error): PluginIdentity {
  let stored: { issuer?: unknown; clientId?: unknown; refreshToken?: unknown };
  try {
    stored = JSON.parse(text) as typeof stored;
  } catch {
    stored = {};
  }
  const { issuer, clientId, refreshToken } = stored;
  if (typeof issuer !== 'string' || typeof clientId !== 'string' || typeof refreshToken !== 'string') throw fail('the keychain\'s login is unreadable: run broker logout, then broker login');
  return {
    source: `keychain (login at ${issuer})`,
    async authorization() {
      let idToken: unknown;
      try {
        const meta = JSON.parse(await request(`${issuer.replace(/\/$/, '')}/.well-known/openid-configuration`)) as { token_endpoint?: string };
        if (typeof meta.token_endpoint !== 'string') throw new Error('no token_endpoint');
        const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshToken, client_id: clientId, scope: 'openid offline_access profile' }).toString();
        const body = JSON.parse(await request(meta.token_endpoint, form)) as { id_token?: unknown; refresh_token?: unknown; error?: unknown };
        if (typeof body.error === 'string') throw new Error(body.error);
        idToken = body.id_token;
        // An issuer that rotates refresh tokens has just used this one up: the new one goes back to the keychain.
        if (typeof body.refresh_token === 'string' && body.refresh_token !== refreshToken) {
          keychainEntry(env, account).setPassword(JSON.stringify({ issuer, clientId, refreshToken: body.refresh_token }));
        }
      } catch (err) {
        throw fail(`the login at ${issuer} could not be refreshed (${(err as Error).message}): run broker login again`);
      }
      if (typeof idToken !== 'string' || !/^[\x21-\x7e]+$/.test(idToken)) throw fail(`${issuer} gave no ID token on refresh: run broker login again`);
      return `Bearer ${idToken}`;
    },
  };
}

/** BROKER_AGENT_KEY, else the keychain's agent key or login for `brokerUrl`; undefined when there is none. */
async function fromAgentKeyOrKeychain(env: NodeJS.ProcessEnv, brokerUrl: string, fail: (message: string) => Error, timeoutMs: number): Promise<PluginIdentity | undefined> {
  const key = env['BROKER_AGENT_KEY']?.trim();
  if (key) return agentKeyIdentity(key, 'BROKER_AGENT_KEY', fail);
  const stored = await keychainGet(env, `agent-key ${brokerUrl}`, fail, timeoutMs);
  if (stored) return agentKeyIdentity(stored, 'keychain (agent key)', fail);
  const login = await keychainGet(env, `login ${brokerUrl}`, fail, timeoutMs);
  if (login) return loginIdentity(login, env, `login ${brokerUrl}`, fail);
  return undefined;
}

module.exports = { fromAgentKeyOrKeychain } satisfies IdentityModule;
