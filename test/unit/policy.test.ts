/** The policy file: YAML form, strict validation with paths and line numbers, defaults, durations, `policy check`. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { BrokerError } from '../../src/errors.ts';
import { DEFAULT_GATED, DEFAULT_GATED_REASONS, LISTED_REASON, gatedPairsHitBy, gatedReason } from '../../src/policy/grants.ts';
import { policySummary } from '../../src/cli/policy.ts';
import { PolicyError, formatIssues, formatDuration, loadPolicy, parseDuration, parsePolicy } from '../../src/policy/parse.ts';
import type { PolicyIssue } from '../../src/policy/types.ts';

const example = new URL('../../docs/examples/policy.yaml', import.meta.url).pathname;
const invalid = new URL('../fixtures/policy/invalid.yaml', import.meta.url).pathname;

/** A small valid policy; tests splice problems into it. */
const MINIMAL = `apiVersion: task-broker/v1alpha1
kind: Policy
broker:
  taskNamespace: task-broker
agents:
  - name: bot
    identities:
      - serviceAccount: agents/bot
templates:
  - name: read
    namespaces: [dev]
    clusterRole: view
    ttl: { default: 10m, max: 1h }
    agents: [bot]
`;

function issuesOf(text: string): PolicyIssue[] {
  try {
    parsePolicy(text, 'p.yaml');
  } catch (err) {
    assert.ok(err instanceof PolicyError, `expected PolicyError, got ${String(err)}`);
    return err.issues;
  }
  assert.fail('expected the policy to be rejected');
}

const where = (issues: PolicyIssue[]) => issues.map((i) => `${i.line} ${i.path}`);

test('the example policy in docs/examples parses, with its values converted', async () => {
  const p = await loadPolicy(example);
  assert.deepEqual(p.agents.map((a) => a.name), ['code-agent', 'ci']);
  assert.deepEqual(p.templates.map((t) => t.name), ['read-pods', 'deployer', 'debug-exec', 'view']);
  assert.equal(p.broker.namespace, 'task-broker-system');
  assert.equal(p.broker.taskNamespace, 'task-broker');
  assert.deepEqual(p.broker.limits, { activeTasksPerAgent: 10, openApprovalsPerAgent: 5 });
  assert.deepEqual(p.people, [
    {
      name: 'alice',
      identities: [
        { kind: 'oidc', issuer: 'https://login.example.com', subject: 'alice' },
        { kind: 'oidc', issuer: 'https://sso.example.org', subject: 'alice@example.com' },
      ],
    },
    { name: 'bob', identities: [{ kind: 'oidc', issuer: 'https://login.example.com', subject: 'bob' }] },
  ]);
  assert.deepEqual(p.approverGroups[0]!.members, [{ kind: 'person', name: 'alice' }, { kind: 'person', name: 'bob' }]);
  assert.equal(p.templates[3]!.clusterRole, 'view');
  assert.deepEqual(p.agents[0]!.identities, [
    { kind: 'serviceAccount', namespace: 'agents', name: 'code-agent', username: 'system:serviceaccount:agents:code-agent' },
  ]);
  const readPods = p.templates[0]!;
  assert.equal(readPods.defaultTtl, 900);
  assert.equal(readPods.maxTtl, 3600);
  assert.deepEqual(readPods.rules, [{ apiGroups: [''], resources: ['pods', 'pods/log', 'events'], verbs: ['get', 'list', 'watch'] }]);
  assert.deepEqual(p.templates[2]!.approval, { approvers: ['sre', 'security'], required: 2 });
  assert.deepEqual(p.gated, DEFAULT_GATED);
  assert.deepEqual(p.defaultApproval, { approvers: ['sre'], required: 1 });
  assert.deepEqual(p.approverGroups.map((g) => g.name), ['sre', 'security']);
  assert.equal(p.broker.notifyWebhook, 'https://hooks.example.com/task-broker');
});

test('the example policy: only debug-exec touches the default gated set', async () => {
  const p = await loadPolicy(example);
  const hits = p.templates.map((t) => gatedPairsHitBy(t.rules ?? [], p.gated).map((g) => `${g.verb} ${g.resource}`));
  assert.deepEqual(hits, [[], [], ['create pods/exec'], []]); // view is a clusterRole template: checked at apply and start
});

test('defaults are applied when keys are absent: broker settings, default gated set, approval requirement', () => {
  const p = parsePolicy(MINIMAL + 'approvers:\n  - name: sre\n    members: [{ oidc: { issuer: "https://idp", subject: a } }]\n  - name: sec\n    members: [{ oidc: { issuer: "https://idp", subject: b } }]\n');
  assert.deepEqual(p.broker, {
    namespace: 'task-broker-system',
    taskNamespace: 'task-broker',
    serviceAccount: 'task-broker',
    tokenTtl: 600,
    identityAudience: 'task-broker',
    approvalRequestTtl: 3600,
    taskHistory: 7 * 24 * 3600,
    limits: { activeTasksPerAgent: 10, openApprovalsPerAgent: 5 },
    proxyOnly: false,
  });
  assert.deepEqual(p.people, []);
  assert.deepEqual(p.gated, DEFAULT_GATED);
  assert.equal(p.gated.length, 44);
  assert.notEqual(p.gated, DEFAULT_GATED, 'the policy gets its own copy');
  assert.deepEqual(p.defaultApproval, { approvers: ['sre', 'sec'], required: 1 });
  assert.equal(p.templates[0]!.clusterRole, 'view');
  assert.equal(p.templates[0]!.rules, undefined);
  assert.equal(p.templates[0]!.approval, undefined);
});

