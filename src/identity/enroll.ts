/**
 * `broker agent enroll CODE`: a new Ed25519 key pair on the agent's host; the public key goes to the
 * broker with the one-time code, the private key into the OS keychain, or, with --print-key, once to
 * stdout (BROKER_AGENT_KEY, for a container's secret store). Never into a file.
 *
 * The keychain is tried before the code is used, so a host without one fails with the code intact.
 */
import type { BrokerClient } from '../client/broker-client.ts';
import { BrokerError } from '../errors.ts';
import { newAgentKey } from './agent-proof.ts';
import { agentKeyAccount, keychainGet, keychainSet } from './keychain.ts';

export interface Enrolled {
  agent: string;
  fingerprint: string;
  enrolledAt: string;
  keptIn: 'keychain' | 'printed';
  /** The private key's text, when printed instead of kept. */
  printed?: string;
}

export async function enroll(client: BrokerClient, code: string, options: { printKey: boolean }): Promise<Enrolled> {
  const account = agentKeyAccount(client.url);
  if (!options.printKey) keychainGet(account); // throws keychain_unavailable, naming the alternatives, before the code is used
  const pair = newAgentKey();
  const r = await client.enrolAgent(code, pair.publicKey);
  const text = pair.forAgent(r.agent);
  if (options.printKey) return { ...r, keptIn: 'printed', printed: text };
  try {
    keychainSet(account, text);
  } catch (err) {
    throw new BrokerError(
      'keychain_unavailable',
      `agent ${r.agent} is enrolled, but its private key could not be kept in the keychain and is gone (nothing was written elsewhere): ask for a new code (broker agent register ${r.agent}) and enroll again; ${(err as Error).message}`,
      { cause: err },
    );
  }
  return { ...r, keptIn: 'keychain' };
}
