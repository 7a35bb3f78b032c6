/**
 * A task and the Kubernetes objects that carry it. State lives in the cluster, so any replica (or a
 * restarted broker) rebuilds its view from these labels and annotations.
 *
 * Per task, in the broker's task namespace:
 *   Secret          task-<hash of agent/name>  the task record and the name lock (one per agent+name);
 *                                            tokens are bound to it, so deleting it revokes them
 *   ServiceAccount  task-<id>                  the identity the task's tokens are minted for
 * and in the target namespace:
 *   RoleBinding     task-broker-<id>           to ClusterRole task-broker:template:<template>
 */
import { createHash, randomBytes } from 'node:crypto';
import type { V1ObjectMeta, V1Secret } from '@kubernetes/client-node';
import { SIGNATURE_ANNOTATION, type Facts } from '../state-signature.ts';

export const GROUP = 'task-broker.dev';
export const LABEL = {
  managedBy: 'app.kubernetes.io/managed-by',
  kind: `${GROUP}/kind`,
  taskId: `${GROUP}/task-id`,
  taskName: `${GROUP}/task-name`,
  agent: `${GROUP}/agent`,
  template: `${GROUP}/template`,
  state: `${GROUP}/state`,
} as const;
export const ANNOTATION = {
  namespace: `${GROUP}/namespace`,
  createdAt: `${GROUP}/created-at`,
  expiresAt: `${GROUP}/expires-at`,
  reason: `${GROUP}/reason`,
  approvalId: `${GROUP}/approval-id`,
} as const;
export const MANAGED_BY = 'task-broker';
/** Selects every object task-broker created for tasks. */
export const TASK_SELECTOR = `${LABEL.managedBy}=${MANAGED_BY},${LABEL.kind}=task`;

/** A task record is `pending` until all its objects exist; only `active` tasks grant anything. */
export type TaskState = 'pending' | 'active';

export interface Task {
  id: string;
  name: string;
  agent: string;
  template: string;
  /** The namespace the task grants access in. */
  namespace: string;
  createdAt: Date;
  expiresAt: Date;
  reason?: string;
  approvalId?: string;
  state: TaskState;
  /** The broker's signature over taskFacts(): a record that fails it is not trusted (src/state-signature.ts). */
  signature?: string;
  /** Object names (the Secret and ServiceAccount are in the broker's task namespace). */
  secretName: string;
  secretUid?: string;
  serviceAccount: string;
  roleBinding: string;
}

/** What the API returns for a task. */
export interface TaskView {
  id: string;
  name: string;
  agent: string;
  template: string;
  namespace: string;
  createdAt: string;
  expiresAt: string;
  reason?: string;
  approvalId?: string;
}

export function toView(task: Task): TaskView {
  return {
    id: task.id,
    name: task.name,
    agent: task.agent,
    template: task.template,
    namespace: task.namespace,
    createdAt: task.createdAt.toISOString(),
    expiresAt: task.expiresAt.toISOString(),
    ...(task.reason === undefined ? {} : { reason: task.reason }),
    ...(task.approvalId === undefined ? {} : { approvalId: task.approvalId }),
  };
}

/** 12 characters of [a-z0-9], a valid DNS label fragment; ~62 bits. */
export function newTaskId(): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = randomBytes(12);
  let id = '';
  for (const b of bytes) id += alphabet[b % 36];
  return id;
}

export function secretNameFor(agent: string, name: string): string {
  return `task-${createHash('sha256').update(`${agent}\0${name}`).digest('hex').slice(0, 24)}`;
}

export function serviceAccountNameFor(id: string): string {
  return `task-${id}`;
}

export function roleBindingNameFor(id: string): string {
  return `task-broker-${id}`;
}

export function templateClusterRole(template: string): string {
  return `task-broker:template:${template}`;
}

export function taskLabels(task: Pick<Task, 'id' | 'name' | 'agent' | 'template'>): Record<string, string> {
  return {
    [LABEL.managedBy]: MANAGED_BY,
    [LABEL.kind]: 'task',
    [LABEL.taskId]: task.id,
    [LABEL.taskName]: task.name,
    [LABEL.agent]: task.agent,
    [LABEL.template]: task.template,
  };
}

/** What the broker signs of a task: who, what grant, where, until when, and the record it lives in. */
export function taskFacts(task: Pick<Task, 'id' | 'name' | 'agent' | 'template' | 'namespace' | 'createdAt' | 'expiresAt' | 'reason' | 'approvalId' | 'secretName'>): Facts {
  return {
    id: task.id,
    name: task.name,
    agent: task.agent,
    template: task.template,
    namespace: task.namespace,
    createdAt: task.createdAt.toISOString(),
    expiresAt: task.expiresAt.toISOString(),
    reason: task.reason ?? null,
    approvalId: task.approvalId ?? null,
    secret: task.secretName,
  };
}

export function taskAnnotations(task: Task): Record<string, string> {
  return {
    ...(task.signature === undefined ? {} : { [SIGNATURE_ANNOTATION]: task.signature }),
    [ANNOTATION.namespace]: task.namespace,
    [ANNOTATION.createdAt]: task.createdAt.toISOString(),
    [ANNOTATION.expiresAt]: task.expiresAt.toISOString(),
    ...(task.reason === undefined ? {} : { [ANNOTATION.reason]: task.reason }),
    ...(task.approvalId === undefined ? {} : { [ANNOTATION.approvalId]: task.approvalId }),
  };
}

/** The task a Secret records, or undefined when the Secret is not a well-formed task record. */
export function taskFromSecret(secret: V1Secret): Task | undefined {
  const meta: V1ObjectMeta = secret.metadata ?? {};
  const labels = meta.labels ?? {};
  const notes = meta.annotations ?? {};
  const id = labels[LABEL.taskId];
  const name = labels[LABEL.taskName];
  const agent = labels[LABEL.agent];
  const template = labels[LABEL.template];
  const namespace = notes[ANNOTATION.namespace];
  const createdAt = new Date(notes[ANNOTATION.createdAt] ?? NaN);
  const expiresAt = new Date(notes[ANNOTATION.expiresAt] ?? NaN);
  if (!id || !name || !agent || !template || !namespace || !meta.name) return undefined;
  if (Number.isNaN(createdAt.getTime()) || Number.isNaN(expiresAt.getTime())) return undefined;
  const reason = notes[ANNOTATION.reason];
  const approvalId = notes[ANNOTATION.approvalId];
  return {
    id,
    name,
    agent,
    template,
    namespace,
    createdAt,
    expiresAt,
    ...(reason === undefined ? {} : { reason }),
    ...(approvalId === undefined ? {} : { approvalId }),
    ...(notes[SIGNATURE_ANNOTATION] === undefined ? {} : { signature: notes[SIGNATURE_ANNOTATION] }),
    state: labels[LABEL.state] === 'active' ? 'active' : 'pending',
    secretName: meta.name,
    ...(meta.uid === undefined ? {} : { secretUid: meta.uid }),
    serviceAccount: serviceAccountNameFor(id),
    roleBinding: roleBindingNameFor(id),
  };
}