test('the default gated set is the documented one', () => {
  assert.deepEqual(
    DEFAULT_GATED.map((g) => `${g.verb} ${g.apiGroup || 'core'}/${g.resource}`),
    [
      'delete core/namespaces',
      'create core/pods/exec',
      'get core/pods/exec',
      'create core/pods/attach',
      'get core/pods/attach',
      'create core/pods/portforward',
      'get core/pods/portforward',
      'get core/secrets',
      'list core/secrets',
      'watch core/secrets',
      'escalate */*',
      'bind */*',
      'impersonate */*',
      // what lets a holder create access that outlives the task (issue 11)
      'create core/serviceaccounts/token',
      'create core/serviceaccounts',
      'create core/secrets',
      'update core/secrets',
      'patch core/secrets',
      ...['rolebindings', 'roles', 'clusterrolebindings', 'clusterroles'].flatMap((r) => ['create', 'update', 'patch'].map((v) => `${v} rbac.authorization.k8s.io/${r}`)),
      'create certificates.k8s.io/certificatesigningrequests',
      ...['validatingwebhookconfigurations', 'mutatingwebhookconfigurations'].flatMap((r) => ['create', 'update', 'patch'].map((v) => `${v} admissionregistration.k8s.io/${r}`)),
      'create core/pods',
      'create apps/deployments',
      'create apps/statefulsets',
      'create apps/daemonsets',
      'create apps/replicasets',
      'create batch/jobs',
      'create batch/cronjobs',
    ],
  );
  // `patch deployments` (kubectl rollout restart, the README's CI example) stays ungated.
  assert.ok(!DEFAULT_GATED.some((g) => g.resource === 'deployments' && g.verb !== 'create'));
});

