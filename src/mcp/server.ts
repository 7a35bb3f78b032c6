/**
 * `broker mcp`: the broker's tools for an LLM agent over the Model Context Protocol, acting as the
 * agent's own identity through the CLI's BrokerClient (src/client/broker-client.ts). Every side effect
 * (the client, the kubeconfig directory, the clock between polls, the log) comes in through McpDeps,
 * so src/cli/mcp.ts is the one composition root.
 *
 * The SDK's low-level Server with JSON Schemas (ajv validates the arguments against the very schemas
 * the client is shown) rather than McpServer, whose schemas are zod's: zod is no dependency of ours.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { CallToolRequestSchema, ListToolsRequestSchema, type CallToolResult, type ServerNotification } from '@modelcontextprotocol/sdk/types.js';
import type { BrokerClient, ClusterInfo, StartTask } from '../client/broker-client.ts';
import type { PluginKind } from '../client/kubeconfig.ts';
import { BrokerError, isBrokerError } from '../errors.ts';
import { durationProblem, formatDuration, parseDuration } from '../policy/duration.ts';
import type { TaskView } from '../tasks/model.ts';
import { controlCharacterIn, printable, safeJson } from '../text.ts';
import { toolError, ToolFailure, type ApprovalFacts } from './errors.ts';
import { ensureDir, kubeconfigPath, writeTaskKubeconfig } from './task-kubeconfig.ts';
import { TOOLS, type ToolName } from './tools.ts';

export interface McpDeps {
  /** The broker client, made on first use (a missing broker URL or identity becomes each tool's error). */
  client: () => BrokerClient;
  /** Where start_task writes NAME.kubeconfig. */
  kubeconfigDir: string;
  /** How the kubeconfigs reach the cluster; default: through the broker's proxy when it has one. */
  via?: 'proxy' | 'direct' | undefined;
  /** Which exec plugin build the kubeconfigs run; default: native when built. */
  plugin?: PluginKind | undefined;
  /** The CA file of the broker (BROKER_CA): the exec entry's --broker-ca, and the proxy's CA. */
  readFile: (path: string) => Buffer;
  exists: (path: string) => boolean;
  version: string;
  /** Between two looks at an approval request. Default 1000 ms. */
  pollMs?: number;
  /** One line to the operator (stderr): never seen by the agent. */
  log: (line: string) => void;
}

type Args = Record<string, unknown>;
type Extra = { signal: AbortSignal; sendNotification: (n: ServerNotification) => Promise<void>; _meta?: { progressToken?: string | number } | undefined };

const INSTRUCTIONS =
  'Kubernetes access through task-broker: you hold no standing credential. list_templates shows what you may ask for; start_task ' +
  'starts a task (a template, a namespace, a reason, a TTL) and returns the path of a kubeconfig for it; use that kubeconfig (kubectl, ' +
  'or a Kubernetes MCP server pointed at it) only while the task runs, and call end_task as soon as you are done. A gated template ' +
  'needs a person to approve it: start_task says who, and waits for it when called with "wait": true. A Kubernetes tool that fails ' +
  'with "getting credentials: exec: ... failed" or "task ... is not active" has no active task behind its kubeconfig: start one (or ' +
  'check task_status) before trying again. Right after a new start, such a tool may fail once more with the previous task\'s "is not ' +
  'active" while it picks up the new credential: call it again.';

/** Strings the broker (or another agent, through it) chose, escaped: no control character reaches the agent's context. */
export function clean<T>(value: T): T {
  if (typeof value === 'string') return printable(value) as T;
  if (Array.isArray(value)) return value.map(clean) as T;
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [printable(k), clean(v)])) as T;
  return value;
}

const TASK_FIELDS = ['id', 'name', 'agent', 'template', 'namespace', 'createdAt', 'expiresAt', 'reason', 'approvalId', 'state', 'endedAt', 'endedBy', 'cause'] as const;
function taskOf(view: object): TaskView {
  const v = view as Record<string, unknown>;
  return clean(Object.fromEntries(TASK_FIELDS.filter((k) => v[k] !== undefined && v[k] !== null).map((k) => [k, v[k]]))) as unknown as TaskView;
}

function result(text: string, structured: Record<string, unknown>): CallToolResult {
  return { content: [{ type: 'text', text: `${text}\n${safeJson(structured)}` }], structuredContent: structured };
}

