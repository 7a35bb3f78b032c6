/**
 * `broker credential`: the client-go exec credential plugin. kubectl runs it on every invocation, so
 * it is built to start as fast as Node itself: a CommonJS file (the ES module loader costs ~2.5 ms
 * more to start), no imports at all (built-in modules come from process.getBuiltinModule), no CLI
 * libraries, no Kubernetes client.
 *
 * It reads the caller's identity, asks the broker for the current task's token, and prints an
 * ExecCredential on stdout in the apiVersion that KUBERNETES_EXEC_INFO asks for. Messages go to
 * stderr and say what to do. It writes no file and keeps nothing: the broker holds the token.
 *
 * The identity token goes to the configured broker URL and nowhere else: no redirect is followed, and
 * plain http:// is allowed only to loopback. One deadline covers the whole request.
 *
 * Exit codes as the CLI's (docs/cli.md): 0 ok, 1 error, 2 usage, 3 approval required,
 * 4 not authenticated, 5 unavailable.
 *
 * A failed run is run again: client-go keeps only a credential, never a failure, and kubectl's
 * discovery asks for one before each of its steps (five runs for one refused `kubectl get` without a
 * discovery cache). So a run that finds its parent has already waited for a child prints only the
 * first line of its message (see ranBefore).
 */
import type * as FsModule from 'node:fs';
import type * as NetModule from 'node:net';
import type * as TlsModule from 'node:tls';
import type { IdentityModule, PluginIdentity } from './identity.cts';

const fs = process.getBuiltinModule('node:fs') as typeof FsModule;

const EXIT = { ok: 0, error: 1, usage: 2, approval: 3, unauthenticated: 4, unavailable: 5 } as const;
const API_VERSIONS = ['client.authentication.k8s.io/v1', 'client.authentication.k8s.io/v1beta1'];
/** Seconds for the whole request (DNS, connect, TLS, sending, headers, body); BROKER_CREDENTIAL_TIMEOUT sets it. */
const DEFAULT_TIMEOUT_S = 10;
const MAX_TIMEOUT_S = 300;

class PluginError extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode: number) {
    super(message);
    this.exitCode = exitCode;
  }
}

interface Options {
  task: string;
  broker: string;
  /** Where the broker URL came from, for messages: --broker or BROKER_URL. */
  brokerFrom: string;
  brokerCa: string | undefined;
  timeoutS: number;
  /** `proxy`: a session token for the broker's proxy; `direct`: the task's token. */
  via: 'direct' | 'proxy';
}

export interface PluginModule {
  run(io: PluginIo): Promise<number>;
  parseResponse(raw: Buffer): Reply;
}

interface PluginIo {
  argv: string[];
  env: NodeJS.ProcessEnv;
  stdout: (s: string) => void;
  stderr: (s: string) => void;
  /** The process that runs the plugin (kubectl), when the plugin is its own process: see ranBefore. */
  ppid?: number;
}

const USAGE = `usage: broker credential --task NAME [--broker URL] [--broker-ca FILE] [--via direct|proxy]

The kubectl exec credential plugin: prints an ExecCredential for the task NAME.
--via proxy asks for a session token for the broker's Kubernetes API proxy (the task's own
token then stays in the broker); --via direct (the default) for the task's token itself.
Broker URL and CA also come from BROKER_URL and BROKER_CA; the caller's identity from
BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN,
else BROKER_AGENT_KEY, else the OS keychain (broker agent enroll, broker login).
The broker URL must be https:// (http:// only to loopback); redirects are refused. The whole
request must end within BROKER_CREDENTIAL_TIMEOUT seconds (default 10).

Example:
  broker credential --task deploy --broker https://broker.example:8443

kubectl runs it from a kubeconfig user (\`broker kubeconfig\` writes one):
  exec:
    apiVersion: client.authentication.k8s.io/v1
    command: broker
    args: [credential, --task, deploy]
    interactiveMode: Never
`;

