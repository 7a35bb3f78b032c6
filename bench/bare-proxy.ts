/**
 * A floor for bench/proxy.ts: the least a Node TLS pass-through costs on this machine. A node:https
 * server with the broker's certificate that forwards every request to the API server with the token
 * in BARE_PROXY_TOKEN in place of the client's Authorization header, and relays the answer. No
 * session check, no record, no limits, no metrics: what a proxy of this build costs before it does
 * any of the broker's work.
 *
 *   BARE_PROXY_TOKEN=... bin/bench bare-proxy UPSTREAM CA_FILE CERT_FILE KEY_FILE [--client dispatch|request|node] [--h2]
 *
 * --client: undici's dispatch() with a handler (default), undici's request() (a body stream per
 * answer), or node:https's own client with a keep-alive agent. --h2: HTTP/2 to the API server (undici).
 */
import { readFileSync } from 'node:fs';
import { Agent as HttpsAgent, createServer, request as httpsRequest } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { parseArgs } from 'node:util';
import { Pool, type Dispatcher } from 'undici';

const { values: flags, positionals } = parseArgs({ options: { client: { type: 'string', default: 'dispatch' }, h2: { type: 'boolean', default: false } }, allowPositionals: true });
const [upstream, caFile, certFile, keyFile] = positionals;
const token = process.env['BARE_PROXY_TOKEN'];
if (!upstream || !caFile || !certFile || !keyFile || !token) throw new Error('usage: BARE_PROXY_TOKEN=... bin/bench bare-proxy UPSTREAM CA_FILE CERT_FILE KEY_FILE [--client dispatch|request|node] [--h2]');
const ca = readFileSync(caFile);
const origin = new URL(upstream);
const pool = new Pool(origin.origin, { connect: { ca, rejectUnauthorized: true }, allowH2: flags.h2, pipelining: 1 });
const agent = new HttpsAgent({ keepAlive: true, ca, maxSockets: 64 });
const DROPPED = new Set(['authorization', 'connection', 'keep-alive', 'host', 'transfer-encoding', 'upgrade', 'te', 'trailer', 'expect']);

function forward(raw: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < raw.length; i += 2) if (!DROPPED.has(raw[i]!.toLowerCase())) out.push(raw[i]!, raw[i + 1]!);
  out.push('authorization', `Bearer ${token}`);
  return out;
}

function viaDispatch(req: IncomingMessage, res: ServerResponse): void {
  const chunks: Buffer[] = [];
  let code = 0;
  let headers: Record<string, string | string[] | undefined> = {};
  pool.dispatch(
    { origin: origin.origin, path: req.url!, method: req.method as Dispatcher.HttpMethod, headers: forward(req.rawHeaders), body: null },
    {
      onRequestStart() {},
      onResponseStart(_c, statusCode, h) {
        code = statusCode;
        headers = h as Record<string, string | string[] | undefined>;
      },
      onResponseData(_c, chunk) {
        chunks.push(chunk);
      },
      onResponseEnd() {
        delete headers['connection'];
        delete headers['keep-alive'];
        delete headers['transfer-encoding'];
        res.writeHead(code, headers as Record<string, string | string[]>);
        res.end(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks));
      },
      onResponseError(_c, err) {
        res.writeHead(502).end(String(err));
      },
    },
  );
  req.resume();
}

async function viaRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const up = await pool.request({ path: req.url!, method: req.method as Dispatcher.HttpMethod, headers: forward(req.rawHeaders), body: null });
  const chunks: Buffer[] = [];
  for await (const c of up.body) chunks.push(c as Buffer);
  const headers = { ...up.headers };
  delete headers['connection'];
  delete headers['keep-alive'];
  delete headers['transfer-encoding'];
  res.writeHead(up.statusCode, headers as Record<string, string | string[]>);
  res.end(Buffer.concat(chunks));
  req.resume();
}

function viaNode(req: IncomingMessage, res: ServerResponse): void {
  const out = httpsRequest({ host: origin.hostname, port: origin.port, path: req.url, method: req.method, headers: forward(req.rawHeaders), agent }, (up) => {
    const chunks: Buffer[] = [];
    up.on('data', (c: Buffer) => chunks.push(c));
    up.on('end', () => {
      const headers = { ...up.headers };
      delete headers['connection'];
      delete headers['keep-alive'];
      delete headers['transfer-encoding'];
      res.writeHead(up.statusCode ?? 502, headers);
      res.end(Buffer.concat(chunks));
    });
  });
  out.on('error', (err) => res.writeHead(502).end(String(err)));
  out.end();
  req.resume();
}

const server = createServer({ key: readFileSync(keyFile), cert: readFileSync(certFile), keepAliveTimeout: 5_000 }, (req, res) => {
  if (flags.client === 'request') viaRequest(req, res).catch((err: unknown) => res.writeHead(502).end(String(err)));
  else if (flags.client === 'node') viaNode(req, res);
  else viaDispatch(req, res);
});
server.listen(0, '127.0.0.1', () => {
  const a = server.address();
  process.stdout.write(`listening on https://127.0.0.1:${typeof a === 'object' && a ? a.port : 0}\n`);
});
process.once('SIGTERM', () => {
  server.close();
  void pool.close().finally(() => process.exit(0));
});
