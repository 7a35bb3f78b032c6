import { Command, InvalidArgumentError, Option } from 'commander';
import { parseDuration } from '../policy/duration.ts';
import { DEFAULT_LIMITS, formatRate, parseRate, type Limits, type Rate } from '../server/limits.ts';
// Types only: the request log module loads fastify, which a CLI command must not pay for until it serves.
import type { LogFormat, LogLevel } from '../server/request-log.ts';
import type { ProxyServeOptions } from '../server/serve.ts';

const LOG_FORMATS: readonly LogFormat[] = ['json', 'text'];
const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

interface ServeFlags {
  config: string;
  auditLog?: string;
  auditStore?: string;
  kubeconfig?: string;
  listen: string;
  tlsCert?: string;
  tlsKey?: string;
  insecureHttp?: boolean;
  sweepInterval?: number;
  orphanGrace?: number;
  leaseDuration?: number;
  publicServer?: string;
  publicCa?: string;
  acceptAuditReset?: boolean;
  auditWebhookTokenFile?: string;
  rateLimitSource?: Rate | 'off';
  rateLimitIdentity?: Rate | 'off';
  authFailureLimit?: Rate | 'off';
  maxTokenReviews?: number;
  maxConnections?: number;
  maxConnectionsPerSource?: number;
  connectionTimeout?: number;
  requestTimeout?: number;
  headersTimeout?: number;
  keepAliveTimeout?: number;
  authFailureLogInterval?: number;
  allowBroadCredentials?: boolean;
  logFormat?: LogFormat;
  logLevel: LogLevel;
  proxyListen?: string;
  proxyPublicUrl?: string;
  sessionRecordings?: string;
  proxyUpstreamTimeout?: number;
  proxyRateLimitAgent?: Rate | 'off';
  ui?: boolean;
  uiUrl?: string;
}