function parseArgs(argv: string[], env: NodeJS.ProcessEnv): Options | 'help' {
  let task: string | undefined;
  let broker = env['BROKER_URL'];
  let brokerFrom = 'BROKER_URL';
  let brokerCa = env['BROKER_CA'];
  let via: Options['via'] = 'direct';
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.indexOf('=');
    const [flag, inline] = arg.startsWith('--') && eq > 0 ? [arg.slice(0, eq), arg.slice(eq + 1)] : [arg, undefined];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined || v === '') throw new PluginError(`${flag} needs a value\n${USAGE}`, EXIT.usage);
      return v;
    };
    switch (flag) {
      case '--task':
        task = value();
        break;
      case '--broker':
        broker = value();
        brokerFrom = '--broker';
        break;
      case '--broker-ca':
        brokerCa = value();
        break;
      case '--via': {
        const v = value();
        if (v !== 'direct' && v !== 'proxy') throw new PluginError(`--via must be direct or proxy, not ${JSON.stringify(v)}\n${USAGE}`, EXIT.usage);
        via = v;
        break;
      }
      case '-h':
      case '--help':
        return 'help';
      default:
        throw new PluginError(`unknown argument ${JSON.stringify(arg)}\n${USAGE}`, EXIT.usage);
    }
  }
  if (!task) throw new PluginError(`--task is required\n${USAGE}`, EXIT.usage);
  if (!broker) throw new PluginError('no broker: pass --broker URL or set BROKER_URL', EXIT.usage);
  let timeoutS = DEFAULT_TIMEOUT_S;
  const rawTimeout = env['BROKER_CREDENTIAL_TIMEOUT'];
  if (rawTimeout) {
    timeoutS = /^[1-9][0-9]{0,2}$/.test(rawTimeout) ? Number(rawTimeout) : 0;
    if (timeoutS < 1 || timeoutS > MAX_TIMEOUT_S) {
      throw new PluginError(`BROKER_CREDENTIAL_TIMEOUT must be a whole number of seconds from 1 to ${MAX_TIMEOUT_S}, not ${JSON.stringify(rawTimeout)}`, EXIT.usage);
    }
  }
  return { task, broker: broker.replace(/\/+$/, ''), brokerFrom, brokerCa, timeoutS, via };
}

/** The only hosts plain http:// may reach: 127.0.0.0/8, ::1, localhost (URL has already normalised them). */
function loopback(hostname: string): boolean {
  return hostname === 'localhost' || hostname === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(hostname);
}

/** The apiVersion to answer in: what KUBERNETES_EXEC_INFO asks for (v1 when run without it). */
function execInfo(env: NodeJS.ProcessEnv): { apiVersion: string; interactive: boolean } {
  const raw = env['KUBERNETES_EXEC_INFO'];
  if (!raw) return { apiVersion: API_VERSIONS[0]!, interactive: false };
  let info: { apiVersion?: unknown; spec?: { interactive?: unknown } };
  try {
    info = JSON.parse(raw) as typeof info;
  } catch {
    throw new PluginError('KUBERNETES_EXEC_INFO is not valid JSON', EXIT.error);
  }
  if (typeof info.apiVersion !== 'string' || !API_VERSIONS.includes(info.apiVersion)) {
    throw new PluginError(
      `KUBERNETES_EXEC_INFO asks for apiVersion ${JSON.stringify(info.apiVersion)}; this plugin answers only ${API_VERSIONS.join(' or ')}`,
      EXIT.error,
    );
  }
  return { apiVersion: info.apiVersion, interactive: info.spec?.interactive === true };
}

/** The caller's identity, and where it came from (for messages). Never prompts. */
function identity(env: NodeJS.ProcessEnv): { token: string; source: string } {
  const file = env['BROKER_IDENTITY_TOKEN_FILE'];
  if (file) {
    let token: string;
    try {
      token = fs.readFileSync(file, 'utf8').trim();
    } catch (err) {
      throw new PluginError(`cannot read the identity token BROKER_IDENTITY_TOKEN_FILE=${file}: ${(err as NodeJS.ErrnoException).code ?? err}`, EXIT.unauthenticated);
    }
    if (!token) throw new PluginError(`the identity token file BROKER_IDENTITY_TOKEN_FILE=${file} is empty`, EXIT.unauthenticated);
    return checked(token, `BROKER_IDENTITY_TOKEN_FILE=${file}`);
  }
  const token = env['BROKER_IDENTITY_TOKEN']?.trim();
  if (token) return checked(token, 'BROKER_IDENTITY_TOKEN');
  throw new PluginError(
    'no identity: set BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN, or BROKER_AGENT_KEY; or keep an agent key or a login in the OS keychain (broker agent enroll, broker login)',
    EXIT.unauthenticated,
  );
}

