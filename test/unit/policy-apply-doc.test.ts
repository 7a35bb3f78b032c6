/**
 * docs/policy.md's "What `broker policy apply` creates" lists exactly what apply grants: this renders
 * desiredObjects() for docs/examples/policy.yaml in the doc's words (its placeholders BROKER_NS,
 * TASK_NS, SA, N, NAME) and compares both tables with the doc, in both directions, so neither can
 * change without the other.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { boundClusterRole, BROKER_ROLE, desiredObjects, type DesiredObject } from '../../src/policy/apply.ts';
import { loadPolicy } from '../../src/policy/parse.ts';
import type { Policy, PolicyRule } from '../../src/policy/types.ts';
import { templateClusterRole } from '../../src/tasks/model.ts';

const DOC = new URL('../../docs/policy.md', import.meta.url);
const EXAMPLE = new URL('../../docs/examples/policy.yaml', import.meta.url).pathname;
const SECTION = '### What `broker policy apply` creates';

/** The rows of the markdown table whose header row starts with `| FIRST |`, as trimmed cells. */
function tableRows(markdown: string, first: string): string[][] {
  const start = markdown.indexOf(SECTION);
  assert.ok(start >= 0, `docs/policy.md has the section ${SECTION}`);
  const lines = markdown.slice(start).split('\n');
  const header = lines.findIndex((l) => l.startsWith(`| ${first} |`));
  assert.ok(header >= 0, `a table with a "${first}" column in ${SECTION}`);
  const rows: string[][] = [];
  for (const line of lines.slice(header + 2)) {
    if (!line.startsWith('|')) break;
    rows.push(line.split('|').slice(1, -1).map((c) => c.trim()));
  }
  return rows;
}

/** How the doc writes names and namespaces. */
function docWords(policy: Policy) {
  const ns = (n: string) => (n === policy.broker.namespace ? '`BROKER_NS`' : n === policy.broker.taskNamespace ? '`TASK_NS`' : '`N`');
  const templateRoles = new Set(policy.templates.filter((t) => t.rules).map((t) => templateClusterRole(t.name)));
  const name = (o: DesiredObject) => {
    if (o.kind === 'Namespace') return ns(o.name);
    if (o.kind === 'ServiceAccount') return o.name === policy.broker.serviceAccount ? '`SA`' : `\`${o.name}\``;
    if (o.kind === 'ClusterRole' && templateRoles.has(o.name)) return '`task-broker:template:NAME`';
    return `\`${o.name}\``;
  };
  return { ns, name };
}

/** Objects as the first table has them: object, namespace, and for bindings what they bind to whom. */
function objectRows(policy: Policy): Set<string> {
  const { ns, name } = docWords(policy);
  const rows = new Set<string>();
  for (const o of desiredObjects(policy)) {
    const where = 'namespace' in o ? ns(o.namespace) : '';
    const what =
      o.kind === 'RoleBinding' || o.kind === 'ClusterRoleBinding'
        ? `${o.roleRef.kind} \`${o.roleRef.name}\` to ${o.subjects
            .map((s) => `${s.kind} \`${ns(s.namespace).slice(1, -1)}/${s.name === policy.broker.serviceAccount ? 'SA' : s.name}\``)
            .join(', ')}`
        : '';
    rows.add(`${o.kind} ${name(o)} | ${where}${what ? ` | ${what}` : ''}`);
  }
  return rows;
}

function docObjectRows(markdown: string): Set<string> {
  return new Set(
    tableRows(markdown, 'object').map(([object, where, what]) => {
      const binds = object!.startsWith('RoleBinding') || object!.startsWith('ClusterRoleBinding');
      return `${object} | ${where}${binds ? ` | ${what}` : ''}`;
    }),
  );
}

/** The broker's own rules as the second table has them; resourceNames that depend on the policy are checked here and named as the doc names them. */
function ruleRows(policy: Policy): Set<string> {
  const { ns } = docWords(policy);
  const rows = new Set<string>();
  const list = (xs: readonly string[] | undefined) => (xs ?? []).map((x) => `\`${x}\``).join(', ');
  const clusterRoleTemplates = [...new Set(policy.templates.flatMap((t) => (t.clusterRole ? [t.clusterRole] : [])))].sort();
  for (const o of desiredObjects(policy)) {
    if ((o.kind !== 'Role' && o.kind !== 'ClusterRole') || o.name !== BROKER_ROLE) continue;
    const where = o.kind === 'Role' ? ns(o.namespace) : '';
    for (const r of o.rules as PolicyRule[]) {
      const group = (r.apiGroups ?? ['']).map((g) => (g === '' ? 'core' : `\`${g}\``)).join(', ');
      let names = list(r.resourceNames);
      if (o.kind === 'Role' && where === '`N`' && r.resources?.includes('clusterroles')) {
        const bindable: string[] = policy.templates.filter((t) => t.namespaces.includes(o.namespace)).map(boundClusterRole);
        assert.deepEqual(r.resourceNames, [...new Set(bindable)].sort(), `bind in ${o.namespace}: exactly the ClusterRoles of the templates allowing it`);
        names = 'the ClusterRoles of the templates that allow `N`';
      } else if (o.kind === 'ClusterRole' && r.resources?.includes('clusterroles')) {
        assert.deepEqual(r.resourceNames, clusterRoleTemplates, 'get: exactly the ClusterRoles that clusterRole templates name');
        names = 'the ClusterRoles that `clusterRole` templates name (no such rule when there are none)';
      }
      rows.add([`${o.kind} \`${o.name}\``, where, group, list(r.resources), r.verbs.join(', '), names].join(' | '));
    }
  }
  return rows;
}

