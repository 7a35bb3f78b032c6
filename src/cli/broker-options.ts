import type { Command } from 'commander';
import type { BrokerClient } from '../client/broker-client.ts';

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

/** A client for the command's broker; loaded (undici) only by commands that talk to one. */
export async function clientFor(cmd: Command): Promise<BrokerClient> {
  const flags = cmd.optsWithGlobals<BrokerFlags>();
  const { BrokerClient } = await import('../client/broker-client.ts');
  return new BrokerClient({ broker: flags.broker, brokerCa: flags.brokerCa });
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