/** A token in the environment, else an agent key or the keychain (src/credential/identity.cts, loaded only then). */
async function callerIdentity(env: NodeJS.ProcessEnv, broker: string, timeoutMs: number): Promise<PluginIdentity> {
  if (!env['BROKER_IDENTITY_TOKEN_FILE'] && !env['BROKER_IDENTITY_TOKEN']?.trim()) {
    const more = require(__filename.endsWith('.cts') ? './identity.cts' : './identity.cjs') as IdentityModule;
    const found = await more.fromAgentKeyOrKeychain(env, broker, (message) => new PluginError(message, EXIT.unauthenticated), timeoutMs);
    if (found) return found;
  }
  const { token, source } = identity(env);
  return { source, authorization: async () => `Bearer ${token}` };
}

/** A bearer token is printable ASCII without spaces; anything else could inject into the request. */
function checked(token: string, source: string): { token: string; source: string } {
  if (!/^[\x21-\x7e]+$/.test(token)) throw new PluginError(`the identity token from ${source} contains characters a token cannot have`, EXIT.unauthenticated);
  return { token, source };
}

interface Reply {
  status: number;
  body: string;
}

/** The deadline passed before the answer was complete. */
class TimedOut extends Error {}

/**
 * One POST over a fresh connection, written by hand on node:net / node:tls: loading node:http costs
 * more start-up time than the whole request (DESIGN.md §3 measured it), and this runs on every
 * kubectl call. HTTP/1.1 with `Connection: close`; the body is read to the end of the stream, all of it
 * within `timeoutMs` from the start (a socket idle timeout would let a server that drips bytes hang us).
 */
function post(url: URL, authorization: string, ca: Buffer | undefined, timeoutMs: number): Promise<Reply> {
  const secure = url.protocol === 'https:';
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  const port = Number(url.port) || (secure ? 443 : 80);
  const request =
    `POST ${url.pathname}${url.search} HTTP/1.1\r\nHost: ${url.host}\r\nAuthorization: ${authorization}\r\n` +
    'Accept: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n';
  return new Promise((done, fail) => {
    let socket: NetModule.Socket;
    if (secure) {
      const tls = process.getBuiltinModule('node:tls') as typeof TlsModule;
      const net = process.getBuiltinModule('node:net') as typeof NetModule;
      socket = tls.connect({ host, port, ALPNProtocols: ['http/1.1'], ...(net.isIP(host) ? {} : { servername: host }), ...(ca ? { ca } : {}) }, () =>
        socket.write(request),
      );
    } else {
      const net = process.getBuiltinModule('node:net') as typeof NetModule;
      socket = net.connect({ host, port }, () => socket.write(request));
    }
    const chunks: Buffer[] = [];
    const deadline = setTimeout(() => socket.destroy(new TimedOut()), timeoutMs);
    socket.on('close', () => clearTimeout(deadline));
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', fail);
    socket.on('end', () => {
      try {
        done(parseResponse(Buffer.concat(chunks)));
      } catch (err) {
        fail(err);
      }
    });
  });
}

/** Status and body of an HTTP/1.1 response read to its end (Content-Length or chunked). */
function parseResponse(raw: Buffer): Reply {
  const split = raw.indexOf('\r\n\r\n');
  if (split < 0) throw new Error('the broker closed the connection before a complete answer');
  const head = raw.subarray(0, split).toString('latin1').split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})/.exec(head[0] ?? '');
  if (!status) throw new Error('the answer is not HTTP/1.1');
  const headers = new Map(
    head.slice(1).map((line) => {
      const colon = line.indexOf(':');
      return [line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim()] as const;
    }),
  );
  let body = raw.subarray(split + 4);
  if (headers.get('transfer-encoding')?.toLowerCase() === 'chunked') {
    const parts: Buffer[] = [];
    let at = 0;
    for (;;) {
      const eol = body.indexOf('\r\n', at);
      if (eol < 0) throw new Error('truncated chunked answer');
      const size = parseInt(body.subarray(at, eol).toString('latin1'), 16);
      if (Number.isNaN(size)) throw new Error('malformed chunked answer');
      if (size === 0) break;
      parts.push(body.subarray(eol + 2, eol + 2 + size));
      at = eol + 2 + size + 2;
    }
    body = Buffer.concat(parts);
  } else if (headers.has('content-length')) {
    body = body.subarray(0, Number(headers.get('content-length')));
  }
  return { status: Number(status[1]), body: body.toString('utf8') };
}

