/**
 * `broker login` for people (openid-client): the device authorization flow (the code and URL are
 * printed; sign in on any device), or the authorization code flow with PKCE and a loopback redirect
 * (the URL is printed; the browser comes back to 127.0.0.1 on a random port). Only the refresh token
 * is kept, in the OS keychain; each later command refreshes it for a fresh ID token, held in memory.
 * `broker logout` forgets it and revokes it at the issuer.
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as oidc from 'openid-client';
import { BrokerError } from '../errors.ts';
import type { ClientIdentity } from './client-identity.ts';
import { keychainDelete, keychainGet, keychainSet, loginAccount } from './keychain.ts';

/** The client id `broker login` uses unless told otherwise: register it at your issuer as a public (native) client. */
export const DEFAULT_CLIENT_ID = 'task-broker-cli';
const SCOPE = 'openid offline_access profile';

/** What the keychain entry `login BROKER_URL` holds. */
export interface StoredLogin {
  issuer: string;
  clientId: string;
  refreshToken: string;
}

export interface LoginOptions {
  issuer: string;
  clientId: string;
  flow: 'device' | 'browser';
  /** Where the user is told what to do (stderr). */
  tell: (line: string) => void;
  /** How long to wait for the user. Default 10 minutes. */
  timeoutMs?: number;
}

async function configFor(issuer: string, clientId: string): Promise<oidc.Configuration> {
  let url: URL;
  try {
    url = new URL(issuer);
  } catch {
    throw new BrokerError('invalid_argument', `--issuer ${JSON.stringify(issuer)} is not a URL`, { field: '--issuer' });
  }
  const loopback = url.protocol === 'http:' && ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
  if (url.protocol !== 'https:' && !loopback) throw new BrokerError('invalid_argument', '--issuer must be an https URL (http only on loopback)', { field: '--issuer' });
  try {
    return await oidc.discovery(url, clientId, undefined, oidc.None(), loopback ? { execute: [oidc.allowInsecureRequests] } : {});
  } catch (err) {
    throw new BrokerError('identity_provider_unavailable', `the OIDC issuer ${issuer} could not be read: ${(err as Error).message}`, { cause: err });
  }
}

/** Signs the user in; returns what to keep (and the first ID token, for checking it with the broker). */
export async function login(options: LoginOptions): Promise<{ stored: StoredLogin; idToken: string }> {
  const config = await configFor(options.issuer, options.clientId);
  const tokens = options.flow === 'device' ? await deviceFlow(config, options) : await browserFlow(config, options);
  const idToken = tokens.id_token;
  if (!tokens.refresh_token) throw new BrokerError('unauthenticated', `${options.issuer} gave no refresh token (the client needs the offline_access scope and the refresh_token grant)`);
  if (!idToken) throw new BrokerError('unauthenticated', `${options.issuer} gave no ID token`);
  return { stored: { issuer: options.issuer, clientId: options.clientId, refreshToken: tokens.refresh_token }, idToken };
}

async function deviceFlow(config: oidc.Configuration, options: LoginOptions) {
  const start = await oidc.initiateDeviceAuthorization(config, { scope: SCOPE });
  options.tell(`to sign in, open ${start.verification_uri_complete ?? start.verification_uri} and confirm the code ${start.user_code}`);
  const signal = AbortSignal.timeout(options.timeoutMs ?? 600_000);
  try {
    return await oidc.pollDeviceAuthorizationGrant(config, start, undefined, { signal });
  } catch (err) {
    throw new BrokerError('unauthenticated', `the sign-in did not complete: ${(err as Error).message}`, { cause: err });
  }
}