test('docs/policy.md lists the default gated set with the same reasons, pair for pair', () => {
  const doc = readFileSync(new URL('../../docs/policy.md', import.meta.url), 'utf8');
  // The table after "the **default gated set** applies", from its header to the first line that is not a row.
  const lines = doc.slice(doc.indexOf('the **default gated set** applies')).split('\n');
  const start = lines.findIndex((l) => l.startsWith('| verb'));
  const end = lines.findIndex((l, i) => i > start && !l.startsWith('|'));
  const rows = lines.slice(start + 2, end);
  assert.ok(rows.length > 10, 'the table is there');
  const documented = new Set<string>();
  for (const row of rows) {
    const [verbs, resources, group, why] = row.slice(2, -2).split(' | ');
    const ticked = (cell: string) => [...cell!.matchAll(/`([^`]+)`/g)].map((m) => m[1]!);
    const apiGroup = group === 'core' ? '' : ticked(group!)[0]!;
    for (const verb of ticked(verbs!)) for (const resource of ticked(resources!)) documented.add(`${verb} ${resource} ${apiGroup}: ${why}`);
  }
  const coded = new Set(DEFAULT_GATED_REASONS.map((r) => `${r.pair.verb} ${r.pair.resource} ${r.pair.apiGroup}: ${r.reason}`));
  assert.deepEqual([...documented].filter((d) => !coded.has(d)), [], 'documented but not in DEFAULT_GATED_REASONS');
  assert.deepEqual([...coded].filter((c) => !documented.has(c)), [], 'in DEFAULT_GATED_REASONS but not documented');
});

test('a pair of a policy\'s own gated list keeps the default reason when it is one of the defaults; others say it is listed', async () => {
  assert.equal(gatedReason({ verb: 'create', resource: 'serviceaccounts/token', apiGroup: '' }), 'can mint tokens that outlive the task');
  assert.equal(gatedReason({ verb: 'delete', resource: 'deployments', apiGroup: 'apps' }), LISTED_REASON);
  const p = parsePolicy(
    MINIMAL.replace('    clusterRole: view\n', '    rules:\n      - { apiGroups: [apps], resources: [deployments], verbs: [delete] }\n      - { resources: [serviceaccounts/token], verbs: [create] }\n') +
      'approvers:\n  - name: sre\n    members: [{ oidc: { issuer: "https://idp", subject: a } }]\n' +
      'gated:\n  - { verb: delete, resource: deployments, apiGroup: apps }\n  - { verb: create, resource: serviceaccounts/token }\n',
  );
  const summary = await policySummary(p);
  assert.deepEqual(summary.gatedTemplates, [{ template: 'read', hits: ['delete apps/deployments', 'create serviceaccounts/token'], approvers: ['sre'], required: 1 }]);
  assert.deepEqual(summary.reasons, { 'delete apps/deployments': LISTED_REASON, 'create serviceaccounts/token': 'can mint tokens that outlive the task' });
});

test('a template approval without required takes required from approvals; without approvers, from approvals too', () => {
  const p = parsePolicy(
    MINIMAL.replace('    agents: [bot]\n', '    agents: [bot]\n    approval: { approvers: [sre] }\n') +
      'approvers:\n  - name: sre\n    members: [{ oidc: { issuer: "https://idp", subject: a } }, { oidc: { issuer: "https://idp", subject: b } }]\n' +
      'approvals: { required: 2 }\n',
  );
  assert.deepEqual(p.templates[0]!.approval, { approvers: ['sre'], required: 2 });
  assert.deepEqual(p.defaultApproval, { approvers: ['sre'], required: 2 });
});

test('an explicit gated list replaces the defaults and expands verbs × resources', () => {
  const p = parsePolicy(
    MINIMAL +
      'gated:\n  - verbs: [delete, deletecollection]\n    resources: [deployments, statefulsets]\n    apiGroup: apps\n  - verb: create\n    resource: pods/exec\n',
  );
  assert.deepEqual(p.gated, [
    { verb: 'delete', resource: 'deployments', apiGroup: 'apps' },
    { verb: 'delete', resource: 'statefulsets', apiGroup: 'apps' },
    { verb: 'deletecollection', resource: 'deployments', apiGroup: 'apps' },
    { verb: 'deletecollection', resource: 'statefulsets', apiGroup: 'apps' },
    { verb: 'create', resource: 'pods/exec', apiGroup: '' },
  ]);
});

test('every problem in a file is reported at once, each with its exact path and line', () => {
  const issues = issuesOf(readFileSync(invalid, 'utf8'));
  assert.deepEqual(where(issues), [
    '4 broker.taskNamespace', // not a DNS-1123 label
    '5 broker.tokenTTL', // below 10m
    '6 broker.approvalRequestTTL', // bare number
    '7 broker.colour', // unknown key
    '12 agents[1].name', // duplicate agent name
    '14 agents[1].identities[0]', // identity already used by another agent
    '15 agents[1].identities[1].oidc.issuer', // http issuer that is not localhost
    '21 templates[0].rules[0].verbs', // empty verbs
    '22 templates[0].clusterRole', // both rules and clusterRole
    '24 templates[0].ttl.default', // default > max
    '26 templates[0].agents[1]', // undeclared agent
    '29 templates[0].approval.required', // more approvals than members
    '30 templates[1].name', // not a DNS-1123 label
    '33 templates[1].ttl.max', // missing key: the line of its parent map
    '35 templates[1].extra', // unknown key in a template
    '42 approvers[1].members[0]', // two identity kinds in one entry
    '45 approvals.approvers[1]', // undeclared approver group
  ]);
});

test('messages quote the field and name the element they are in', () => {
  const byPath = new Map(issuesOf(readFileSync(invalid, 'utf8')).map((i) => [i.path, i.message]));
  assert.equal(byPath.get('broker.tokenTTL'), `"broker.tokenTTL" must be at least 10m (600s, TokenRequest's minimum), got "5m"`);
  assert.equal(byPath.get('templates[1].ttl.max'), `template "Bad_Name": "ttl.max" is required`);
  assert.equal(byPath.get('templates[0].ttl.default'), `template "read-pods": "ttl.default" (2h) must not be longer than "ttl.max" (1h)`);
  assert.match(byPath.get('templates[0].agents[1]')!, /agent "ghost" is not declared in "agents"/);
  assert.match(byPath.get('agents[1].identities[0]')!, /already belongs to agent "code-agent" \(line 11\)/);
  assert.match(byPath.get('templates[0].approval.required')!, /"required" is 3 but approver group "sre" has only 1 distinct member/);
  assert.match(byPath.get('templates[1].extra')!, /unknown key "extra" \(expected one of: name, description,/);
});

test('a duration given as a bare number is rejected with the field quoted', () => {
  const issues = issuesOf(MINIMAL.replace('max: 1h', 'max: 5'));
  assert.deepEqual(issues, [
    {
      path: 'templates[0].ttl.max',
      line: 13,
      message: 'template "read": "ttl.max" must be a duration like "1h", got 5 (bare numbers are not durations: write "5s" or "5m")',
    },
  ]);
});

test('unknown keys are errors at every depth', () => {
  const text = `apiVersion: task-broker/v1alpha1
kind: Policy
extra: 1
broker:
  taskNamespace: tb
  tokenTtl: 10m
agents:
  - name: bot
    nick: b
    identities:
      - serviceAccount: agents/bot
      - oidc: { issuer: "https://idp", subject: s, audience: x }
templates:
  - name: read
    namespaces: [dev]
    rules:
      - resources: [pods]
        verbs: [get]
        verb: list
    ttl: { default: 10m, max: 1h, min: 1m }
    agents: [bot]
    approval: { approvers: [], required: 1, quorum: 2 }
gated:
  - verb: delete
    resource: pods
    group: apps
`;
  const issues = issuesOf(text);
  assert.deepEqual(where(issues), [
    '3 extra',
    '6 broker.tokenTtl',
    '9 agents[0].nick',
    '12 agents[0].identities[1].oidc.audience',
    '19 templates[0].rules[0].verb',
    '20 templates[0].ttl.min',
    '22 templates[0].approval.approvers', // empty list
    '22 templates[0].approval.quorum',
    '22 templates[0].approval.required', // 1 > the 0 members of no groups
    '26 gated[0].group',
  ]);
  for (const i of issues.filter((x) => !/approvers|required/.test(x.path))) assert.match(i.message, /unknown key "/);
});

test('a YAML syntax error is reported with its line', () => {
  const issues = issuesOf('apiVersion: task-broker/v1alpha1\nkind: Policy\nbroker:\n  taskNamespace: [unclosed\nagents: []\n');
  assert.equal(issues.length, 1);
  assert.match(issues[0]!.message, /^YAML syntax error: Flow sequence .* end with a \]/);
  assert.equal(issues[0]!.path, '');
  assert.equal(issues[0]!.line, 5); // where the parser found the unclosed [ ended
});

test('a key given twice in YAML is reported at the second occurrence', () => {
  const issues = issuesOf(MINIMAL.replace('kind: Policy\n', 'kind: Policy\nkind: Policy\n'));
  assert.equal(issues.length, 1);
  assert.equal(issues[0]!.line, 3);
  assert.match(issues[0]!.message, /YAML syntax error: .*unique/i);
});

test('an empty file and missing top-level keys are reported on the document', () => {
  assert.deepEqual(issuesOf(''), [{ path: '', line: 1, message: '"the policy" must be a map, got nothing' }]);
  const issues = issuesOf('# a comment\n\napiVersion: v1\n');
  // Same line: sorted by path.
  assert.deepEqual(where(issues), ['3 agents', '3 apiVersion', '3 broker', '3 kind', '3 templates']);
  assert.equal(issues[1]!.message, '"apiVersion" must be "task-broker/v1alpha1", got "v1"');
  assert.equal(issues[3]!.message, '"kind" is required');
});

test('names must be DNS-1123 labels: templates, agents, approver groups, namespaces', () => {
  const text = MINIMAL.replace('- name: bot', '- name: Bot')
    .replace('agents: [bot]', 'agents: [Bot]')
    .replace('- name: read', `- name: ${'r'.repeat(64)}`)
    .replace('namespaces: [dev]', 'namespaces: [dev-, ok]') + 'approvers:\n  - name: "-sre"\n    members: [{ oidc: { issuer: "https://idp", subject: a } }]\n';
  const issues = issuesOf(text);
  assert.deepEqual(where(issues), ['6 agents[0].name', '10 templates[0].name', '11 templates[0].namespaces[0]', '14 templates[0].agents[0]', '16 approvers[0].name']);
  assert.match(issues[0]!.message, /"name" must be a DNS-1123 label .*got "Bot"/);
});

test('template and approver group names must be unique', () => {
  const tpl = '  - name: read\n    namespaces: [dev]\n    clusterRole: edit\n    ttl: { default: 10m, max: 1h }\n    agents: [bot]\n';
  const text = MINIMAL + tpl + 'approvers:\n  - name: sre\n    members: [{ oidc: { issuer: "https://idp", subject: a } }]\n  - name: sre\n    members: [{ oidc: { issuer: "https://idp", subject: b } }]\n';
  const issues = issuesOf(text);
  assert.deepEqual(where(issues), ['15 templates[1].name', '23 approvers[1].name']);
  assert.match(issues[0]!.message, /template name "read" is already used by templates\[0\] \(line 10\)/);
});

test('a template needs exactly one of rules and clusterRole, and rules need verbs and resources', () => {
  const neither = issuesOf(MINIMAL.replace('    clusterRole: view\n', ''));
  assert.deepEqual(neither.map((i) => [i.line, i.path, i.message]), [
    [10, 'templates[0]', 'template "read": a template has exactly one of "rules" and "clusterRole"'],
  ]);
  const badRules = issuesOf(
    MINIMAL.replace('    clusterRole: view\n', '    rules:\n      - verbs: [get]\n      - resources: [pods]\n      - nonResourceURLs: [/healthz]\n        verbs: [get]\n'),
  );
  assert.deepEqual(where(badRules), ['13 templates[0].rules[0]', '14 templates[0].rules[1].verbs', '15 templates[0].rules[2].nonResourceURLs']);
  assert.match(badRules[1]!.message, /"rules\[1\]\.verbs" is required/);
});

test('a serviceAccount identity must be NAMESPACE/NAME and an identity has exactly one kind', () => {
  const issues = issuesOf(
    MINIMAL.replace('      - serviceAccount: agents/bot\n', '      - serviceAccount: bot\n      - {}\n      - serviceAccount: agents/bot\n        oidc: { issuer: "https://idp", subject: s }\n'),
  );
  assert.deepEqual(where(issues), ['8 agents[0].identities[0].serviceAccount', '9 agents[0].identities[1]', '10 agents[0].identities[2]']);
  assert.match(issues[0]!.message, /must be "NAMESPACE\/NAME" with both parts DNS-1123 labels, got "bot"/);
  assert.match(issues[1]!.message, /exactly one key, "serviceAccount" or "oidc"; got none/);
  assert.match(issues[2]!.message, /got "serviceAccount", "oidc"/);
});

test('an agent may have no identities (it enrols with an agent key)', () => {
  const p = parsePolicy(MINIMAL.replace('    identities:\n      - serviceAccount: agents/bot\n', ''));
  assert.deepEqual(p.agents, [{ name: 'bot', identities: [] }]);
});

test('an identity may appear only once, even within one agent', () => {
  const issues = issuesOf(MINIMAL.replace('      - serviceAccount: agents/bot\n', '      - serviceAccount: agents/bot\n      - serviceAccount: agents/bot\n'));
  assert.deepEqual(where(issues), ['9 agents[0].identities[1]']);
  assert.match(issues[0]!.message, /listed twice/);
});

test('an OIDC issuer must be https, except http on localhost or 127.0.0.1', () => {
  const withIssuer = (issuer: string) =>
    MINIMAL.replace('      - serviceAccount: agents/bot\n', `      - oidc: { issuer: "${issuer}", subject: s }\n`);
  assert.equal(parsePolicy(withIssuer('https://idp.example.com')).agents[0]!.identities[0]!.kind, 'oidc');
  parsePolicy(withIssuer('http://127.0.0.1:8080/realms/x'));
  parsePolicy(withIssuer('http://localhost:9000'));
  assert.deepEqual(where(issuesOf(withIssuer('http://idp.example.com'))), ['8 agents[0].identities[0].oidc.issuer']);
  assert.deepEqual(where(issuesOf(withIssuer('not a url'))), ['8 agents[0].identities[0].oidc.issuer']);
  const group = MINIMAL + 'approvers:\n  - name: sre\n    members:\n      - oidcGroup: { issuer: "ftp://idp", group: g }\n';
  assert.deepEqual(where(issuesOf(group)), ['18 approvers[0].members[0].oidcGroup.issuer']);
});

test('required approvals are bounded by the distinct members of the named groups; an OIDC group has no bound', () => {
  const groups =
    'approvers:\n  - name: a\n    members: [{ oidc: { issuer: "https://idp", subject: x } }]\n' +
    '  - name: b\n    members: [{ oidc: { issuer: "https://idp", subject: x } }, { oidc: { issuer: "https://idp", subject: y } }]\n';
  // a ∪ b has 2 distinct members (x is in both).
  assert.equal(parsePolicy(MINIMAL + groups + 'approvals: { approvers: [a, b], required: 2 }\n').defaultApproval.required, 2);
  const issues = issuesOf(MINIMAL + groups + 'approvals: { approvers: [a, b], required: 3 }\n');
  assert.deepEqual(issues.map((i) => [i.line, i.path, i.message]), [
    [20, 'approvals.required', '"required" is 3 but approver groups "a", "b" have only 2 distinct members'],
  ]);
  assert.deepEqual(where(issuesOf(MINIMAL + groups + 'approvals: { required: 0 }\n')), ['20 approvals.required']);
  const oidcGroup = 'approvers:\n  - name: a\n    members: [{ oidcGroup: { issuer: "https://idp", group: sre } }]\n';
  assert.equal(parsePolicy(MINIMAL + oidcGroup + 'approvals: { required: 5 }\n').defaultApproval.required, 5);
});

test('a template whose rules touch the gated set needs declared approver groups', () => {
  const exec = MINIMAL.replace('    clusterRole: view\n', '    rules:\n      - resources: ["pods/*"]\n        verbs: ["*"]\n');
  const issues = issuesOf(exec);
  assert.deepEqual(where(issues), ['12 templates[0].rules']);
  assert.match(issues[0]!.message, /gated access \(create pods\/exec and 8 more\).*no approver groups/);
  parsePolicy(exec + 'approvers:\n  - name: sre\n    members: [{ oidc: { issuer: "https://idp", subject: a } }]\n');
});

test('a gated entry has exactly one of verb/verbs and of resource/resources', () => {
  const issues = issuesOf(MINIMAL + 'gated:\n  - verb: delete\n    verbs: [get]\n    resource: pods\n  - apiGroup: apps\n');
  assert.deepEqual(where(issues), ['17 gated[0].verbs', '19 gated[1]', '19 gated[1]']);
  assert.match(issues[1]!.message, /exactly one of "verb" and "verbs"$/);
  assert.match(issues[2]!.message, /exactly one of "resource" and "resources"$/);
});

test('tokenTTL must be at least 10m and durations must be positive', () => {
  const broker = (extra: string) => MINIMAL.replace('  taskNamespace: task-broker\n', `  taskNamespace: task-broker\n${extra}`);
  assert.equal(parsePolicy(broker('  tokenTTL: 600s\n')).broker.tokenTtl, 600);
  assert.equal(parsePolicy(broker('  tokenTTL: 1h30m\n  approvalRequestTTL: 2h\n')).broker.approvalRequestTtl, 7200);
  assert.deepEqual(where(issuesOf(broker('  tokenTTL: 599s\n'))), ['5 broker.tokenTTL']);
  const zero = issuesOf(MINIMAL.replace('default: 10m', 'default: 0s'));
  assert.deepEqual(zero.map((i) => [i.line, i.path, i.message]), [
    [13, 'templates[0].ttl.default', 'template "read": "ttl.default": a duration must be greater than zero, got "0s"'],
  ]);
});

test('notifyWebhook must be an http(s) URL', () => {
  const hook = (url: string) => MINIMAL.replace('  taskNamespace: task-broker\n', `  taskNamespace: task-broker\n  notifyWebhook: "${url}"\n`);
  assert.equal(parsePolicy(hook('http://hooks.internal:8080/x')).broker.notifyWebhook, 'http://hooks.internal:8080/x');
  assert.deepEqual(where(issuesOf(hook('mailto:ops@example.com'))), ['5 broker.notifyWebhook']);
});

// ---------------------------------------------------------------------------------------------
// The broker's own namespace, per-agent limits, people, approvals per principal (issue 8)

const withBroker = (extra: string) => MINIMAL.replace('  taskNamespace: task-broker\n', `  taskNamespace: task-broker\n${extra}`);
const IDP = 'issuer: "https://idp"';

test('broker.namespace defaults to task-broker-system and must be a DNS label', () => {
  assert.equal(parsePolicy(MINIMAL).broker.namespace, 'task-broker-system');
  assert.equal(parsePolicy(withBroker('  namespace: tb-own\n')).broker.namespace, 'tb-own');
  const issues = issuesOf(withBroker('  namespace: TB_Own\n'));
  assert.deepEqual(where(issues), ['5 broker.namespace']);
  assert.match(issues[0]!.message, /"broker\.namespace" must be a DNS-1123 label/);
});

test('broker.namespace must differ from broker.taskNamespace, given or by default', () => {
  const given = issuesOf(withBroker('  namespace: task-broker\n'));
  assert.deepEqual(given.map((i) => [i.line, i.path]), [[5, 'broker.namespace']]);
  assert.match(given[0]!.message, /^"broker\.namespace" and "broker\.taskNamespace" must differ, both are "task-broker": the broker may mint tokens for any ServiceAccount in the task namespace, so its own ServiceAccount there could mint tokens for itself$/);
  // taskNamespace set to the default of namespace: reported on taskNamespace, naming the default.
  const byDefault = issuesOf(MINIMAL.replace('taskNamespace: task-broker', 'taskNamespace: task-broker-system'));
  assert.deepEqual(byDefault.map((i) => [i.line, i.path]), [[4, 'broker.taskNamespace']]);
  assert.match(byDefault[0]!.message, /"broker\.namespace" \(default "task-broker-system"\) and "broker\.taskNamespace" must differ/);
  // Moving namespace elsewhere fixes it.
  parsePolicy(MINIMAL.replace('taskNamespace: task-broker', 'taskNamespace: task-broker-system\n  namespace: tb-own'));
});

test('broker.limits: positive whole numbers, defaults 10 and 5, each optional', () => {
  assert.deepEqual(parsePolicy(withBroker('  limits: { activeTasksPerAgent: 3 }\n')).broker.limits, { activeTasksPerAgent: 3, openApprovalsPerAgent: 5 });
  assert.deepEqual(parsePolicy(withBroker('  limits:\n    openApprovalsPerAgent: 1\n')).broker.limits, { activeTasksPerAgent: 10, openApprovalsPerAgent: 1 });
  const issues = issuesOf(withBroker('  limits:\n    activeTasksPerAgent: 0\n    openApprovalsPerAgent: 1.5\n    perSource: 2\n'));
  assert.deepEqual(issues.map((i) => [i.line, i.path, i.message]), [
    [6, 'broker.limits.activeTasksPerAgent', '"broker.limits.activeTasksPerAgent" must be a whole number of at least 1, got 0'],
    [7, 'broker.limits.openApprovalsPerAgent', '"broker.limits.openApprovalsPerAgent" must be a whole number of at least 1, got 1.5'],
    [8, 'broker.limits.perSource', 'unknown key "perSource" (expected one of: activeTasksPerAgent, openApprovalsPerAgent)'],
  ]);
  assert.deepEqual(where(issuesOf(withBroker('  limits: { activeTasksPerAgent: "3" }\n'))), ['5 broker.limits.activeTasksPerAgent']);
});

test('people: a name and at least one identity (serviceAccount or oidc); built into Policy.people', () => {
  const people = `people:\n  - name: alice\n    identities:\n      - oidc: { ${IDP}, subject: alice }\n      - serviceAccount: laptops/alice\n`;
  const p = parsePolicy(MINIMAL + people);
  assert.deepEqual(p.people, [
    {
      name: 'alice',
      identities: [
        { kind: 'oidc', issuer: 'https://idp', subject: 'alice' },
        { kind: 'serviceAccount', namespace: 'laptops', name: 'alice', username: 'system:serviceaccount:laptops:alice' },
      ],
    },
  ]);
  const bad = issuesOf(
    MINIMAL +
      'people:\n  - name: alice\n  - name: bob\n    identities: []\n  - name: Carol\n    identities:\n      - oidcGroup: { issuer: "https://idp", group: sre }\n',
  );
  assert.deepEqual(where(bad), [
    '16 people[0].identities', // missing: the line of the person
    '18 people[1].identities', // empty
    '19 people[2].name', // not a DNS label
    '21 people[2].identities[0].oidcGroup', // a group is not one person
  ]);
  assert.equal(bad[0]!.message, 'person "alice": "identities" is required');
  assert.equal(bad[1]!.message, 'person "bob": "identities" must have at least 1 item');
});

test('people: unique names; an identity belongs to at most one person, once', () => {
  const text =
    MINIMAL +
    `people:\n  - name: alice\n    identities:\n      - oidc: { ${IDP}, subject: a }\n      - oidc: { ${IDP}, subject: a }\n` +
    `  - name: bob\n    identities:\n      - oidc: { ${IDP}, subject: a }\n  - name: alice\n    identities:\n      - oidc: { ${IDP}, subject: z }\n`;
  const issues = issuesOf(text);
  assert.deepEqual(issues.map((i) => [i.line, i.path, i.message]), [
    [19, 'people[0].identities[1]', 'person "alice": identity oidc subject "a" of https://idp is listed twice in this person'],
    [22, 'people[1].identities[0]', 'person "bob": identity oidc subject "a" of https://idp already belongs to person "alice" (line 18); an identity maps to one person'],
    [23, 'people[2].name', 'person "alice": person name "alice" is already used by people[0] (line 16)'],
  ]);
});

test("an agent's identity may not belong to a person: the agent could approve its own tasks", () => {
  const issues = issuesOf(MINIMAL + 'people:\n  - name: alice\n    identities:\n      - serviceAccount: agents/bot\n');
  assert.deepEqual(issues.map((i) => [i.line, i.path, i.message]), [
    [18, 'people[0].identities[0]', 'person "alice": identity serviceAccount "agents/bot" belongs to agent "bot" (line 8): an agent\'s identity cannot also be a person\'s, or the agent could approve its own tasks'],
  ]);
});

test("an agent's identity may not be listed in an approver group (the agent could approve its own tasks)", () => {
  // What test/fixtures/approvals-policy.yaml used to do: serviceAccount agents/alpha both as agent and approver.
  const issues = issuesOf(MINIMAL + `approvers:\n  - name: sre\n    members:\n      - oidc: { ${IDP}, subject: a }\n      - serviceAccount: agents/bot\n`);
  assert.deepEqual(issues.map((i) => [i.line, i.path, i.message]), [
    [19, 'approvers[0].members[1]', 'approver group "sre": identity serviceAccount "agents/bot" belongs to agent "bot" (line 8): an agent\'s identity cannot approve, or the agent could approve its own tasks'],
  ]);
  // The same ServiceAccount name in another namespace is another identity.
  parsePolicy(MINIMAL + 'approvers:\n  - name: sre\n    members:\n      - serviceAccount: approvers/bot\n');
});

test('approver group members may be `person: NAME`, which must name a declared person', () => {
  const people = `people:\n  - name: alice\n    identities: [{ oidc: { ${IDP}, subject: a } }]\n`;
  const p = parsePolicy(MINIMAL + people + `approvers:\n  - name: sre\n    members:\n      - person: alice\n      - oidc: { ${IDP}, subject: b }\n`);
  assert.deepEqual(p.approverGroups, [{ name: 'sre', members: [{ kind: 'person', name: 'alice' }, { kind: 'oidc', issuer: 'https://idp', subject: 'b' }] }]);
  const issues = issuesOf(MINIMAL + people + `approvers:\n  - name: sre\n    members:\n      - person: bob\n      - person: alice\n        oidc: { ${IDP}, subject: a }\n      - person: Alice\n`);
  assert.deepEqual(issues.map((i) => [i.line, i.path]), [
    [21, 'approvers[0].members[0].person'],
    [22, 'approvers[0].members[1]'],
    [24, 'approvers[0].members[2].person'],
  ]);
  assert.equal(issues[0]!.message, 'approver group "sre": person "bob" is not declared in "people" (declared: alice)');
  assert.equal(issues[1]!.message, 'approver group "sre": an approver group member has exactly one key, "serviceAccount", "oidc", "oidcGroup" or "person"; got "person", "oidc"');
  assert.match(issues[2]!.message, /"members\[2\]\.person" must be a DNS-1123 label/);
});

test('N-of-M counts a person once, whether named as `person:` or by any of their identities', () => {
  const people =
    `people:\n  - name: alice\n    identities:\n      - oidc: { ${IDP}, subject: alice }\n      - oidc: { issuer: "https://sso", subject: alice }\n` +
    `  - name: bob\n    identities: [{ oidc: { ${IDP}, subject: bob } }]\n`;
  // sre lists alice twice (as a person and by one identity), ops lists her other identity: alice, bob = 2.
  const groups =
    `approvers:\n  - name: sre\n    members:\n      - person: alice\n      - oidc: { ${IDP}, subject: alice }\n      - person: bob\n` +
    `  - name: ops\n    members:\n      - oidc: { issuer: "https://sso", subject: alice }\n`;
  assert.equal(parsePolicy(MINIMAL + people + groups + 'approvals: { approvers: [sre, ops], required: 2 }\n').defaultApproval.required, 2);
  const issues = issuesOf(MINIMAL + people + groups + 'approvals: { approvers: [sre, ops], required: 3 }\n');
  assert.deepEqual(issues.map((i) => [i.line, i.path, i.message]), [
    [31, 'approvals.required', '"required" is 3 but approver groups "sre", "ops" have only 2 distinct members'],
  ]);
  // A template's own requirement is counted the same way: ops alone is one person.
  const tpl = MINIMAL.replace('    agents: [bot]\n', '    agents: [bot]\n    approval: { approvers: [ops], required: 2 }\n');
  assert.deepEqual(where(issuesOf(tpl + people + groups)), ['15 templates[0].approval.required']);
});

test("a template may not allow the broker's task namespace nor its own namespace (tasks there could forge approvals or extend themselves)", () => {
  const text = withBroker('  namespace: tb-own\n').replace('namespaces: [dev]', 'namespaces: [dev, task-broker, tb-own]');
  const issues = issuesOf(text);
  assert.deepEqual(issues.map((i) => [i.line, i.path]), [
    [12, 'templates[0].namespaces[1]'],
    [12, 'templates[0].namespaces[2]'],
  ]);
  assert.equal(
    issues[0]!.message,
    `template "read": namespace "task-broker" is the broker's task namespace ("broker.taskNamespace"), which no template may allow: a task there could rewrite task records and mint tokens for task ServiceAccounts, and so extend itself or take over other tasks`,
  );
  assert.equal(
    issues[1]!.message,
    `template "read": namespace "tb-own" is the broker's own namespace ("broker.namespace"), which no template may allow: a task there could forge approvals (their records and signing key live there) or act as the broker`,
  );
  // The default broker.namespace is reserved too.
  assert.deepEqual(where(issuesOf(MINIMAL.replace('namespaces: [dev]', 'namespaces: [task-broker-system]'))), ['11 templates[0].namespaces[0]']);
});

test('every fixture and example policy is valid under these rules', async () => {
  const { readdirSync } = await import('node:fs');
  const files = [
    ...readdirSync(new URL('../../docs/examples/', import.meta.url)).filter((f) => f.endsWith('.yaml')).map((f) => new URL(`../../docs/examples/${f}`, import.meta.url)),
    ...readdirSync(new URL('../fixtures/', import.meta.url)).filter((f) => f.endsWith('.yaml')).map((f) => new URL(`../fixtures/${f}`, import.meta.url)),
  ];
  assert.ok(files.length >= 4);
  for (const file of files) {
    const p = parsePolicy(readFileSync(file, 'utf8').replaceAll('NOTIFY_URL', 'http://127.0.0.1:9/hook'), file.pathname);
    assert.notEqual(p.broker.namespace, p.broker.taskNamespace, file.pathname);
  }
});

test('parseDuration reads h/m/s strings into whole seconds', () => {
  assert.equal(parseDuration('600s'), 600);
  assert.equal(parseDuration('10m'), 600);
  assert.equal(parseDuration('1h'), 3600);
  assert.equal(parseDuration('1h30m'), 5400);
  assert.equal(parseDuration('2h0m30s'), 7230);
  assert.equal(parseDuration('90m'), 5400);
});

test('parseDuration rejects bare numbers, unknown units, wrong order, zero and empty strings', () => {
  for (const bad of ['600', '', '10', '1d', '30m1h', '1.5h', '10 m', 'm', '0s', '-5m', '1h1h']) {
    assert.throws(() => parseDuration(bad), (err: unknown) => err instanceof BrokerError && err.code === 'invalid_argument', bad);
  }
  assert.throws(() => parseDuration(600 as unknown as string), /bare numbers are not durations: write "600s" or "600m"/);
});

test('formatDuration writes what parseDuration reads', () => {
  for (const s of [1, 59, 60, 600, 3600, 5400, 7230, 86400]) assert.equal(parseDuration(formatDuration(s)), s);
  assert.equal(formatDuration(5400), '1h30m');
});

test('PolicyError has code policy_invalid and lists FILE:LINE: PATH: MESSAGE lines', () => {
  try {
    parsePolicy(MINIMAL.replace('max: 1h', 'max: 5'), 'my.yaml');
    assert.fail('expected a PolicyError');
  } catch (err) {
    assert.ok(err instanceof PolicyError);
    assert.ok(err instanceof BrokerError);
    assert.equal(err.code, 'policy_invalid');
    assert.equal(err.source, 'my.yaml');
    assert.equal(err.message.split('\n')[0], 'invalid policy my.yaml (1 problem):');
    assert.match(err.message.split('\n')[1]!, /^my\.yaml:13: templates\[0\]\.ttl\.max: template "read": "ttl\.max" must be a duration/);
  }
  assert.equal(formatIssues('f.yaml', [{ path: '', line: 2, message: 'm' }, { path: 'a.b', line: 3, message: 'n' }]), 'f.yaml:2: m\nf.yaml:3: a.b: n');
});

test('loadPolicy on a missing file is invalid_argument naming the path', async () => {
  await assert.rejects(loadPolicy('/nonexistent/policy.yaml'), (err: unknown) => {
    assert.ok(err instanceof BrokerError && !(err instanceof PolicyError));
    assert.equal(err.code, 'invalid_argument');
    assert.equal(err.field, '/nonexistent/policy.yaml');
    return true;
  });
});

/** Runs `broker policy check ARGS` in a child process, reporting errors the way main.ts does. */
async function runCheck(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const cli = new URL('../../src/cli/policy.ts', import.meta.url).href;
  const script = `
    import { Command } from 'commander';
    import { policyCommand } from ${JSON.stringify(cli)};
    const program = new Command('broker').exitOverride().addCommand(policyCommand());
    try {
      await program.parseAsync(['policy', 'check', ...process.argv.slice(1)], { from: 'user' });
    } catch (err) {
      process.stderr.write(err.name + ' ' + err.code + '\\n' + err.message + '\\n');
      process.exitCode = 1;
    }`;
  return new Promise((resolve) => {
    execFile(process.execPath, ['--input-type=module', '-e', script, ...args], { cwd: new URL('../..', import.meta.url).pathname, env: { ...process.env, NO_COLOR: '1' } }, (err, stdout, stderr) => {
      resolve({ code: err ? Number(err.code ?? 1) : 0, stdout, stderr });
    });
  });
}

test('policy check prints a summary of a valid file', async () => {
  const res = await runCheck([example]);
  assert.equal(res.code, 0, res.stderr);
  assert.equal(
    res.stdout,
    `${example}: valid: 2 agents, 2 people, 4 templates, 44 gated pairs, 2 approver groups\n` +
      '  person: alice (oidc https://login.example.com alice; oidc https://sso.example.org alice@example.com)\n' +
      '  person: bob (oidc https://login.example.com bob)\n' +
      '  gated: debug-exec (create pods/exec): needs 2 approval(s) from sre, security\n' +
      '    create pods/exec: can run commands inside a running container\n' +
      '  clusterRole: view binds ClusterRole view: checked against the gated set by policy apply and at every task start, not here\n',
  );
  const json = await runCheck([example, '-o', 'json']);
  assert.equal(json.code, 0, json.stderr);
  assert.deepEqual(JSON.parse(json.stdout), { valid: true, issues: [], summary: {
      agents: 2,
      people: [
        { name: 'alice', identities: ['oidc https://login.example.com alice', 'oidc https://sso.example.org alice@example.com'] },
        { name: 'bob', identities: ['oidc https://login.example.com bob'] },
      ],
      templates: 4,
      gated: 44,
      approverGroups: 2,
      gatedTemplates: [{ template: 'debug-exec', hits: ['create pods/exec'], approvers: ['sre', 'security'], required: 2 }],
      clusterRoleTemplates: [{ template: 'view', clusterRole: 'view' }],
      reasons: { 'create pods/exec': 'can run commands inside a running container' },
    },
  });
});

test('policy check names every template that holds a default gated pair, with the reason (persistence-capable pairs and the old defaults)', async (t) => {
  // One template per pair, whose one rule grants exactly that pair ("*" in a pair: a resource of a group it covers).
  const templates = DEFAULT_GATED_REASONS.map(({ pair }, i) => ({
    name: `t${i}`,
    namespaces: ['dev'],
    rules: [{ apiGroups: [pair.apiGroup === '*' ? 'rbac.authorization.k8s.io' : pair.apiGroup], resources: [pair.resource === '*' ? 'roles' : pair.resource], verbs: [pair.verb] }],
    ttl: { default: '10m', max: '1h' },
    agents: ['bot'],
  }));
  const policy = {
    apiVersion: 'task-broker/v1alpha1',
    kind: 'Policy',
    broker: { taskNamespace: 'task-broker' },
    agents: [{ name: 'bot', identities: [{ serviceAccount: 'agents/bot' }] }],
    approvers: [{ name: 'sre', members: [{ oidc: { issuer: 'https://idp.example.com', subject: 'alice' } }] }],
    templates,
  };
  const dir = mkdtempSync(join(tmpdir(), 'tb-gated-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, 'every-pair.yaml');
  writeFileSync(file, JSON.stringify(policy));
  const [text, json] = await Promise.all([runCheck([file]), runCheck([file, '-o', 'json'])]);
  assert.equal(text.code, 0, text.stderr);
  assert.equal(json.code, 0, json.stderr);
  const summary = (JSON.parse(json.stdout) as { summary: { gatedTemplates: Array<{ template: string; hits: string[] }>; reasons: Record<string, string> } }).summary;
  // The first thirteen: the old defaults (and `get` on exec, attach, port-forward: kubectl's WebSocket verb).
  const persistent = DEFAULT_GATED_REASONS.slice(13);
  assert.ok(persistent.every((r) => /outlive|any account|any ServiceAccount|after the task ends/.test(r.reason)), 'the pairs after the first thirteen are the persistence-capable ones');
  for (const [i, { pair, reason }] of DEFAULT_GATED_REASONS.entries()) {
    const shown = `${pair.verb} ${pair.apiGroup ? `${pair.apiGroup}/` : ''}${pair.resource}`;
    await t.test(`${i < 13 ? 'old default' : 'persistence-capable'}: ${shown}`, () => {
      assert.deepEqual(summary.gatedTemplates.find((g) => g.template === `t${i}`)?.hits, [shown]);
      assert.equal(summary.reasons[shown], reason);
      const line = `  gated: t${i} (${shown}): needs 1 approval(s) from sre\n    ${shown}: ${reason}\n`;
      assert.ok(text.stdout.includes(line), `policy check prints\n${line}`);
    });
  }
});

test('policy check of an invalid file fails with every issue as FILE:LINE: PATH: MESSAGE; -o json also prints them', async () => {
  const text = await runCheck([invalid]);
  assert.equal(text.code, 1);
  assert.equal(text.stdout, '');
  const lines = text.stderr.split('\n');
  assert.equal(lines[0], 'PolicyError policy_invalid');
  assert.equal(lines[1], `invalid policy ${invalid} (17 problems):`);
  assert.match(lines[2]!, new RegExp(`^${invalid}:4: broker\\.taskNamespace: "broker\\.taskNamespace" must be a DNS-1123 label`));
  assert.equal(lines.filter((l) => l.startsWith(`${invalid}:`)).length, 17);
  const json = await runCheck([invalid, '-o', 'json']);
  assert.equal(json.code, 1);
  const out = JSON.parse(json.stdout) as { valid: boolean; issues: PolicyIssue[]; summary: unknown };
  assert.equal(out.valid, false);
  assert.equal(out.summary, null);
  assert.equal(out.issues.length, 17);
  assert.deepEqual(out.issues[0], { path: 'broker.taskNamespace', line: 4, message: out.issues[0]!.message });
});

test('gated intersection sees through wildcards in verbs, resources and apiGroups', () => {
  const p = parsePolicy(readFileSync(new URL('../../docs/examples/policy.yaml', import.meta.url), 'utf8'));
  const hit = (rules: Parameters<typeof gatedPairsHitBy>[0]) => gatedPairsHitBy(rules, p.gated).map((g) => `${g.verb} ${g.resource}`);
  assert.deepEqual(hit([{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] }]), []);
  assert.ok(hit([{ apiGroups: [''], resources: ['secrets'], verbs: ['*'] }]).includes('get secrets'));
  assert.ok(hit([{ apiGroups: [''], resources: ['*'], verbs: ['get'] }]).includes('get secrets'));
  assert.ok(hit([{ apiGroups: ['*'], resources: ['namespaces'], verbs: ['delete'] }]).includes('delete namespaces'));
  assert.ok(hit([{ apiGroups: [''], resources: ['pods/*'], verbs: ['create'] }]).includes('create pods/exec'));
  assert.ok(hit([{ apiGroups: ['rbac.authorization.k8s.io'], resources: ['roles'], verbs: ['escalate'] }]).includes('escalate *'));
  // A rule in another API group does not reach core secrets.
  assert.deepEqual(hit([{ apiGroups: ['apps'], resources: ['*'], verbs: ['get'] }]), []);
});
