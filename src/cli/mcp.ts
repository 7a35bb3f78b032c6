import { existsSync, readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import type { BrokerFlags } from './broker-options.ts';

interface Flags {
  kubeconfigDir?: string;
  via?: 'proxy' | 'direct';
  plugin: 'auto' | 'native' | 'node';
}

/** `broker mcp`: the agent's tools over MCP on stdio (src/mcp/server.ts); this is its composition root. */
export function mcpCommand(): Command {
  return new Command('mcp')
    .description("an MCP server on stdio for LLM agents: list templates, start, show, list and end tasks as the agent's identity")
    .option('--kubeconfig-dir <dir>', "where start_task writes each task's kubeconfig, NAME.kubeconfig (default: ~/.kube/task-broker)")
    .addOption(
      new Option('--via <mode>', "the kubeconfigs' path to the cluster: proxy (the broker's Kubernetes API proxy) or direct (default: proxy when the broker has one)").choices([
        'proxy',
        'direct',
      ]),
    )
    .addOption(new Option('--plugin <kind>', 'which exec plugin build the kubeconfigs run').choices(['auto', 'native', 'node']).default('auto'))
    .addHelpText(
      'after',
      '\nRun by an MCP client (docs/mcp.md), with the agent\'s identity in its environment:\n  {"command": "broker", "args": ["mcp", "--kubeconfig-dir", "/home/me/.kube/task-broker"], "env": {"BROKER_URL": "https://broker.example:8443"}}',
    )
    .action(async (flags: Flags, cmd: Command) => {
      const globals = cmd.optsWithGlobals<BrokerFlags>();
      const [{ createMcpServer }, { defaultKubeconfigDir }, { StdioServerTransport }, { BrokerClient }] = await Promise.all([
        import('../mcp/server.ts'),
        import('../mcp/task-kubeconfig.ts'),
        import('@modelcontextprotocol/sdk/server/stdio.js'),
        import('../client/broker-client.ts'),
      ]);
      const log = (line: string) => void process.stderr.write(`${line}\n`);
      const makeClient = () => new BrokerClient({ broker: globals.broker, brokerCa: globals.brokerCa });
      // A missing broker URL or identity is told to the operator now, and to the agent at each tool call.
      try {
        await makeClient().close();
      } catch (err) {
        log(`broker mcp: ${(err as Error).message} (every tool will answer this until it is fixed)`);
      }
      const server = createMcpServer({
        client: makeClient,
        kubeconfigDir: flags.kubeconfigDir ?? defaultKubeconfigDir(),
        via: flags.via,
        plugin: flags.plugin === 'auto' ? undefined : flags.plugin,
        readFile: (path) => readFileSync(path),
        exists: existsSync,
        version: (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version,
        log,
      });
      const transport = new StdioServerTransport();
      const closed = new Promise<void>((done) => {
        transport.onclose = done;
        process.stdin.once('end', done);
      });
      await server.connect(transport);
      await closed;
      await server.close();
    });
}
