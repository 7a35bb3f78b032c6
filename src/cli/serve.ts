import { Command, InvalidArgumentError, Option } from 'commander';
import { parseDuration } from '../policy/duration.ts';

interface ServeFlags {
  config: string;
  auditLog: string;
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
    .requiredOption('--audit-log <file>', 'the audit log (JSON Lines, hash-chained; created if missing)')
    .option('--kubeconfig <file>', "the broker's own kubeconfig; default: in-cluster ServiceAccount")
    .option('--listen <host:port>', 'address to listen on', '0.0.0.0:8443')
    .option('--tls-cert <file>', 'serving certificate (PEM)')
    .option('--tls-key <file>', 'serving key (PEM)')
    .option('--insecure-http', 'serve plain HTTP; allowed only on a loopback address')
    .option('--public-server <url>', "API server URL that clients' kubeconfigs should use (default: the broker's own)")
    .option('--public-ca <file>', 'CA of --public-server (PEM)')
    .option('--accept-audit-reset', 'start even if the audit log does not match its checkpoint in the cluster (removed, replaced or cut); recorded as audit.reset')
    .addOption(new Option('--sweep-interval <duration>', 'how often expired tasks are looked for').argParser(duration).hideHelp())
    .addOption(new Option('--orphan-grace <duration>', 'age before objects of an unfinished start are removed').argParser(duration).hideHelp())
    .addOption(new Option('--lease-duration <duration>', 'sweeper Lease duration').argParser(duration).hideHelp())
    .addHelpText('after', '\nExample:\n  broker serve --config policy.yaml --audit-log /var/lib/task-broker/audit.jsonl \\\n    --tls-cert tls.crt --tls-key tls.key')
    .action(async (flags: ServeFlags) => {
      const m = /^(.*):(\d+)$/.exec(flags.listen);
      if (!m) throw new InvalidArgumentError('--listen must be HOST:PORT');
      const { serve } = await import('../server/serve.ts');
      const broker = await serve({
        config: flags.config,
        auditLog: flags.auditLog,
        host: m[1]!.replace(/^\[(.*)\]$/, '$1'),
        port: Number(m[2]),
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
      });
      process.stdout.write(`listening on ${broker.url}\n`);
      await new Promise<void>((done) => {
        const stop = () => {
          process.off('SIGTERM', stop);
          process.off('SIGINT', stop);
          void broker.close().then(done, done);
        };
        process.on('SIGTERM', stop);
        process.on('SIGINT', stop);
      });
    });
}
