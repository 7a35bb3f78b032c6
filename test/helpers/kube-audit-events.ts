/** Synthetic audit.k8s.io/v1 events, shaped as the API server's webhook sends them, for the tests that post batches. */
import { randomUUID } from 'node:crypto';

/** An event as JSON (tests read its fields back loosely). */
export type AuditEventJson = Record<string, any>;

/** The username of a task's ServiceAccount (what the API server records for a task's requests). */
export const taskUser = (taskNamespace: string, taskId: string): string => `system:serviceaccount:${taskNamespace}:task-${taskId}`;

/** The API server's timestamp form (microseconds): `at`, plus `micros` (< 1000) within its millisecond. */
export const auditTime = (at: Date, micros = 0): string => at.toISOString().replace('Z', `${String(micros).padStart(3, '0')}Z`);

/**
 * A Metadata-level event of a request on pods: of the pod `name` (default web-1), or with `name: null`
 * a list of the namespace's pods.
 */
export function podEvent(o: {
  username: string;
  jti?: string;
  stage?: string;
  verb?: string;
  namespace?: string;
  name?: string | null;
  code?: number;
  decision?: string;
  auditID?: string;
  time?: string;
}): AuditEventJson {
  const t = o.time ?? auditTime(new Date());
  const namespace = o.namespace ?? 'team-a';
  const name = o.name === undefined ? 'web-1' : o.name;
  return {
    kind: 'Event',
    apiVersion: 'audit.k8s.io/v1',
    level: 'Metadata',
    auditID: o.auditID ?? randomUUID(),
    stage: o.stage ?? 'ResponseComplete',
    requestURI: name === null ? `/api/v1/namespaces/${namespace}/pods?limit=500` : `/api/v1/namespaces/${namespace}/pods/${name}`,
    verb: o.verb ?? (name === null ? 'list' : 'get'),
    user: {
      username: o.username,
      groups: ['system:serviceaccounts', 'system:authenticated'],
      ...(o.jti ? { extra: { 'authentication.kubernetes.io/credential-id': [`JTI=${o.jti}`] } } : {}),
    },
    sourceIPs: ['127.0.0.1'],
    userAgent: 'synthetic/1.0',
    objectRef: { resource: 'pods', namespace, ...(name === null ? {} : { name }), apiVersion: 'v1' },
    responseStatus: { metadata: {}, code: o.code ?? 200 },
    requestReceivedTimestamp: t,
    stageTimestamp: t,
    annotations: { 'authorization.k8s.io/decision': o.decision ?? 'allow', 'authorization.k8s.io/reason': 'RBAC: allowed by RoleBinding' },
  };
}

/** A webhook batch. */
export const eventList = (items: AuditEventJson[]) => ({ kind: 'EventList', apiVersion: 'audit.k8s.io/v1', metadata: {}, items });
