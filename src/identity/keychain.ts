/**
 * The OS keychain (`@napi-rs/keyring`: Secret Service on Linux, Keychain on macOS, Credential Manager
 * on Windows), service `task-broker`: where an agent's private key and a person's refresh token are
 * kept. There is no fallback: with no keychain, the caller gets `keychain_unavailable` naming the
 * alternatives, and nothing is written anywhere else.
 */
import { createRequire } from 'node:module';
import { BrokerError } from '../errors.ts';

export const KEYCHAIN_SERVICE = 'task-broker';

interface KeyringEntry {
  getPassword(): string | null;
  setPassword(value: string): void;
  deletePassword(): boolean;
}
type EntryClass = new (service: string, account: string, options?: { linux?: { store?: 'secret-service' | 'keyutils' } }) => KeyringEntry;
let Entry: EntryClass | undefined;

/** What to do without a keychain: said in every keychain_unavailable error. */
export const NO_KEYCHAIN_ALTERNATIVES =
  'without a keychain: for an agent, put its key in BROKER_AGENT_KEY (`broker agent enroll CODE --print-key` prints it once; keep it in your secret store, never in a file); ' +
  'for CI or a pod, give an OIDC or ServiceAccount token in BROKER_IDENTITY_TOKEN or BROKER_IDENTITY_TOKEN_FILE; ' +
  'on Linux a keychain is a Secret Service (gnome-keyring, KeePassXC) on the D-Bus session bus, or, with BROKER_KEYCHAIN=keyutils, the kernel keyring (memory only)';

/**
 * On Linux the Secret Service, required: @napi-rs/keyring would otherwise fall back, silently, to the
 * kernel keyring (memory only, gone at reboot, readable by any process of the user). That one only
 * when asked for: BROKER_KEYCHAIN=keyutils.
 */
function linuxStore(): 'secret-service' | 'keyutils' {
  const asked = process.env['BROKER_KEYCHAIN'];
  if (asked === undefined || asked === '' || asked === 'secret-service') return 'secret-service';
  if (asked === 'keyutils') return 'keyutils';
  throw new BrokerError('invalid_argument', `BROKER_KEYCHAIN must be "secret-service" (the default) or "keyutils" (Linux's kernel keyring), got ${JSON.stringify(asked.slice(0, 40))}`, { field: 'BROKER_KEYCHAIN' });
}

function entry(account: string): KeyringEntry {
  const store = linuxStore();
  try {
    // The native module is loaded by the commands that use the keychain only.
    Entry ??= (createRequire(import.meta.url)('@napi-rs/keyring') as { Entry: EntryClass }).Entry;
    return new Entry(KEYCHAIN_SERVICE, account, { linux: { store } });
  } catch (err) {
    throw unavailable(err);
  }
}

function unavailable(err: unknown): BrokerError {
  const why = err instanceof Error ? err.message.replace(/\s+/g, ' ').slice(0, 200) : String(err);
  const bus = process.platform === 'linux' && !process.env['DBUS_SESSION_BUS_ADDRESS'] ? ' (DBUS_SESSION_BUS_ADDRESS is not set: no session bus)' : '';
  return new BrokerError('keychain_unavailable', `the OS keychain cannot be used: ${why}${bus}; ${NO_KEYCHAIN_ALTERNATIVES}`, { cause: err });
}

/** The stored value, or undefined when there is none. Throws keychain_unavailable. */
export function keychainGet(account: string): string | undefined {
  const e = entry(account);
  try {
    return e.getPassword() ?? undefined;
  } catch (err) {
    throw unavailable(err);
  }
}

export function keychainSet(account: string, value: string): void {
  const e = entry(account);
  try {
    e.setPassword(value);
  } catch (err) {
    throw unavailable(err);
  }
}

/** Whether there was a value to delete. */
export function keychainDelete(account: string): boolean {
  const e = entry(account);
  try {
    return e.getPassword() !== null && e.deletePassword();
  } catch (err) {
    throw unavailable(err);
  }
}

/** The keychain account of a broker's agent key: one per broker URL. */
export const agentKeyAccount = (brokerUrl: string) => `agent-key ${brokerUrl}`;
/** The keychain account of a person's login (refresh token) at a broker. */
export const loginAccount = (brokerUrl: string) => `login ${brokerUrl}`;