/** Whether a broker's message already tells the user which `broker` command to run. */
function namesCommand(message: string): boolean {
  return /(?<![\w-])broker (?:task|run|templates|approve|approvals|whoami|kubeconfig|login)(?![\w-])/.test(message);
}

/**
 * Whether the process that runs this one has already waited for a child: kubectl runs no other
 * child, so then this is not its first run of the plugin. A failed run is not cached by client-go
 * (plugin/pkg/client/auth/exec/exec.go keeps only a credential), and kubectl's discovery
 * (discovery/cached/memory/memcache.go) keeps no failure either, so each discovery step of one kubectl
 * command runs the plugin again. Read from the parent's cminflt in /proc/PPID/stat (the minor faults
 * of the children it has waited for: 0 until it has waited for one, never 0 after), in memory, with
 * nothing written anywhere. Linux only: elsewhere, or when it cannot be read, false.
 */
function ranBefore(ppid: number | undefined): boolean {
  if (ppid === undefined || ppid <= 1) return false;
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${ppid}/stat`, 'latin1');
  } catch {
    return false;
  }
  // pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt ...; comm may hold spaces.
  const cminflt = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[8];
  return cminflt !== undefined && /^[1-9][0-9]*$/.test(cminflt);
}

function explain(reply: Reply, opts: Options, source: string): PluginError {
  let error: { code?: string; message?: string; field?: string; requestId?: string } = {};
  try {
    error = (JSON.parse(reply.body) as { error?: typeof error }).error ?? {};
  } catch {
    // not our JSON: a proxy, or not a broker at all
  }
  const said = error.message ? `: ${error.message}` : '';
  switch (error.code) {
    case 'no_active_task': {
      // The broker's message names the command that starts the task when it knows the template and
      // namespace (from the task's history); the placeholders are only for a broker that does not.
      const message = error.message ?? `no active task "${opts.task}"`;
      const hint = namesCommand(message) ? '' : `\nstart one with: broker task start TEMPLATE --namespace NAMESPACE --name ${opts.task}`;
      return new PluginError(`broker credential: ${message}${hint}`, EXIT.error);
    }
    case 'unauthenticated':
      return new PluginError(
        `broker credential: the broker did not accept the identity from ${source} (missing, expired, or not an agent in the policy)`,
        EXIT.unauthenticated,
      );
    case 'forbidden':
      return new PluginError(`broker credential: refused${said}`, EXIT.error);
    case 'approval_required':
      return new PluginError(
        `broker credential: task "${opts.task}" needs approval${error.requestId ? ` (request ${error.requestId})` : ''}${said}` +
          (namesCommand(error.message ?? '') ? '' : `\nask an approver to run: broker approve ${error.requestId ?? 'REQUEST_ID'}`),
        EXIT.approval,
      );
    case 'audit_unavailable':
    case 'cluster_unavailable':
    case 'rate_limited':
      return new PluginError(`broker credential: the broker at ${opts.broker} cannot serve credentials now${said} [${error.code}]`, EXIT.unavailable);
    default:
      return new PluginError(`broker credential: the broker at ${opts.broker} answered ${reply.status}${said}${error.code ? ` [${error.code}]` : ''}`, EXIT.error);
  }
}

async function run(io: PluginIo): Promise<number> {
  try {
    const opts = parseArgs(io.argv, io.env);
    if (opts === 'help') {
      io.stdout(USAGE);
      return EXIT.ok;
    }
    const { apiVersion } = execInfo(io.env);
    const { authorization, source } = await callerIdentity(io.env, opts.broker, opts.timeoutS * 1000);
    let url: URL;
    try {
      url = new URL(`${opts.broker}/v1/tasks/${encodeURIComponent(opts.task)}/credential${opts.via === 'proxy' ? '?via=proxy' : ''}`);
    } catch {
      throw new PluginError(`the broker URL ${JSON.stringify(opts.broker)} is not a URL`, EXIT.usage);
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
      throw new PluginError(`the broker URL ${JSON.stringify(opts.broker)} is not a URL`, EXIT.usage);
    }
    if (url.protocol === 'http:' && !loopback(url.hostname)) {
      throw new PluginError(
        `broker credential: the broker URL from ${opts.brokerFrom} is plain http:// to ${url.host}, which is not loopback: use https:// (http:// is allowed only to 127.0.0.0/8, ::1 and localhost, so that the identity token never crosses a network in clear)`,
        EXIT.usage,
      );
    }
    let ca: Buffer | undefined;
    if (opts.brokerCa) {
      try {
        ca = fs.readFileSync(opts.brokerCa);
      } catch (err) {
        throw new PluginError(`cannot read the broker CA ${opts.brokerCa}: ${(err as NodeJS.ErrnoException).code ?? err}`, EXIT.usage);
      }
    }
    const header = await authorization('POST', url.href); // an agent proof is for this method and URL only
    let reply: Reply;
    try {
      reply = await post(url, header, ca, opts.timeoutS * 1000);
    } catch (err) {
      if (err instanceof TimedOut) {
        throw new PluginError(`broker credential: the broker at ${opts.broker} gave no complete answer: timed out after ${opts.timeoutS} s`, EXIT.unavailable);
      }
      const e = err as NodeJS.ErrnoException;
      throw new PluginError(`broker credential: the broker is unreachable at ${opts.broker}: ${e.code ?? e.message}`, EXIT.unavailable);
    }
    // Never followed (the Location is not printed: it may carry a token of its own).
    if (reply.status >= 300 && reply.status < 400) {
      throw new PluginError(
        `broker credential: the broker at ${opts.broker} answered ${reply.status}, a redirect: redirects are refused, the identity token goes only to the configured broker URL (check ${opts.brokerFrom})`,
        EXIT.error,
      );
    }
    if (reply.status !== 200) throw explain(reply, opts, source);
    let credential: { token?: unknown; expirationTimestamp?: unknown };
    try {
      credential = JSON.parse(reply.body) as typeof credential;
    } catch {
      throw new PluginError(`broker credential: the broker at ${opts.broker} answered 200 without a credential`, EXIT.error);
    }
    if (typeof credential.token !== 'string' || typeof credential.expirationTimestamp !== 'string') {
      throw new PluginError(`broker credential: the broker at ${opts.broker} answered 200 without a credential`, EXIT.error);
    }
    io.stdout(
      JSON.stringify({
        apiVersion,
        kind: 'ExecCredential',
        status: { token: credential.token, expirationTimestamp: credential.expirationTimestamp },
      }) + '\n',
    );
    return EXIT.ok;
  } catch (err) {
    if (err instanceof PluginError) {
      // Run again by the same kubectl: one line (the first) is enough, the rest was printed the first time.
      const message = ranBefore(io.ppid) ? err.message.split('\n', 1)[0]! : err.message;
      io.stderr(message.endsWith('\n') ? message : message + '\n');
      return err.exitCode;
    }
    io.stderr(`broker credential: unexpected failure: ${(err as Error).message}\n`);
    return EXIT.error;
  }
}

/**
 * Writes straight to the file descriptor: creating process.stdout (a stream over a pipe) costs ~2 ms
 * of start-up, more than the write. Retries short writes and EAGAIN on a non-blocking pipe.
 */
function writeAll(fd: number, text: string): void {
  const data = Buffer.from(text, 'utf8');
  for (let at = 0; at < data.length; ) {
    try {
      at += fs.writeSync(fd, data, at);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
    }
  }
}

/** What this CommonJS module exports (ES modules load it with createRequire; see PluginModule). */
module.exports = { run, parseResponse } satisfies PluginModule;

// The entry point: bin/broker runs this file directly for `broker credential`; tests require run().
if (require.main === module) {
  void run({
    argv: process.argv.slice(2),
    env: process.env,
    stdout: (s) => writeAll(1, s),
    stderr: (s) => writeAll(2, s),
    ppid: process.ppid,
  }).then((code) => {
    // Exit now: a DNS lookup cut by the deadline would otherwise keep the process alive until it ends
    // (everything was written with writeSync).
    process.exit(code);
  });
}
