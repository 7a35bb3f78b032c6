/**
 * The caller's side: which identity the CLI presents to a broker, and how. In this order:
 *   1. BROKER_IDENTITY_TOKEN_FILE, else BROKER_IDENTITY_TOKEN: a bearer token (a ServiceAccount token
 *      with the broker's audience, or an OIDC token a CI system gives its jobs);
 *   2. BROKER_AGENT_KEY: an agent key (containers without a keychain), a signed proof per request;
 *   3. the OS keychain: this broker's agent key (`broker agent enroll`), else a login (`broker login`).
 * Nothing is ever read from or written to a file of ours.
 */
import { readFileSync } from 'node:fs';
import { BrokerError } from '../errors.ts';
import { parseAgentKey, proofHeader, type AgentKey } from './agent-proof.ts';
import { agentKeyAccount, keychainGet, loginAccount, NO_KEYCHAIN_ALTERNATIVES } from './keychain.ts';

export interface ClientIdentity {
  /** Where the identity came from, for messages and `broker whoami`: `BROKER_AGENT_KEY`, `keychain (agent key)`, ... */
  readonly source: string;
  /** The Authorization header value for one request. */
  authorization(method: string, url: string): Promise<string> | string;
}

export class BearerIdentity implements ClientIdentity {
  readonly source: string;
  readonly #token: string;
  constructor(token: string, source: string) {
    this.#token = token;
    this.source = source;
  }
  authorization(): string {
    return `Bearer ${this.#token}`;
  }
}

export class AgentKeyIdentity implements ClientIdentity {
  readonly source: string;
  readonly key: AgentKey;
  constructor(key: AgentKey, source: string) {
    this.key = key;
    this.source = source;
  }
  authorization(method: string, url: string): string {
    return proofHeader(this.key, method, url);
  }
}

/** A person's login (`broker login`): openid-client is loaded only when a request needs its ID token (src/identity/login.ts). */
class StoredLoginIdentity implements ClientIdentity {
  readonly source: string;
  readonly #text: string;
  readonly #brokerUrl: string;
  #inner: Promise<ClientIdentity> | undefined;

  constructor(text: string, brokerUrl: string) {
    this.#text = text;
    this.#brokerUrl = brokerUrl;
    let issuer = 'an unreadable issuer';
    try {
      issuer = String((JSON.parse(text) as { issuer?: unknown }).issuer);
    } catch {
      // said when it is used
    }
    this.source = `keychain (login at ${issuer})`;
  }

  async authorization(method: string, url: string): Promise<string> {
    this.#inner ??= import('./login.ts').then(({ LoginIdentity, parseStoredLogin }) => {
      try {
        return new LoginIdentity(parseStoredLogin(this.#text), this.#brokerUrl);
      } catch {
        throw new BrokerError('unauthenticated', `the keychain's login for ${this.#brokerUrl} is unreadable: run broker logout, then broker login`);
      }
    });
    return (await this.#inner).authorization(method, url);
  }
}

export const GET_IDENTITY =
  'an identity is one of: an agent key (`broker agent enroll CODE` with a code from your administrator; kept in the OS keychain, or in BROKER_AGENT_KEY), ' +
  'a login for people (`broker login`), an OIDC token a CI system gives its jobs or a ServiceAccount token with the broker\'s audience (BROKER_IDENTITY_TOKEN or BROKER_IDENTITY_TOKEN_FILE)';

/** Reads `tbak1.AGENT.SEED`; a malformed value is an error naming the variable, never quoting it. */
function agentKeyFrom(text: string, source: string): AgentKeyIdentity {
  try {
    return new AgentKeyIdentity(parseAgentKey(text), source);
  } catch (err) {
    throw new BrokerError('unauthenticated', `${source} is not an agent key: ${(err as Error).message}`);
  }
}

/** The environment's identity (steps 1 and 2), or undefined when it names none. */
export function envIdentity(env: NodeJS.ProcessEnv): ClientIdentity | undefined {
  const file = env['BROKER_IDENTITY_TOKEN_FILE'];
  if (file) {
    let token: string;
    try {
      token = readFileSync(file, 'utf8').trim();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const what = code === 'ENOENT' ? 'which does not exist' : code === 'EACCES' ? 'which you may not read' : `which cannot be read (${code})`;
      throw new BrokerError('unauthenticated', `BROKER_IDENTITY_TOKEN_FILE points at ${file}, ${what}; ${GET_IDENTITY}`);
    }
    if (!token) throw new BrokerError('unauthenticated', `BROKER_IDENTITY_TOKEN_FILE points at ${file}, which is empty; ${GET_IDENTITY}`);
    return new BearerIdentity(token, `BROKER_IDENTITY_TOKEN_FILE=${file}`);
  }
  const token = env['BROKER_IDENTITY_TOKEN']?.trim();
  if (token) return new BearerIdentity(token, 'BROKER_IDENTITY_TOKEN');
  const key = env['BROKER_AGENT_KEY']?.trim();
  if (key) return agentKeyFrom(key, 'BROKER_AGENT_KEY');
  return undefined;
}

/**
 * The identity to present to `brokerUrl`: the environment's, else the keychain's. Without any, an
 * `unauthenticated` error listing every way to get one (and why the keychain could not be asked).
 */
export function resolveIdentity(env: NodeJS.ProcessEnv, brokerUrl: string): ClientIdentity {
  const fromEnv = envIdentity(env);
  if (fromEnv) return fromEnv;
  let keychainProblem = '';
  try {
    const key = keychainGet(agentKeyAccount(brokerUrl));
    if (key) return agentKeyFrom(key, 'keychain (agent key)');
    const login = keychainGet(loginAccount(brokerUrl));
    if (login) return new StoredLoginIdentity(login, brokerUrl);
  } catch (err) {
    if (!(err instanceof BrokerError && err.code === 'keychain_unavailable')) throw err;
    keychainProblem = ` (the OS keychain could not be asked: ${err.message.split(';')[0]!.replace(/^the OS keychain cannot be used: /, '')})`;
  }
  throw new BrokerError(
    'unauthenticated',
    `no identity: none of BROKER_IDENTITY_TOKEN_FILE, BROKER_IDENTITY_TOKEN, BROKER_AGENT_KEY is set, and the keychain holds no agent key or login for ${brokerUrl}${keychainProblem}; ${GET_IDENTITY}${keychainProblem ? `; ${NO_KEYCHAIN_ALTERNATIVES}` : ''}`,
  );
}