function docRuleRows(markdown: string): Set<string> {
  return new Set(tableRows(markdown, 'role').map((cells) => cells.join(' | ')));
}

function assertSameRows(fromCode: Set<string>, fromDoc: Set<string>, what: string): void {
  const missing = [...fromCode].filter((r) => !fromDoc.has(r));
  const extra = [...fromDoc].filter((r) => !fromCode.has(r));
  assert.deepEqual(missing, [], `${what}: apply creates these, docs/policy.md does not list them`);
  assert.deepEqual(extra, [], `${what}: docs/policy.md lists these, apply does not create them`);
}

test('the example policy exercises every kind of row: both broker namespaces, target namespaces, rules and clusterRole templates', async () => {
  const policy = await loadPolicy(EXAMPLE);
  assert.ok(policy.templates.some((t) => t.rules) && policy.templates.some((t) => t.clusterRole), 'templates of both kinds');
  assert.notEqual(policy.broker.namespace, policy.broker.taskNamespace);
});

test("docs/policy.md lists exactly the objects policy apply creates (and each binding's role and subject)", async () => {
  const policy = await loadPolicy(EXAMPLE);
  assertSameRows(objectRows(policy), docObjectRows(readFileSync(DOC, 'utf8')), 'objects');
});

test("docs/policy.md lists exactly the rules of the broker's own roles: verbs, resources, API groups, resourceNames", async () => {
  const policy = await loadPolicy(EXAMPLE);
  assertSameRows(ruleRows(policy), docRuleRows(readFileSync(DOC, 'utf8')), 'rules');
});

test('the comparison would notice drift: a rule added in code, a verb changed or a row removed in the doc', async () => {
  const policy = await loadPolicy(EXAMPLE);
  const doc = readFileSync(DOC, 'utf8');
  const code = ruleRows(policy);
  code.add('Role `task-broker:broker` | `TASK_NS` | core | `configmaps` | get | ');
  assert.throws(() => assertSameRows(code, docRuleRows(doc), 'rules'), /docs\/policy\.md does not list them/);
  const change = (from: RegExp, to: string) => {
    const changed = doc.replace(from, to);
    assert.notEqual(changed, doc, String(from));
    return changed;
  };
  const narrower = change(/(`BROKER_NS` \| core \| `secrets` \| )get, update/, '$1get');
  assert.throws(() => assertSameRows(ruleRows(policy), docRuleRows(narrower), 'rules'), /does not list them|does not create them/);
  const noToken = change(/^\| Role `task-broker:broker` \| `TASK_NS` \| core \| `serviceaccounts\/token` .*\n/m, '');
  assert.throws(() => assertSameRows(ruleRows(policy), docRuleRows(noToken), 'rules'), /does not list them/);
  const noBinding = change(/^\| RoleBinding `task-broker:broker` \| `BROKER_NS` .*\n/m, '');
  assert.throws(() => assertSameRows(objectRows(policy), docObjectRows(noBinding), 'objects'), /does not list them/);
  const otherSubject = change(/(RoleBinding `task-broker:broker` \| `TASK_NS` \| Role `task-broker:broker` to ServiceAccount `)BROKER_NS/, '$1TASK_NS');
  assert.throws(() => assertSameRows(objectRows(policy), docObjectRows(otherSubject), 'objects'), /does not list them|does not create them/);
});