function duration(value: string): number {
  try {
    return parseDuration(value) * 1000;
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

export function serveCommand(): Command {
  return new Command('serve')
    .description('run the broker: the HTTP API that starts tasks and mints their credentials')
    .requiredOption('--config <file>', 'the policy file (see docs/policy.md)')
    .option('--audit-log <file>', 'the audit log (JSON Lines, hash-chained; created if missing); this or --audit-store is needed')
    .option('--audit-store <url>', 'a PostgreSQL audit store shared by replicas, postgres://USER:PASSWORD@HOST:PORT/DB (made with `broker audit migrate`), in place of --audit-log')
    .option('--kubeconfig <file>', "the broker's own kubeconfig; default: in-cluster ServiceAccount")
    .option('--listen <host:port>', 'address to listen on', '0.0.0.0:8443')
    .option('--tls-cert <file>', 'serving certificate (PEM)')
    .option('--tls-key <file>', 'serving key (PEM)')
    .option('--insecure-http', 'serve plain HTTP; allowed only on a loopback address')
    .option('--public-server <url>', "API server URL that clients' kubeconfigs should use (default: the broker's own)")
    .option('--public-ca <file>', 'CA of --public-server (PEM)')
    .option('--accept-audit-reset', 'start even if the audit log does not match its checkpoint in the cluster (removed, replaced or cut); recorded as audit.reset')
    .option('--audit-webhook-token-file <file>', "take the API server's audit webhook (POST /v1/audit/kubernetes) from posts bearing the token in this file (mode 0600; docs/recording.md)")
    .option('--proxy-listen <host:port>', 'also serve the Kubernetes API proxy here, with the broker\'s TLS (plain HTTP only with --insecure-http on loopback); docs/proxy.md')
    .option('--proxy-public-url <url>', 'the URL agents reach the proxy at (kubeconfigs and session tokens name it; default: the --proxy-listen address)')
    .option('--session-recordings <dir>', 'where the proxy keeps exec and attach session recordings (default: the audit log\'s path + .sessions)')
    .addOption(limit('--proxy-rate-limit-agent <n/duration>', 'requests one agent may make through the proxy ("off": none)', rate, { max: 1000, windowMs: 1000 }))
    .addOption(new Option('--proxy-upstream-timeout <duration>', 'the API server must start answering a proxied request within this').argParser(duration).default(60_000, '60s'))
    .option('--ui', 'also serve the web console for approvers and reviewers under /ui (docs/console.md)')
    .option('--ui-url <url>', 'the URL browsers reach the broker at, for the console (its sign-in redirect is URL/ui/callback); default: the --listen address')
    .option('--allow-broad-credentials', 'start even when the broker\'s own credential can do far more than `policy apply` grants it (cluster-admin, escalate, ...); recorded')
    .addOption(new Option('--log-format <format>', 'request log and start-up summary on stderr: json (pino) or text').choices(LOG_FORMATS).default(undefined, 'text on a terminal, else json'))
    .addOption(new Option('--log-level <level>', 'least level logged; every request is logged at info (5xx at error, 429s of the limits at debug)').choices(LOG_LEVELS).default('info'))
    .addOption(limit('--rate-limit-source <n/duration>', 'requests from one source address, every route ("off": none)', rate, D.perSource))
    .addOption(limit('--auth-failure-limit <n/duration>', 'failed authentications from one source address; beyond, 429 without checking', rate, D.authFailures))
    .addOption(limit('--rate-limit-identity <n/duration>', 'requests of one authenticated caller', rate, D.perIdentity))
    .addOption(limit('--max-token-reviews <n>', 'TokenReviews in flight at once; more wait up to 1 s, then 429 (0: no cap)', count, D.maxTokenReviews))
    .addOption(limit('--max-connections <n>', 'connections open at once (0: no cap)', count, D.maxConnections))
    .addOption(limit('--max-connections-per-source <n>', 'connections open at once from one source address (0: no cap)', count, D.maxConnectionsPerSource))
    .addOption(limit('--request-timeout <duration>', 'a request, headers and body, must arrive within this ("off": no limit)', timeout, D.requestTimeoutMs))
    .addOption(limit('--headers-timeout <duration>', 'its headers must arrive within this', timeout, D.headersTimeoutMs))
    .addOption(limit('--connection-timeout <duration>', 'a connection idle both ways this long is closed ("off": never)', timeout, D.connectionTimeoutMs))
    .addOption(limit('--keep-alive-timeout <duration>', 'an idle keep-alive connection is closed after this', timeout, D.keepAliveTimeoutMs))
    .addOption(new Option('--sweep-interval <duration>', 'how often expired tasks are looked for').argParser(duration).hideHelp())
    .addOption(new Option('--orphan-grace <duration>', 'age before objects of an unfinished start are removed').argParser(duration).hideHelp())
    .addOption(new Option('--lease-duration <duration>', 'sweeper Lease duration').argParser(duration).hideHelp())
    .addOption(new Option('--auth-failure-log-interval <duration>', 'how often refused callers are summarised in the audit log').argParser(duration).hideHelp())
    .addHelpText(
      'after',
      '\nThe policy is reloaded, without a restart, when its file changes and on SIGHUP (a bad one is refused and the running one kept).\n' +
        '\nExample:\n  broker serve --config policy.yaml --audit-log /var/lib/task-broker/audit.jsonl \\\n    --tls-cert tls.crt --tls-key tls.key',
    )
    .action(async (flags: ServeFlags) => {
      const m = /^(.*):(\d+)$/.exec(flags.listen);
      if (!m) throw new InvalidArgumentError('--listen must be HOST:PORT');
      // SIGHUP reloads the policy; one arriving during start-up is kept for when the broker runs (not the default: exit).
      let hupBeforeStart = false;
      const earlyHup = () => (hupBeforeStart = true);
      process.on('SIGHUP', earlyHup);
      const host = m[1]!.replace(/^\[(.*)\]$/, '$1');
      const port = Number(m[2]);
      let proxy: ProxyServeOptions | undefined;
      if (flags.proxyListen) {
        const pm = /^(.*):(\d+)$/.exec(flags.proxyListen);
        if (!pm) throw new InvalidArgumentError('--proxy-listen must be HOST:PORT');
        proxy = {
          host: pm[1]!.replace(/^\[(.*)\]$/, '$1'),
          port: Number(pm[2]),
          publicUrl: flags.proxyPublicUrl?.replace(/\/+$/, ''),
          recordings: flags.sessionRecordings,
          upstreamTimeoutMs: flags.proxyUpstreamTimeout,
          ...(flags.proxyRateLimitAgent === undefined ? {} : { perAgent: flags.proxyRateLimitAgent === 'off' ? undefined : flags.proxyRateLimitAgent }),
        };
      } else if (flags.proxyPublicUrl || flags.sessionRecordings) {
        throw new InvalidArgumentError('--proxy-public-url and --session-recordings need --proxy-listen');
      }
      if (flags.uiUrl && !flags.ui) throw new InvalidArgumentError('--ui-url needs --ui');
      let broker: Awaited<ReturnType<typeof import('../server/serve.ts').serve>>;
      try {
        // A port in use is refused before the server's modules are even loaded: at once.
        await (await import('../server/listen.ts')).probeListen(host, port);
        const { serve } = await import('../server/serve.ts');
        broker = await serve({
          config: flags.config,
          auditLog: flags.auditLog,
          auditStore: flags.auditStore,
          host,
          port,
          ...(flags.kubeconfig ? { kubeconfig: flags.kubeconfig } : {}),
          ...(flags.tlsCert ? { tlsCert: flags.tlsCert } : {}),
          ...(flags.tlsKey ? { tlsKey: flags.tlsKey } : {}),
          ...(flags.insecureHttp ? { insecureHttp: true } : {}),
          ...(flags.sweepInterval ? { sweepIntervalMs: flags.sweepInterval } : {}),
          ...(flags.orphanGrace !== undefined ? { orphanGraceMs: flags.orphanGrace, orphanIntervalMs: Math.max(1000, flags.orphanGrace) } : {}),
          ...(flags.leaseDuration ? { leaseMs: flags.leaseDuration } : {}),
          ...(flags.publicServer ? { publicServer: flags.publicServer } : {}),
          ...(flags.publicCa ? { publicCa: flags.publicCa } : {}),
          ...(flags.acceptAuditReset ? { acceptAuditReset: true } : {}),
          ...(flags.auditWebhookTokenFile ? { auditWebhookTokenFile: flags.auditWebhookTokenFile } : {}),
          ...(flags.allowBroadCredentials ? { allowBroadCredentials: true } : {}),
          ...(flags.logFormat ? { logFormat: flags.logFormat } : {}),
          logLevel: flags.logLevel,
          limits: limitsFrom(flags),
          proxy,
          ...(flags.ui ? { ui: { url: flags.uiUrl } } : {}),
        });
      } catch (err) {
        process.off('SIGHUP', earlyHup);
        // A failed start has closed what it opened; whatever a library still holds (an idle
        // keep-alive connection to the API server) must not keep the process alive once the error is out.
        setTimeout(() => process.exit(), 250).unref();
        throw err;
      }
      process.stdout.write(`listening on ${broker.url}\n`);
      const reload = () => void broker.reload('SIGHUP');
      process.off('SIGHUP', earlyHup);
      process.on('SIGHUP', reload);
      if (hupBeforeStart) reload();
      await new Promise<void>((done) => {
        const stop = () => {
          process.off('SIGTERM', stop);
          process.off('SIGINT', stop);
          void broker.close().then(done, done);
        };
        process.on('SIGTERM', stop);
        process.on('SIGINT', stop);
      });
      process.off('SIGHUP', reload);
    });
}

// Limits (docs/operations.md). Defaults: DEFAULT_LIMITS (src/server/limits.ts), shown by --help.
const D = DEFAULT_LIMITS;

function limit<T extends Rate | number | undefined>(flags: string, description: string, parse: (v: string) => T | 'off', value: T): Option {
  const shown = typeof value === 'number' ? (flags.includes('<duration>') ? (value ? `${value / 1000}s` : 'off') : String(value)) : formatRate(value as Rate | undefined);
  return new Option(flags, description).argParser(parse).default(value ?? 'off', shown);
}

function rate(value: string): Rate | 'off' {
  try {
    return parseRate(value) ?? 'off';
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function count(value: string): number {
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError(`${JSON.stringify(value)} is not a whole number`);
  return Number(value);
}

function timeout(value: string): number {
  return value === 'off' ? 0 : duration(value);
}

function limitsFrom(flags: ServeFlags): Partial<Limits> {
  const rateOf = (r: Rate | 'off') => (r === 'off' ? undefined : r);
  const limits: Partial<Limits> = {};
  if (flags.rateLimitSource !== undefined) limits.perSource = rateOf(flags.rateLimitSource);
  if (flags.authFailureLimit !== undefined) limits.authFailures = rateOf(flags.authFailureLimit);
  if (flags.rateLimitIdentity !== undefined) limits.perIdentity = rateOf(flags.rateLimitIdentity);
  if (flags.maxTokenReviews !== undefined) limits.maxTokenReviews = flags.maxTokenReviews;
  if (flags.maxConnections !== undefined) limits.maxConnections = flags.maxConnections;
  if (flags.maxConnectionsPerSource !== undefined) limits.maxConnectionsPerSource = flags.maxConnectionsPerSource;
  if (flags.requestTimeout !== undefined) limits.requestTimeoutMs = flags.requestTimeout;
  if (flags.headersTimeout !== undefined) limits.headersTimeoutMs = flags.headersTimeout;
  if (flags.connectionTimeout !== undefined) limits.connectionTimeoutMs = flags.connectionTimeout;
  if (flags.keepAliveTimeout !== undefined) limits.keepAliveTimeoutMs = flags.keepAliveTimeout;
  if (flags.authFailureLogInterval !== undefined) limits.failureLogIntervalMs = flags.authFailureLogInterval;
  return limits;
}
