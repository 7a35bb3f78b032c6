/**
 * The objects of `broker policy apply` as Kubernetes manifests (`policy apply --dry-run -o yaml`), so
 * another tool (the Helm chart in deploy/helm/task-broker, `kubectl apply`) can create exactly what
 * apply would: the same desiredObjects(), the same bodies upsert() sends, nothing added.
 */
import { stringify } from 'yaml';
import type { DesiredObject } from './apply.ts';

/** The header line that carries the SHA-256 of the policy file the objects were made from (the chart checks it). */
export const POLICY_SHA256_MARK = 'task-broker.dev/policy-sha256';

const RBAC = 'rbac.authorization.k8s.io/v1';

/** One desired object as the manifest apply's create call sends (apiVersion and kind added). */
export function manifestOf(obj: DesiredObject): Record<string, unknown> {
  switch (obj.kind) {
    case 'Namespace':
      return { apiVersion: 'v1', kind: obj.kind, metadata: { name: obj.name, labels: obj.labels } };
    case 'ServiceAccount':
      return { apiVersion: 'v1', kind: obj.kind, metadata: { name: obj.name, namespace: obj.namespace, labels: obj.labels } };
    case 'ClusterRole':
      return { apiVersion: RBAC, kind: obj.kind, metadata: { name: obj.name, labels: obj.labels }, rules: obj.rules };
    case 'Role':
      return { apiVersion: RBAC, kind: obj.kind, metadata: { name: obj.name, namespace: obj.namespace, labels: obj.labels }, rules: obj.rules };
    case 'ClusterRoleBinding':
      return { apiVersion: RBAC, kind: obj.kind, metadata: { name: obj.name, labels: obj.labels }, roleRef: obj.roleRef, subjects: obj.subjects };
    case 'RoleBinding':
      return {
        apiVersion: RBAC,
        kind: obj.kind,
        metadata: { name: obj.name, namespace: obj.namespace, labels: obj.labels },
        roleRef: obj.roleRef,
        subjects: obj.subjects,
      };
  }
}

/**
 * A multi-document YAML of every object, in apply order, after a comment header that names the
 * policy file's SHA-256 (`# task-broker.dev/policy-sha256: HEX`). Documents are separated by `---`
 * lines; no anchors or aliases (each object is written out in full).
 */
export function manifestsYaml(objects: readonly DesiredObject[], policySha256: string): string {
  const header =
    '# The objects `broker policy apply` makes exist for this policy, from `broker policy apply --dry-run -o yaml`.\n' +
    '# Generated: do not edit; generate it again whenever the policy changes.\n' +
    `# ${POLICY_SHA256_MARK}: ${policySha256}\n`;
  return header + objects.map((o) => `---\n${stringify(manifestOf(o), { aliasDuplicateObjects: false, lineWidth: 0 })}`).join('');
}
