/**
 * A real OpenID provider (the `oidc-provider` package, certified) on a random loopback port, as the
 * identity provider of the identity tests. It issues:
 *   - JWT access tokens by the client credentials grant (CI-like tokens): `sub` is the client id,
 *     `aud` the resource indicator asked for, plus the client's `repository` and `ref` claims;
 *   - ID tokens (and refresh tokens) by the device flow and the authorization code flow with PKCE
 *     to the public client `task-broker-cli`, for the account the test user agent signs in as.
 * Its signing keys can be rotated in place (same issuer, same port): `rotate()`.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as jose from 'jose';
import Provider from 'oidc-provider';

export interface CiClient {
  clientId: string;
  clientSecret: string;
  repository: string;
  ref: string;
}

export const CLI_CLIENT_ID = 'task-broker-cli';
/** The web console's public client (a web application: its redirect is the broker's https URL). */
export const CONSOLE_CLIENT_ID = 'task-broker-console';
/** The resource indicator (and so the `aud`) of CI tokens meant for the broker. */
export const BROKER_RESOURCE = 'urn:task-broker';

export class TestProvider {
  readonly issuer: string;
  readonly #server: Server;
  readonly #clients: CiClient[];
  readonly #consoleRedirect: string | undefined;
  /** Private signing keys, newest first; the provider publishes all of them and signs with the first. */
  keys: jose.JWK[];
  #handler: (req: IncomingMessage, res: ServerResponse) => void = () => undefined;

  private constructor(server: Server, issuer: string, clients: CiClient[], keys: jose.JWK[], consoleRedirect?: string) {
    this.#server = server;
    this.#consoleRedirect = consoleRedirect;
    this.issuer = issuer;
    this.#clients = clients;
    this.keys = keys;
    server.on('request', (req, res) => this.#handler(req, res));
  }

  /** `consoleRedirect`: also register the public web client CONSOLE_CLIENT_ID with this redirect URI (the web console's, https://HOST:PORT/ui/callback). */
  static async start(clients: CiClient[] = [], options: { consoleRedirect?: string } = {}): Promise<TestProvider> {
    const server = createServer();
    await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
    const issuer = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const p = new TestProvider(server, issuer, clients, [await newKey()], options.consoleRedirect);
    p.#mount();
    return p;
  }

  /** A new signing key (published first, signing from now on) beside the old ones: the issuer rotates. */
  async rotate(): Promise<void> {
    this.keys = [await newKey(), ...this.keys];
    this.#mount();
  }

  #mount(): void {
    const provider = new Provider(this.issuer, {
      jwks: { keys: this.keys },
      clients: [
        ...this.#clients.map((c) => ({
          client_id: c.clientId,
          client_secret: c.clientSecret,
          grant_types: ['client_credentials'],
          response_types: [],
          redirect_uris: [],
          token_endpoint_auth_method: 'client_secret_basic',
          repository: c.repository,
          ref: c.ref,
        })),
        {
          client_id: CLI_CLIENT_ID,
          application_type: 'native',
          token_endpoint_auth_method: 'none',
          grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
          response_types: ['code'],
          // broker login's loopback redirect, and the web console's (broker serve --ui on loopback; any port, as for a native client).
          redirect_uris: ['http://127.0.0.1/callback', 'http://127.0.0.1/ui/callback'],
        },
        ...(this.#consoleRedirect
          ? [{ client_id: CONSOLE_CLIENT_ID, application_type: 'web', token_endpoint_auth_method: 'none', grant_types: ['authorization_code'], response_types: ['code'], redirect_uris: [this.#consoleRedirect] }]
          : []),
      ],
      extraClientMetadata: { properties: ['repository', 'ref'] },
      features: {
        clientCredentials: { enabled: true },
        deviceFlow: { enabled: true },
        revocation: { enabled: true },
        devInteractions: { enabled: true },
        resourceIndicators: {
          enabled: true,
          defaultResource: () => BROKER_RESOURCE,
          useGrantedResource: () => true,
          getResourceServerInfo: (_ctx: unknown, resource: string) => ({ scope: 'broker', audience: resource, accessTokenFormat: 'jwt', accessTokenTTL: 600 }),
        },
      },
      claims: { openid: ['sub'], profile: ['name', 'groups'] },
      findAccount: (_ctx: unknown, id: string) => ({
        accountId: id,
        claims: () => ({ sub: id, name: id, groups: id.startsWith('sre-') ? ['sre'] : [] }),
      }),
      extraTokenClaims: (_ctx: unknown, token: { kind: string; clientId?: string }) => {
        const client = this.#clients.find((c) => c.clientId === token.clientId);
        return token.kind === 'ClientCredentials' && client ? { repository: client.repository, ref: client.ref } : undefined;
      },
      scopes: ['openid', 'offline_access', 'profile', 'broker'],
      pkce: { required: () => true },
      ttl: { IdToken: 600, AccessToken: 600, ClientCredentials: 600, DeviceCode: 600, RefreshToken: 3600, Interaction: 600, Session: 3600, Grant: 3600 },
      // A public native client gets refresh tokens with offline_access (the default asks for consent to it).
      issueRefreshToken: () => true,
    } as never);
    provider.proxy = false;
    this.#handler = provider.callback() as (req: IncomingMessage, res: ServerResponse) => void;
  }

