/**
 * The baseline of bench/credential.ts: a bare fastify route in its own Node process, answering
 * `POST /v1/tasks/:ref/credential` with a JSON body of the given size (the size of the broker's real
 * answer). No authentication, no audit, no metrics: what fastify alone costs on this machine.
 *
 *   bin/bench bare-server [TOKEN_CHARS=1000]
 */
import Fastify from 'fastify';

const tokenChars = Number(process.argv[2] ?? 1000);
const body = {
  token: 'x'.repeat(tokenChars),
  expirationTimestamp: new Date(Date.now() + 600_000).toISOString(),
  taskId: 't0123456789abcdef',
  jti: '0b7e5a4e-0000-4000-8000-000000000000',
};
const app = Fastify({ logger: false });
app.post('/v1/tasks/:ref/credential', async () => body);
const address = await app.listen({ host: '127.0.0.1', port: 0 });
process.stdout.write(`listening on ${address}\n`);
// A clean exit on SIGTERM, so that `--cpu-prof` writes its profile.
process.once('SIGTERM', () => void app.close().then(() => process.exit(0)));
