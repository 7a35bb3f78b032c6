/**
 * The listen address, checked before anything else: `broker serve` binds it once and lets it go
 * before it loads the server or opens anything, so a port in use, a privileged port or an address
 * that is not this machine's is refused at once, with nothing left behind. Light on purpose (only
 * node:net): the CLI runs it before it loads fastify and the Kubernetes client.
 */
import { createServer } from 'node:net';
import { BrokerError } from '../errors.ts';

/**
 * Binds the listen address once and lets it go, before anything is opened: a port in use, or an
 * address that is not this machine's, is refused at once, with nothing left behind. (The real listen
 * comes last; should the port be taken in between, that fails the same way and is cleaned up.)
 */
export async function probeListen(host: string, port: number): Promise<void> {
  const server = createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port, exclusive: true }, resolve);
    });
  } catch (err) {
    throw listenError(host, port, err);
  } finally {
    await new Promise((done) => server.close(done));
  }
}

export function listenError(host: string, port: number, err: unknown): BrokerError {
  const code = (err as NodeJS.ErrnoException).code;
  const where = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  const why =
    code === 'EADDRINUSE'
      ? 'the address is already in use (another broker, or another program, listens there): stop it, or choose another port'
      : code === 'EACCES'
        ? 'permission denied (ports below 1024 need privileges): choose a port of 1024 or above'
        : code === 'EADDRNOTAVAIL'
          ? `${host} is not an address of this machine: use one of its addresses (127.0.0.1 for this machine only, 0.0.0.0 for every interface)`
          : code === 'ENOTFOUND' || code === 'EAI_AGAIN'
            ? `${host} does not resolve to an address: give an IP address`
            : (err as Error).message;
  return new BrokerError('listen_failed', `cannot listen on ${where}: ${why}`, { field: '--listen', cause: err });
}
