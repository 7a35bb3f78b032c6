/**
 * The tools `broker mcp` offers an agent: name, description, input and output JSON Schemas, and
 * annotations. Data only; src/mcp/server.ts runs them. The schemas are strict (no unknown argument
 * is ignored) and are also what the server validates arguments with (ajv), so what the client is
 * told and what is enforced cannot drift apart.
 */
import type { Tool } from '@modelcontextprotocol/sdk/types.js';

export type ToolName = 'list_templates' | 'start_task' | 'task_status' | 'list_tasks' | 'end_task';

// A task name, as the broker takes it (DNS-1123 label).
const NAME = '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$';

const taskRef = { type: 'string', minLength: 1, maxLength: 63, description: 'the task name (or its id)' } as const;

const task = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    name: { type: 'string' },
    agent: { type: 'string' },
    template: { type: 'string' },
    namespace: { type: 'string' },
    createdAt: { type: 'string', description: 'ISO 8601' },
    expiresAt: { type: 'string', description: 'ISO 8601: the access ends then at the latest' },
    reason: { type: 'string' },
    approvalId: { type: 'string', description: 'the approval request this task was started with' },
    state: { type: 'string', enum: ['active', 'ended', 'expired', 'revoked', 'cleaned'] },
    endedAt: { type: 'string' },
    endedBy: { type: 'string' },
    cause: { type: 'string' },
  },
  required: ['id', 'name', 'agent', 'template', 'namespace', 'createdAt', 'expiresAt'],
} as const;

const kubeconfig = {
  type: 'object',
  description: 'a kubeconfig for this task; it holds no secret (its user is the `broker credential` exec entry, which asks the broker on every use)',
  properties: {
    path: { type: 'string', description: 'give this to kubectl (--kubeconfig) or a Kubernetes MCP server' },
    context: { type: 'string' },
    namespace: { type: 'string' },
    server: { type: 'string', description: "the broker's Kubernetes API proxy (via proxy) or the API server (via direct)" },
    via: { type: 'string', enum: ['proxy', 'direct'] },
  },
  required: ['path', 'context', 'namespace', 'server', 'via'],
} as const;

const leftBehind = {
  type: 'array',
  items: {
    type: 'object',
    properties: {
      verb: { type: 'string' },
      resource: { type: 'string' },
      kind: { type: 'string' },
      namespace: { type: 'string' },
      name: { type: 'string' },
      why: { type: 'string' },
      at: { type: 'string' },
      auditID: { type: 'string' },
    },
  },
} as const;

const noArguments = { type: 'object', properties: {}, additionalProperties: false } as const;