async function browserFlow(config: oidc.Configuration, options: LoginOptions) {
  const verifier = oidc.randomPKCECodeVerifier();
  const state = oidc.randomState();
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  try {
    const redirectUri = `http://127.0.0.1:${(server.address() as AddressInfo).port}/callback`;
    const url = oidc.buildAuthorizationUrl(config, {
      redirect_uri: redirectUri,
      scope: SCOPE,
      code_challenge: await oidc.calculatePKCECodeChallenge(verifier),
      code_challenge_method: 'S256',
      state,
      prompt: 'consent', // issuers grant offline_access (a refresh token) only with consent
    });
    options.tell(`to sign in, open ${url.href}`);
    const callback = await new Promise<URL>((done, fail) => {
      const timer = setTimeout(() => fail(new BrokerError('unauthenticated', 'the sign-in did not complete in time')), options.timeoutMs ?? 600_000);
      server.on('request', (req, res) => {
        const u = new URL(req.url ?? '/', redirectUri);
        if (u.pathname !== '/callback') {
          res.writeHead(404).end();
          return;
        }
        res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' }).end('Signed in to task-broker. You can close this window.\n');
        clearTimeout(timer);
        done(u);
      });
    });
    try {
      return await oidc.authorizationCodeGrant(config, callback, { pkceCodeVerifier: verifier, expectedState: state });
    } catch (err) {
      throw new BrokerError('unauthenticated', `the sign-in failed: ${(err as Error).message}`, { cause: err });
    }
  } finally {
    server.closeAllConnections();
    server.close();
  }
}

export function storeLogin(brokerUrl: string, stored: StoredLogin): void {
  keychainSet(loginAccount(brokerUrl), JSON.stringify(stored));
}

export function parseStoredLogin(text: string): StoredLogin {
  const v = JSON.parse(text) as Partial<StoredLogin>;
  if (typeof v.issuer !== 'string' || typeof v.clientId !== 'string' || typeof v.refreshToken !== 'string') throw new Error('not a login');
  return v as StoredLogin;
}

/** Forgets the login for `brokerUrl` and revokes its refresh token at the issuer (best effort). Whether there was one. */
export async function logout(brokerUrl: string): Promise<{ issuer?: string; revoked: boolean } | undefined> {
  const text = keychainGet(loginAccount(brokerUrl));
  if (text === undefined) return undefined;
  keychainDelete(loginAccount(brokerUrl));
  let stored: StoredLogin;
  try {
    stored = parseStoredLogin(text);
  } catch {
    return { revoked: false };
  }
  try {
    const config = await configFor(stored.issuer, stored.clientId);
    if (!config.serverMetadata().revocation_endpoint) return { issuer: stored.issuer, revoked: false };
    await oidc.tokenRevocation(config, stored.refreshToken, { token_type_hint: 'refresh_token' });
    return { issuer: stored.issuer, revoked: true };
  } catch {
    return { issuer: stored.issuer, revoked: false };
  }
}

/**
 * A person's login as the CLI's identity: a fresh ID token from the refresh token, once per process
 * (kept in memory while it has more than 30 s left); a rotated refresh token goes back to the keychain.
 */
export class LoginIdentity implements ClientIdentity {
  readonly source: string;
  readonly #brokerUrl: string;
  #stored: StoredLogin;
  #idToken: { token: string; until: number } | undefined;

  constructor(stored: StoredLogin, brokerUrl: string) {
    this.#stored = stored;
    this.#brokerUrl = brokerUrl;
    this.source = `keychain (login at ${stored.issuer})`;
  }

  async authorization(): Promise<string> {
    if (this.#idToken && this.#idToken.until > Date.now() + 30_000) return `Bearer ${this.#idToken.token}`;
    const config = await configFor(this.#stored.issuer, this.#stored.clientId);
    let tokens;
    try {
      tokens = await oidc.refreshTokenGrant(config, this.#stored.refreshToken, { scope: SCOPE });
    } catch (err) {
      throw new BrokerError('unauthenticated', `the login at ${this.#stored.issuer} is no longer valid (${(err as Error).message}): run broker login again`, { cause: err });
    }
    if (!tokens.id_token) throw new BrokerError('unauthenticated', `${this.#stored.issuer} gave no ID token on refresh: run broker login again`);
    if (tokens.refresh_token && tokens.refresh_token !== this.#stored.refreshToken) {
      this.#stored = { ...this.#stored, refreshToken: tokens.refresh_token };
      storeLogin(this.#brokerUrl, this.#stored);
    }
    const exp = tokens.claims()?.exp;
    this.#idToken = { token: tokens.id_token, until: typeof exp === 'number' ? exp * 1000 : Date.now() + 60_000 };
    return `Bearer ${tokens.id_token}`;
  }
}