export function createMcpServer(deps: McpDeps): Server {
  const server = new Server({ name: 'task-broker', title: 'task-broker: per-task Kubernetes access', version: deps.version }, { capabilities: { tools: {} }, instructions: INSTRUCTIONS });
  const ajv = new Ajv({ allErrors: false, strict: false, useDefaults: true, coerceTypes: false });
  const validators = new Map<ToolName, ValidateFunction>(TOOLS.map((t) => [t.name, ajv.compile(t.inputSchema)]));
  let client: BrokerClient | undefined;
  const getClient = () => (client ??= deps.client());
  let cluster: Promise<ClusterInfo> | undefined;
  const pollMs = deps.pollMs ?? 1000;

  server.setRequestHandler(ListToolsRequestSchema, () => ({ tools: TOOLS }));
  server.setRequestHandler(CallToolRequestSchema, async (request, extra): Promise<CallToolResult> => {
    const name = request.params.name as ToolName;
    const validate = validators.get(name);
    if (!validate) return toolError(new BrokerError('invalid_argument', `no tool ${JSON.stringify(printable(request.params.name))}; the tools are ${TOOLS.map((t) => t.name).join(', ')}`));
    try {
      const args = checkArguments(name, validate, structuredClone(request.params.arguments ?? {}));
      const meta = request.params._meta as { progressToken?: string | number } | undefined;
      return await run(name, args, { ...extra, _meta: meta });
    } catch (err) {
      if (extra.signal.aborted) deps.log(`broker mcp: ${name} cancelled by the client`);
      else if (!isBrokerError(err)) deps.log(`broker mcp: ${name} failed: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
      return toolError(err);
    }
  });
  server.onclose = () => void client?.close();

  async function run(name: ToolName, args: Args, extra: Extra): Promise<CallToolResult> {
    switch (name) {
      case 'list_templates': {
        const templates = (await getClient().templates()).map((t) => ({
          ...clean(t),
          ttl: { default: formatDuration(t.ttl.default), max: formatDuration(t.ttl.max), defaultSeconds: t.ttl.default, maxSeconds: t.ttl.max },
        }));
        const lines = templates.map((t) => `${t.name}: namespaces ${t.namespaces.join(', ')}; TTL ${t.ttl.default} (max ${t.ttl.max})${t.gated ? `; gated (${(t.gatedBecause ?? []).join(', ')}): needs ${t.approval?.required ?? 1} approval(s) from ${(t.approval?.approvers ?? []).join(' or ')}` : ''}`);
        return result(templates.length ? `templates you may start:\n${lines.join('\n')}` : 'no templates you may start (the policy names none for this identity)', { templates });
      }
      case 'start_task':
        return startTask(args, extra);
      case 'task_status': {
        const task = taskOf(await getClient().getTask(args['task'] as string));
        const path = kubeconfigPath(deps.kubeconfigDir, task.name);
        const state = (task as { state?: string }).state ?? 'active';
        return result(`task ${task.name} (${task.id}): ${state}, ${task.template} in ${task.namespace}, ${state === 'active' ? `until ${task.expiresAt}${deps.exists(path) ? `; kubeconfig ${path}` : ''}` : `ended ${(task as { endedAt?: string }).endedAt ?? ''}`}`, {
          task,
          ...(state === 'active' && deps.exists(path) ? { kubeconfig: path } : {}),
        });
      }
      case 'list_tasks': {
        const tasks = (await getClient().listTasks(args['all'] === true)).map(taskOf);
        const lines = tasks.map((t) => `${t.name} (${t.id}): ${t.template} in ${t.namespace}, ${(t as { state?: string }).state ?? 'active'}, expires ${t.expiresAt}`);
        return result(tasks.length ? lines.join('\n') : args['all'] ? 'no tasks, active or ended' : 'no active tasks', { tasks });
      }
      case 'end_task': {
        const ended = (await getClient().endTask(args['task'] as string)) as TaskView & { recording?: string; leftBehind?: unknown[]; hint?: string };
        const task = taskOf(ended);
        const leftBehind = clean(ended.leftBehind);
        const out: Record<string, unknown> = {
          task,
          ended: true,
          ...(ended.recording === 'webhook' || ended.recording === 'none' ? { recording: ended.recording } : {}),
          ...(Array.isArray(leftBehind) ? { leftBehind } : {}),
          ...(typeof ended.hint === 'string' ? { hint: clean(ended.hint) } : {}),
        };
        const left = Array.isArray(leftBehind) && leftBehind.length ? `; it left behind ${leftBehind.length} object(s) that can hold or grant access (see leftBehind)` : '';
        return result(`ended task ${task.name} (${task.id}): its access is revoked${left}`, out);
      }
    }
  }

  /** Validates against the tool's schema (defaults filled in) and refuses control characters, naming the argument. */
  function checkArguments(name: ToolName, validate: ValidateFunction, args: unknown): Args {
    if (!validate(args)) throw argumentError(name, validate.errors?.[0]);
    const a = args as Args;
    for (const [key, value] of Object.entries(a)) {
      const bad = typeof value === 'string' ? controlCharacterIn(value) : undefined;
      if (bad) throw new BrokerError('invalid_argument', `"${key}" must not contain control or bidirectional-override characters (found ${bad})`, { field: key });
    }
    for (const key of ['ttl', 'wait_timeout']) {
      const problem = a[key] === undefined ? undefined : durationProblem(a[key]);
      if (problem) throw new BrokerError('invalid_argument', `"${key}": ${problem}`, { field: key });
    }
    return a;
  }

  async function startTask(args: Args, extra: Extra): Promise<CallToolResult> {
    const request: StartTask = {
      template: args['template'] as string,
      namespace: args['namespace'] as string,
      reason: args['reason'] as string,
      name: args['name'] as string | undefined,
      ttl: args['ttl'] as string | undefined,
    };
    const c = getClient();
    // Where and how the kubeconfig goes is settled before anything starts: a failure here starts nothing.
    const kubeconfig = await kubeconfigFor(c);
    let started: TaskView;
    try {
      started = await c.startTask(request);
    } catch (err) {
      const id = isBrokerError(err) && err.code === 'approval_required' ? (err as BrokerError & { requestId?: string }).requestId : undefined;
      if (!id) throw err;
      if (args['wait'] !== true) {
        throw new ToolFailure('approval_required', (err as BrokerError).message, {
          approval: await approvalFacts(c, id),
          next: 'a person must approve it first: tell your user who can approve and the command above; then call start_task again with the same arguments and "wait": true (it waits for the approval and starts the task)',
        });
      }
      started = await waitForApproval(c, request, id, args['wait_timeout'] as string, extra);
    }
    if (extra.signal.aborted) {
      // Cancelled (or the client gone) while the start was in flight: nobody would learn of this task.
      await c.endTask(started.id).catch((err: unknown) => deps.log(`broker mcp: task ${started.id} started after its call was cancelled, and could not be ended: ${(err as Error).message}`));
      throw new BrokerError('internal', 'the call was cancelled; the task it started was ended again');
    }
    const task = taskOf(started);
    let path: string;
    try {
      path = writeTaskKubeconfig(deps.kubeconfigDir, started.name, kubeconfig.text(started));
    } catch (err) {
      await c.endTask(started.id).catch(() => undefined);
      throw new BrokerError('internal', `task ${task.name} was started, but its kubeconfig could not be written in ${deps.kubeconfigDir} (${(err as Error).message}), so it was ended again`, { cause: err });
    }
    const usage =
      `kubectl --kubeconfig ${path} get pods -n ${task.namespace} (or a Kubernetes MCP server pointed at ${path}) works until ${task.expiresAt} or until you ` +
      `call end_task with {"task": "${task.name}"}; only what template ${task.template} allows, in namespace ${task.namespace}`;
    return result(`started task ${task.name} (${task.id}): ${task.template} in ${task.namespace} until ${task.expiresAt}; kubeconfig: ${path} (via ${kubeconfig.via})`, {
      task,
      kubeconfig: { path, context: `task-broker-${task.name}`, namespace: task.namespace, server: kubeconfig.server, via: kubeconfig.via },
      usage,
    });
  }

  /** The server, CA and mode of the kubeconfigs (asked of the broker once), and the directory checked. */
  async function kubeconfigFor(c: BrokerClient): Promise<{ via: 'proxy' | 'direct'; server: string; text: (t: TaskView) => string }> {
    ensureDir(deps.kubeconfigDir);
    cluster ??= c.cluster();
    let info: ClusterInfo;
    try {
      info = await cluster;
    } catch (err) {
      cluster = undefined;
      throw err;
    }
    const via = deps.via ?? (info.proxy ? 'proxy' : 'direct');
    let server = info.server;
    let caData = info.certificateAuthorityData;
    if (via === 'proxy') {
      if (!info.proxy) throw new BrokerError('invalid_argument', 'the broker has no Kubernetes API proxy; this needs a person: run broker mcp with --via direct', { field: '--via' });
      // The proxy serves with the broker's own certificate: the CA that verifies the broker verifies it.
      server = info.proxy.server;
      caData = c.brokerCa ? deps.readFile(c.brokerCa).toString('base64') : undefined;
    }
    const { execKubeconfig } = await import('../client/kubeconfig.ts');
    return {
      via,
      server,
      text: (t) =>
        execKubeconfig({ task: t.name, server, certificateAuthorityData: caData, namespace: t.namespace, broker: c.url, brokerCa: c.brokerCa, plugin: deps.plugin, via }),
    };
  }

  /** Polls the approval request until it is approved (then starts), closed, timed out or the call is cancelled; reports progress. */
  async function waitForApproval(c: BrokerClient, request: StartTask, id: string, timeout: string, extra: Extra): Promise<TaskView> {
    const deadline = Date.now() + parseDuration(timeout) * 1000;
    const token = extra._meta?.progressToken;
    let sent = 0;
    let lastText = '';
    let lastAt = 0;
    for (;;) {
      const approval = await c.getApproval(id);
      if (approval.state === 'approved' && approval.approvalToken) return c.startTask(request, approval.approvalToken);
      const facts = { id, approvers: approval.approvers, required: approval.required, approvals: approval.approvals, expiresAt: approval.expiresAt };
      if (approval.state !== 'pending') {
        throw new ToolFailure('approval_closed', `approval request ${id} was ${approval.state}`, { approval: facts });
      }
      if (Date.now() > deadline) {
        throw new ToolFailure('approval_required', `approval request ${id} is still pending after ${timeout}`, {
          approval: facts,
          next: 'call start_task again with the same arguments and "wait": true to keep waiting, or tell your user who can approve',
        });
      }
      const text = printable(`waiting for approval of ${id}: ${approval.approvals} of ${approval.required}; a member of ${approval.approvers.join(' or ')} runs: broker approve ${id}`);
      if (token !== undefined && (text !== lastText || Date.now() - lastAt >= 5000)) {
        // progress must grow with each notification: it counts them; the message says where the approvals stand.
        await extra.sendNotification({ method: 'notifications/progress', params: { progressToken: token, progress: ++sent, message: text } });
        lastText = text;
        lastAt = Date.now();
      }
      // Cancelled (notifications/cancelled): the sleep throws, no start follows, the request stays open.
      await sleep(pollMs, undefined, { signal: extra.signal });
    }
  }

  return server;
}

/** What the approval_required error adds: who can approve and how far it is. Best effort. */
async function approvalFacts(c: BrokerClient, id: string): Promise<ApprovalFacts> {
  try {
    const a = await c.getApproval(id);
    return { id, approvers: a.approvers, required: a.required, approvals: a.approvals, expiresAt: a.expiresAt };
  } catch {
    return { id, approvers: ['the template\'s approver groups (list_templates)'], required: 1, approvals: 0 };
  }
}

/** ajv's first complaint, in the agent's terms, naming the argument. */
function argumentError(tool: ToolName, e: ErrorObject | undefined): BrokerError {
  if (!e) return new BrokerError('invalid_argument', `${tool}: the arguments are not valid`);
  const arg = e.instancePath.replace(/^\//, '').split('/')[0] || (e.params as { missingProperty?: string; additionalProperty?: string }).missingProperty || (e.params as { additionalProperty?: string }).additionalProperty || '';
  const allowed = Object.keys((TOOLS.find((t) => t.name === tool)!.inputSchema.properties ?? {}) as object);
  let message: string;
  switch (e.keyword) {
    case 'required':
      message = `"${arg}" is required`;
      break;
    case 'additionalProperties':
      return new ToolFailure('invalid_argument', `${tool} takes no argument "${printable(arg)}"; it takes ${allowed.map((a) => `"${a}"`).join(', ') || 'none'}`, {
        field: printable(arg),
        next: `call ${tool} again without "${printable(arg)}"`,
      });
    default:
      message = `"${arg}" ${e.message ?? 'is not valid'}`;
  }
  return new BrokerError('invalid_argument', message, { field: printable(arg) });
}