export const TOOLS: Array<Tool & { name: ToolName }> = [
  {
    name: 'list_templates',
    title: 'List the task templates you may start',
    description:
      'What you may ask Kubernetes access for: each template (a fixed set of verbs and resources), the namespaces it allows, ' +
      'its TTL range, and whether a start needs an approval by a person (gated) and from which approver groups. Call this before start_task.',
    inputSchema: noArguments,
    outputSchema: {
      type: 'object',
      properties: {
        templates: {
          type: 'array',
          items: {
            type: 'object',
            properties: {
              name: { type: 'string' },
              description: { type: 'string' },
              namespaces: { type: 'array', items: { type: 'string' } },
              ttl: {
                type: 'object',
                properties: { default: { type: 'string' }, max: { type: 'string' }, defaultSeconds: { type: 'integer' }, maxSeconds: { type: 'integer' } },
                required: ['default', 'max', 'defaultSeconds', 'maxSeconds'],
              },
              gated: { type: 'boolean', description: 'a start needs an approval by someone else first' },
              gatedBecause: { type: 'array', items: { type: 'string' } },
              approval: {
                type: 'object',
                properties: { approvers: { type: 'array', items: { type: 'string' }, description: 'approver groups' }, required: { type: 'integer' } },
                required: ['approvers', 'required'],
              },
            },
            required: ['name', 'namespaces', 'ttl', 'gated'],
          },
        },
      },
      required: ['templates'],
    },
    annotations: { title: 'List task templates', readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },
  },
  {
    name: 'start_task',
    title: 'Start a task: short-lived Kubernetes access',
    description:
      'Asks the broker for access to Kubernetes for one task: a template\'s verbs and resources, in one namespace, for a limited time ' +
      '(the broker records who asked and why). Returns the task and the path of a kubeconfig for it (no secret in it: give the path to ' +
      'kubectl or a Kubernetes MCP server). A gated template needs an approval by a person first: without "wait" you get an ' +
      'approval_required error naming the request and who can approve; with "wait": true this call waits for the approval ' +
      '(progress is reported) and then starts the task. Call end_task as soon as you are done.',
    inputSchema: {
      type: 'object',
      properties: {
        template: { type: 'string', minLength: 1, maxLength: 63, description: 'a template name from list_templates' },
        namespace: { type: 'string', minLength: 1, maxLength: 63, description: 'one of the namespaces the template allows' },
        reason: { type: 'string', minLength: 1, maxLength: 1024, description: 'why you need this access; recorded in the audit log and shown to approvers' },
        ttl: { type: 'string', minLength: 1, maxLength: 16, description: "how long: 90s, 15m, 1h30m (default: the template's; at most its maximum)" },
        name: { type: 'string', pattern: NAME, maxLength: 63, description: 'the task name, unique among your active tasks (default: the template name); the kubeconfig is NAME.kubeconfig' },
        wait: { type: 'boolean', default: false, description: 'for a gated template: wait until it is approved, then start' },
        wait_timeout: { type: 'string', minLength: 1, maxLength: 16, default: '10m', description: 'with wait: give up after this long (the request stays open)' },
      },
      required: ['template', 'namespace', 'reason'],
      additionalProperties: false,
    },
    outputSchema: {
      type: 'object',
      properties: { task, kubeconfig, usage: { type: 'string', description: 'how to use the access, and how to end it' } },
      required: ['task', 'kubeconfig', 'usage'],
    },
    annotations: { title: 'Start a task', readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: false },
  },
  {
    name: 'task_status',
    title: 'Show one of your tasks',
    description: 'One of your tasks, active or ended: its state, when it expires or when and why it ended, and its kubeconfig path.',
    inputSchema: { type: 'object', properties: { task: taskRef }, required: ['task'], additionalProperties: false },
    outputSchema: {
      type: 'object',
      properties: { task, kubeconfig: { type: 'string', description: 'the kubeconfig path of this task name, when written' } },
      required: ['task'],
    },
    annotations: { title: 'Show a task', readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },
  },
  {
    name: 'list_tasks',
    title: 'List your tasks',
    description: 'Your active tasks; with "all": true also those that ended, expired or were revoked (kept for a few days).',
    inputSchema: { type: 'object', properties: { all: { type: 'boolean', default: false } }, additionalProperties: false },
    outputSchema: { type: 'object', properties: { tasks: { type: 'array', items: task } }, required: ['tasks'] },
    annotations: { title: 'List tasks', readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },
  },
  {
    name: 'end_task',
    title: 'End a task now',
    description:
      'Ends one of your tasks at once: its access is revoked (the kubeconfig stops working) and the end is recorded. Reports what the task ' +
      'left behind that can hold or grant access (when the broker records it). Ending an ended task changes nothing and says when it ended.',
    inputSchema: { type: 'object', properties: { task: taskRef }, required: ['task'], additionalProperties: false },
    outputSchema: {
      type: 'object',
      properties: {
        task,
        ended: { type: 'boolean', const: true },
        recording: { type: 'string', enum: ['webhook', 'none'] },
        leftBehind,
        hint: { type: 'string' },
      },
      required: ['task', 'ended'],
    },
    annotations: { title: 'End a task', readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
  },
];