  /** A client credentials token (a CI job's identity) for `resource` (its audience). */
  async ciToken(client: CiClient, resource = BROKER_RESOURCE): Promise<string> {
    const res = await fetch(`${this.issuer}/token`, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${client.clientId}:${client.clientSecret}`).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: new URLSearchParams({ grant_type: 'client_credentials', scope: 'broker', resource }),
    });
    const body = (await res.json()) as { access_token?: string; error?: string; error_description?: string };
    if (!body.access_token) throw new Error(`client credentials: ${res.status} ${body.error}: ${body.error_description}`);
    return body.access_token;
  }

  /** Signs `claims` with the issuer's current key (for tokens the provider would not issue: expired ones). */
  async sign(claims: jose.JWTPayload, key: jose.JWK = this.keys[0]!): Promise<string> {
    return new jose.SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: key.kid!, typ: 'JWT' }).sign(await jose.importJWK(key, 'RS256'));
  }

  /** The current key's public half as PEM (what an HS256-with-the-public-key forgery uses as its secret). */
  async publicKeyPem(): Promise<string> {
    const { d: _d, p: _p, q: _q, dp: _dp, dq: _dq, qi: _qi, ...pub } = this.keys[0]!;
    return jose.exportSPKI((await jose.importJWK(pub, 'RS256')) as jose.CryptoKey);
  }

  async stop(): Promise<void> {
    this.#server.closeAllConnections();
    await new Promise((done) => this.#server.close(done));
  }
}

async function newKey(): Promise<jose.JWK> {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  return { ...jwk, kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };
}

/**
 * A test user agent: opens `url` and, page after page, submits the first form as `account` would
 * (its hidden fields, `login`/`password`, a prefilled `user_code`), following redirects with its own
 * cookies, until a redirect leaves the provider (a loopback redirect_uri: fetched, so the CLI waiting
 * there receives it) or a page has no form (the device flow's success page). Returns the last page.
 */
export async function signInAs(url: string, account: string): Promise<string> {
  const jar = new Map<string, string>();
  let next = new URL(url);
  const origin = next.origin;
  let method = 'GET';
  let body: URLSearchParams | undefined;
  for (let step = 0; step < 20; step++) {
    if (next.origin !== origin) {
      const res = await fetch(next);
      return res.text();
    }
    const res = await fetch(next, {
      method,
      redirect: 'manual',
      headers: { cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; '), ...(body ? { 'content-type': 'application/x-www-form-urlencoded' } : {}) },
      ...(body ? { body } : {}),
    });
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const eq = pair!.indexOf('=');
      jar.set(pair!.slice(0, eq).trim(), pair!.slice(eq + 1).trim());
    }
    if (res.status >= 300 && res.status < 400) {
      next = new URL(res.headers.get('location')!, next);
      method = 'GET';
      body = undefined;
      continue;
    }
    const html = await res.text();
    const form = /<form\b([^>]*)>([\s\S]*?)<\/form>/i.exec(html);
    if (!form) return html;
    const action = /action="([^"]*)"/.exec(form[1]!)?.[1];
    if (!action) throw new Error(`a form without action at ${next.href}`);
    const fields = new URLSearchParams();
    for (const m of form[2]!.matchAll(/<input\b([^>]*)>/gi)) {
      const name = /name="([^"]*)"/.exec(m[1]!)?.[1];
      if (!name) continue;
      const value = unescapeHtml(/value="([^"]*)"/.exec(m[1]!)?.[1] ?? '');
      fields.set(name, name === 'login' ? account : name === 'password' ? 'any-password' : value);
    }
    next = new URL(unescapeHtml(action), next);
    method = 'POST';
    body = fields;
  }
  throw new Error('the sign-in did not end in 20 steps');
}

function unescapeHtml(s: string): string {
  return s.replaceAll('&amp;', '&').replaceAll('&quot;', '"').replaceAll('&#x3D;', '=').replaceAll('&#39;', "'").replaceAll('&lt;', '<').replaceAll('&gt;', '>');
}
