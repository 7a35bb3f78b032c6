import type { Command } from 'commander';
import type { BrokerClient } from '../client/broker-client.ts';
import type { ClientIdentity } from '../identity/client-identity.ts';

/** --broker and --broker-ca, set on the program and read by any subcommand. */
export interface BrokerFlags {
  broker?: string;
  brokerCa?: string;
}

export function addBrokerOptions(program: Command): Command {
  return program
    .option('--broker <url>', 'the broker (default: $BROKER_URL)')
    .option('--broker-ca <file>', "CA of the broker's TLS certificate, PEM (default: $BROKER_CA)");
}

/**
 * A client for the command's broker; loaded (undici) only by commands that talk to one. `identity`:
 * default the environment's or the keychain's; null for none (`broker agent enroll`).
 */
export async function clientFor(cmd: Command, identity?: ClientIdentity | null): Promise<BrokerClient> {
  const flags = cmd.optsWithGlobals<BrokerFlags>();
  const { BrokerClient } = await import('../client/broker-client.ts');
  return new BrokerClient({ broker: flags.broker, brokerCa: flags.brokerCa, ...(identity === undefined ? {} : { identity }) });
}

/** Runs `body` with a client for the command's broker, and closes it afterwards whatever happens. */
export async function withClient<T>(cmd: Command, body: (client: BrokerClient) => Promise<T>): Promise<T> {
  const client = await clientFor(cmd);
  try {
    return await body(client);
  } finally {
    await client.close();
  }
}
