/**
 * The policy file: YAML → one strict JSON schema (schema.ts) → semantic checks → Policy (types.ts).
 * Every problem found is reported, each with a machine-friendly path (`templates[2].ttl.max`) and the
 * 1-based line of that node in the file. The YAML form is documented in docs/policy.md.
 */
import { readFile } from 'node:fs/promises';
import type { ErrorObject } from 'ajv';
import { LineCounter, isAlias, isMap, isNode, isScalar, isSeq, parseDocument, type Document } from 'yaml';
import { BrokerError } from '../errors.ts';
import { durationProblem, parseDuration } from './duration.ts';
import { DEFAULT_GATED, describePair, expandGated, gatedPairsHitBy } from './grants.ts';
import { DNS_LABEL_PATTERN, schemaErrors } from './schema.ts';
import type {
  Agent,
  ApprovalRequirement,
  ApproverGroup,
  BrokerSettings,
  ClaimConditions,
  Identity,
  OidcIssuer,
  Person,
  Policy,
  PolicyIssue,
  PolicyRule,
  Template,
} from './types.ts';

export { parseDuration, formatDuration } from './duration.ts';
export { POLICY_API_VERSION, POLICY_KIND } from './schema.ts';

/** TokenRequest's minimum `expirationSeconds`, and so the least `broker.tokenTTL`. */
export const MIN_TOKEN_TTL = 600;

/** An issuer's algorithms when the policy names none: the common asymmetric ones. */
export const DEFAULT_ALGORITHMS = ['RS256', 'PS256', 'ES256', 'EdDSA'] as const;

export const BROKER_DEFAULTS = {
  namespace: 'task-broker-system',
  serviceAccount: 'task-broker',
  tokenTtl: 600,
  identityAudience: 'task-broker',
  approvalRequestTtl: 3600,
  taskHistory: 7 * 24 * 3600,
  limits: { activeTasksPerAgent: 10, openApprovalsPerAgent: 5 },
  proxyOnly: false,
} as const;

/** A policy that failed validation; `issues` holds every problem found, sorted by line. */
export class PolicyError extends BrokerError {
  override name = 'PolicyError';
  readonly issues: PolicyIssue[];
  readonly source: string;

  constructor(issues: PolicyIssue[], source = '<policy>') {
    const n = issues.length;
    super('policy_invalid', `invalid policy ${source} (${n} problem${n === 1 ? '' : 's'}):\n${formatIssues(source, issues)}`);
    this.issues = issues;
    this.source = source;
  }
}

/** One `FILE:LINE: PATH: MESSAGE` line per issue (no PATH part for the document itself). */
export function formatIssues(source: string, issues: readonly PolicyIssue[]): string {
  return issues.map((i) => `${source}:${i.line}: ${i.path ? `${i.path}: ` : ''}${i.message}`).join('\n');
}

/** Reads and parses a policy file. A missing or unreadable file is BrokerError 'invalid_argument' (field: the path). */
export async function loadPolicy(path: string): Promise<Policy> {
  return (await loadPolicyFile(path)).policy;
}

/** loadPolicy, also giving the exact text that was parsed (for recording its hash). */
export async function loadPolicyFile(path: string): Promise<{ policy: Policy; text: string }> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'is a directory' : (err as Error).message;
    throw new BrokerError('invalid_argument', `cannot read policy file ${path}: ${why}`, { field: path, cause: err });
  }
  return { policy: parsePolicy(text, path), text };
}

/** Parses and validates policy YAML; throws PolicyError listing every problem. `source` names the file in messages. */
export function parsePolicy(text: string, source = '<policy>'): Policy {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const issues = doc.errors.map((e) => ({
      path: '',
      line: lineCounter.linePos(e.pos[0]).line,
      message: `YAML syntax error: ${e.message}`,
    }));
    throw new PolicyError(sortIssues(issues), source);
  }
  const data: unknown = doc.toJS({ maxAliasCount: 100 });
  const issues = new IssueList(doc, lineCounter, data);
  for (const err of schemaErrors(data)) reportSchemaError(issues, data, err);
  if (isObject(data)) semanticChecks(issues, data);
  if (issues.list.length > 0) throw new PolicyError(sortIssues(issues.list), source);
  return build(data as RawPolicy);
}

// ---------------------------------------------------------------------------------------------
// Paths, lines and issue wording

type Seg = string | number;

/** `['templates', 2, 'ttl', 'max']` → `templates[2].ttl.max`. */
export function formatPath(path: readonly Seg[]): string {
  let out = '';
  for (const seg of path) {
    if (typeof seg === 'number') out += `[${seg}]`;
    else if (/^[A-Za-z_$][\w$-]*$/.test(seg)) out += out ? `.${seg}` : seg;
    else out += `[${JSON.stringify(seg)}]`;
  }
  return out;
}

const SECTION_NOUN: Record<string, string> = { agents: 'agent', people: 'person', templates: 'template', approvers: 'approver group' };

class IssueList {
  readonly list: PolicyIssue[] = [];
  readonly #seen = new Set<string>();
  readonly #doc: Document;
  readonly #lines: LineCounter;
  readonly #data: unknown;

  constructor(doc: Document, lines: LineCounter, data: unknown) {
    this.#doc = doc;
    this.#lines = lines;
    this.#data = data;
  }

  /** Adds an issue at `path`; the message is prefixed with the named element it is in (`template "x": `). */
  add(path: readonly Seg[], message: string): void {
    const item = { path: formatPath(path), line: this.line(path), message: this.context(path) + message };
    const key = `${item.path}\0${item.message}`;
    if (this.#seen.has(key)) return;
    this.#seen.add(key);
    this.list.push(item);
  }

  /**
   * 1-based line of the node at `path`: for a map entry, the line of its key; for a sequence item,
   * the line of the item. When the path leads nowhere (a missing key), the line of the deepest node
   * that exists, i.e. the parent map.
   */
  line(path: readonly Seg[]): number {
    let node: unknown = this.#doc.contents;
    let line = isNode(node) && node.range ? this.#lines.linePos(node.range[0]).line : 1;
    for (const seg of path) {
      if (isAlias(node)) node = node.resolve(this.#doc);
      if (isMap(node)) {
        const pair = node.items.find((p) => String(isScalar(p.key) ? p.key.value : p.key) === String(seg));
        if (!pair) break;
        if (isNode(pair.key) && pair.key.range) line = this.#lines.linePos(pair.key.range[0]).line;
        node = pair.value;
      } else if (isSeq(node) && typeof seg === 'number') {
        const item: unknown = node.items[seg];
        if (item === undefined) break;
        if (isNode(item) && item.range) line = this.#lines.linePos(item.range[0]).line;
        node = item;
      } else {
        break;
      }
    }
    return line;
  }

  context(path: readonly Seg[]): string {
    const [section, index] = path;
    if (typeof section !== 'string' || typeof index !== 'number') return '';
    const noun = SECTION_NOUN[section];
    const el = isObject(this.#data) ? (this.#data[section] as unknown[] | undefined)?.[index] : undefined;
    const name = isObject(el) ? el['name'] : undefined;
    return noun && typeof name === 'string' ? `${noun} ${JSON.stringify(name)}: ` : '';
  }
}

/** How a field is named in a message: the part of the path inside the list element it belongs to. */
function fieldName(path: readonly Seg[]): string {
  const inside = path.length > 2 && typeof path[1] === 'number' ? path.slice(2) : path;
  return formatPath(inside);
}

function sortIssues(issues: PolicyIssue[]): PolicyIssue[] {
  return [...issues].sort((a, b) => a.line - b.line || (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

function show(value: unknown): string {
  if (value === null || value === undefined) return 'nothing';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a map';
  return JSON.stringify(value);
}

function pointerToPath(data: unknown, pointer: string): Seg[] {
  const path: Seg[] = [];
  let cur = data;
  for (const raw of pointer.split('/').slice(1)) {
    const seg = raw.replaceAll('~1', '/').replaceAll('~0', '~');
    if (Array.isArray(cur)) {
      path.push(Number(seg));
      cur = cur[Number(seg)];
    } else {
      path.push(seg);
      cur = isObject(cur) ? cur[seg] : undefined;
    }
  }
  return path;
}

const TYPE_NOUN: Record<string, string> = { object: 'a map', array: 'a list', string: 'a string', integer: 'a whole number', number: 'a number', boolean: 'true or false' };

function reportSchemaError(issues: IssueList, data: unknown, err: ErrorObject): void {
  const path = pointerToPath(data, err.instancePath);
  const kind = (err.parentSchema as { title?: string } | undefined)?.title;
  const field = JSON.stringify(fieldName(path) || 'the policy');
  const got = show(err.data);
  const params = err.params as Record<string, unknown>;
  if (kind === 'duration') {
    const problem = typeof err.data === 'number' ? ` (${durationProblem(err.data)})` : '';
    issues.add(path, `${field} must be a duration like "1h", got ${got}${problem}`);
    return;
  }
  if (kind === 'dnsLabel' && (err.keyword === 'pattern' || err.keyword === 'type')) {
    issues.add(path, `${field} must be a DNS-1123 label (lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit), got ${got}`);
    return;
  }
  if (kind === 'serviceAccountRef' && (err.keyword === 'pattern' || err.keyword === 'type')) {
    issues.add(path, `${field} must be "NAMESPACE/NAME" with both parts DNS-1123 labels, got ${got}`);
    return;
  }
  if (kind === 'positiveInteger' && (err.keyword === 'minimum' || err.keyword === 'type')) {
    issues.add(path, `${field} must be a whole number of at least 1, got ${got}`);
    return;
  }
  if ((kind === 'identity' || kind === 'member') && (err.keyword === 'minProperties' || err.keyword === 'maxProperties')) {
    const present = isObject(err.data) ? Object.keys(err.data).map((k) => JSON.stringify(k)).join(', ') : '';
    const what = kind === 'identity' ? 'an identity has exactly one key, "serviceAccount" or "oidc"' : 'an approver group member has exactly one key, "serviceAccount", "oidc", "oidcGroup" or "person"';
    issues.add(path, `${what}; got ${present || 'none'}`);
    return;
  }
  switch (err.keyword) {
    case 'required': {
      const missing = [...path, String(params['missingProperty'])];
      issues.add(missing, `${JSON.stringify(fieldName(missing))} is required`);
      return;
    }
    case 'additionalProperties': {
      const key = String(params['additionalProperty']);
      const allowed = Object.keys((err.parentSchema as { properties?: object } | undefined)?.properties ?? {});
      issues.add([...path, key], `unknown key ${JSON.stringify(key)}${allowed.length ? ` (expected one of: ${allowed.join(', ')})` : ''}`);
      return;
    }
    case 'type': {
      const noun = TYPE_NOUN[String(params['type'])] ?? String(params['type']);
      issues.add(path, `${field} must be ${noun}, got ${got}`);
      return;
    }
    case 'const':
      issues.add(path, `${field} must be ${JSON.stringify(params['allowedValue'])}, got ${got}`);
      return;
    case 'minItems':
      issues.add(path, `${field} must have at least ${String(params['limit'])} item${params['limit'] === 1 ? '' : 's'}`);
      return;
    case 'minLength':
      issues.add(path, `${field} must not be empty`);
      return;
    case 'minimum':
      issues.add(path, `${field} must be at least ${String(params['limit'])}, got ${got}`);
      return;
    case 'minProperties':
      issues.add(path, `${field} must not be empty`);
      return;
    case 'enum':
      issues.add(path, `${field} must be one of ${(params['allowedValues'] as unknown[]).map((v) => JSON.stringify(v)).join(', ')}, got ${got}`);
      return;
    default:
      issues.add(path, `${field} ${err.message ?? 'is not valid'}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Semantic checks: everything the schema cannot say. They run on whatever parts of the document
// have the right shape, so that one run reports schema and semantic problems together.

type Obj = Record<string, unknown>;

function isObject(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
function list(v: unknown): unknown[] {
  return Array.isArray(v) ? v : [];
}
function strings(v: unknown): string[] {
  return list(v).filter((x): x is string => typeof x === 'string');
}
/** Seconds of a duration field, or undefined when it is absent or malformed (the schema reports those). */
function seconds(issues: IssueList, path: Seg[], value: unknown): number | undefined {
  if (typeof value !== 'string') return undefined;
  const problem = durationProblem(value);
  if (problem === undefined) return parseDuration(value);
  if (/^(?=\d)(?:\d+h)?(?:\d+m)?(?:\d+s)?$/.test(value)) issues.add(path, `${JSON.stringify(fieldName(path))}: ${problem}`);
  return undefined;
}

/** Stable key of an identity for uniqueness and counting, or undefined when malformed. */
function identityKey(id: unknown): string | undefined {
  if (!isObject(id)) return undefined;
  if (typeof id['serviceAccount'] === 'string') return `serviceAccount ${JSON.stringify(id['serviceAccount'])}`;
  const oidc = id['oidc'];
  if (isObject(oidc) && typeof oidc['issuer'] === 'string' && typeof oidc['subject'] === 'string') {
    return `oidc subject ${JSON.stringify(oidc['subject'])} of ${oidc['issuer']}`;
  }
  const group = id['oidcGroup'];
  if (isObject(group) && typeof group['issuer'] === 'string' && typeof group['group'] === 'string') {
    return `oidcGroup ${JSON.stringify(group['group'])} of ${group['issuer']}`;
  }
  return undefined;
}

function issuerProblem(issuer: string): string | undefined {
  let url: URL;
  try {
    url = new URL(issuer);
  } catch {
    return `"issuer" must be an https URL, got ${JSON.stringify(issuer)}`;
  }
  if (url.protocol === 'https:') return undefined;
  if (url.protocol === 'http:' && ['localhost', '127.0.0.1', '[::1]'].includes(url.hostname)) return undefined;
  return `"issuer" must be an https URL (http only for localhost or 127.0.0.1), got ${JSON.stringify(issuer)}`;
}

function checkIssuers(issues: IssueList, path: Seg[], id: unknown): void {
  if (!isObject(id)) return;
  for (const kind of ['oidc', 'oidcGroup']) {
    const v = id[kind];
    if (isObject(v) && typeof v['issuer'] === 'string') {
      const problem = issuerProblem(v['issuer']);
      if (problem) issues.add([...path, kind, 'issuer'], problem);
    }
  }
}

/** Reports duplicate `name`s in a list section; returns the set of names. */
function uniqueNames(issues: IssueList, section: string, items: unknown[]): Set<string> {
  const first = new Map<string, number>();
  items.forEach((item, i) => {
    const name = isObject(item) ? item['name'] : undefined;
    if (typeof name !== 'string') return;
    const prev = first.get(name);
    if (prev === undefined) first.set(name, i);
    else {
      issues.add([section, i, 'name'], `${SECTION_NOUN[section]} name ${JSON.stringify(name)} is already used by ${section}[${prev}] (line ${issues.line([section, prev, 'name'])})`);
    }
  });
  return new Set(first.keys());
}

/**
 * Who stands behind an approver group member, for counting: `person NAME` for a `person:` member and
 * for an identity that belongs to a declared person, the identity's key otherwise; undefined when malformed.
 */
function principalKey(member: unknown, personOf: ReadonlyMap<string, string>): string | undefined {
  if (isObject(member) && typeof member['person'] === 'string') return `person ${JSON.stringify(member['person'])}`;
  const key = identityKey(member);
  if (key === undefined) return undefined;
  const person = personOf.get(key);
  return person === undefined ? key : `person ${JSON.stringify(person)}`;
}

/**
 * Distinct approvers in the named groups, counted per principal: a person counts once however many
 * of their identities (or `person:` entries) the groups list. Infinity when one of them is an OIDC
 * group (its size is unknown).
 */
function memberCount(groups: Map<string, unknown[]>, names: string[], personOf: ReadonlyMap<string, string>): number {
  const keys = new Set<string>();
  for (const name of names) {
    for (const m of groups.get(name) ?? []) {
      const key = principalKey(m, personOf);
      if (key?.startsWith('oidcGroup')) return Infinity;
      if (key) keys.add(key);
    }
  }
  return keys.size;
}

function checkApproval(
  issues: IssueList,
  path: Seg[],
  raw: Obj,
  groups: Map<string, unknown[]>,
  personOf: ReadonlyMap<string, string>,
  fallback: { approvers: string[]; required: unknown },
): void {
  const approvers = Array.isArray(raw['approvers']) ? strings(raw['approvers']) : fallback.approvers;
  list(raw['approvers']).forEach((name, i) => {
    if (typeof name === 'string' && !groups.has(name)) {
      const known = [...groups.keys()];
      issues.add([...path, 'approvers', i], `approver group ${JSON.stringify(name)} is not declared in "approvers"${known.length ? ` (declared: ${known.join(', ')})` : ''}`);
    }
  });
  const required = raw['required'] ?? fallback.required;
  if (typeof required !== 'number' || !Number.isInteger(required) || required < 1) return;
  const declared = approvers.filter((a) => groups.has(a));
  if (declared.length !== approvers.length) return;
  const count = memberCount(groups, declared, personOf);
  if (required > count) {
    const at = raw['required'] === undefined ? path : [...path, 'required'];
    const groupsText = declared.length === 0 ? 'no approver groups' : `approver group${declared.length === 1 ? '' : 's'} ${declared.map((a) => JSON.stringify(a)).join(', ')}`;
    issues.add(at, `"required" is ${required} but ${groupsText} ${declared.length === 1 ? 'has' : 'have'} only ${count} distinct member${count === 1 ? '' : 's'}`);
  }
}

const CLUSTER_ROLE_NAME = /^[^/%]+$/;
const DNS_LABEL = new RegExp(DNS_LABEL_PATTERN);

/**
 * Why a template may not allow `ns`, when `ns` is one of the broker's own namespaces; undefined
 * otherwise. Used by the policy checks and again by `policy apply` (for a Policy built by hand).
 */
export function reservedNamespaceProblem(ns: string, broker: { namespace: string; taskNamespace: string }): string | undefined {
  if (ns === broker.taskNamespace) {
    return (
      `namespace ${JSON.stringify(ns)} is the broker's task namespace ("broker.taskNamespace"), which no template may allow: ` +
      `a task there could rewrite task records and mint tokens for task ServiceAccounts, and so extend itself or take over other tasks`
    );
  }
  if (ns === broker.namespace) {
    return (
      `namespace ${JSON.stringify(ns)} is the broker's own namespace ("broker.namespace"), which no template may allow: ` +
      `a task there could forge approvals (their records and signing key live there) or act as the broker`
    );
  }
  return undefined;
}

/** Why the two broker namespaces may not be one. */
export const SAME_NAMESPACES_REASON =
  'the broker may mint tokens for any ServiceAccount in the task namespace, so its own ServiceAccount there could mint tokens for itself';

function semanticChecks(issues: IssueList, data: Obj): void {
  // broker
  const broker = data['broker'];
  const brokerNs = isObject(broker) && typeof broker['namespace'] === 'string' ? broker['namespace'] : BROKER_DEFAULTS.namespace;
  const taskNs = isObject(broker) && typeof broker['taskNamespace'] === 'string' ? broker['taskNamespace'] : undefined;
  if (isObject(broker)) {
    if (taskNs !== undefined && taskNs === brokerNs) {
      const given = broker['namespace'] !== undefined;
      issues.add(
        given ? ['broker', 'namespace'] : ['broker', 'taskNamespace'],
        `"broker.namespace"${given ? '' : ` (default ${JSON.stringify(BROKER_DEFAULTS.namespace)})`} and "broker.taskNamespace" must differ, both are ${JSON.stringify(taskNs)}: ${SAME_NAMESPACES_REASON}`,
      );
    }
    const tokenTtl = seconds(issues, ['broker', 'tokenTTL'], broker['tokenTTL']);
    if (tokenTtl !== undefined && tokenTtl < MIN_TOKEN_TTL) {
      issues.add(['broker', 'tokenTTL'], `"broker.tokenTTL" must be at least 10m (600s, TokenRequest's minimum), got ${JSON.stringify(broker['tokenTTL'])}`);
    }
    seconds(issues, ['broker', 'approvalRequestTTL'], broker['approvalRequestTTL']);
    seconds(issues, ['broker', 'taskHistory'], broker['taskHistory']);
    const hook = broker['notifyWebhook'];
    if (typeof hook === 'string' && hook !== '') {
      let ok = false;
      try {
        ok = ['http:', 'https:'].includes(new URL(hook).protocol);
      } catch {
        ok = false;
      }
      if (!ok) issues.add(['broker', 'notifyWebhook'], `"broker.notifyWebhook" must be an http or https URL, got ${JSON.stringify(hook)}`);
    }
  }

  // issuers: https URLs (http on loopback only), each listed once
  const seenIssuers = new Map<string, number>();
  list(data['issuers']).forEach((iss, i) => {
    if (!isObject(iss) || typeof iss['issuer'] !== 'string') return;
    const url = iss['issuer'];
    const problem = issuerProblem(url);
    if (problem) issues.add(['issuers', i, 'issuer'], problem);
    const prev = seenIssuers.get(url);
    if (prev !== undefined) issues.add(['issuers', i, 'issuer'], `issuer ${JSON.stringify(url)} is already listed at issuers[${prev}] (line ${issues.line(['issuers', prev, 'issuer'])})`);
    else seenIssuers.set(url, i);
  });

  // agents: unique names, each identity in at most one agent
  const agents = list(data['agents']);
  const agentNames = uniqueNames(issues, 'agents', agents);
  const owner = new Map<string, { agent: number; id: number }>();
  agents.forEach((agent, a) => {
    if (!isObject(agent)) return;
    list(agent['identities']).forEach((id, j) => {
      const path = ['agents', a, 'identities', j];
      checkIssuers(issues, path, id);
      const key = identityKey(id);
      if (key === undefined) return;
      const prev = owner.get(key);
      if (prev === undefined) owner.set(key, { agent: a, id: j });
      else if (prev.agent === a) issues.add(path, `identity ${key} is listed twice in this agent`);
      else {
        const other = agents[prev.agent];
        const otherName = isObject(other) && typeof other['name'] === 'string' ? JSON.stringify(other['name']) : `agents[${prev.agent}]`;
        issues.add(path, `identity ${key} already belongs to agent ${otherName} (line ${issues.line(['agents', prev.agent, 'identities', prev.id])}); an identity maps to one agent`);
      }
    });
  });

  const agentOf = (key: string): string => {
    const at = owner.get(key)!;
    const agent = agents[at.agent];
    const name = isObject(agent) && typeof agent['name'] === 'string' ? JSON.stringify(agent['name']) : `agents[${at.agent}]`;
    return `agent ${name} (line ${issues.line(['agents', at.agent, 'identities', at.id])})`;
  };

  // people: unique names, each identity in at most one person and in no agent
  const people = list(data['people']);
  const personNames = uniqueNames(issues, 'people', people);
  const personOwner = new Map<string, { person: number; id: number }>();
  /** Identity key → the name of the person it belongs to (for counting approvers per principal). */
  const personOf = new Map<string, string>();
  people.forEach((person, p) => {
    if (!isObject(person)) return;
    list(person['identities']).forEach((id, j) => {
      const path = ['people', p, 'identities', j];
      checkIssuers(issues, path, id);
      const key = identityKey(id);
      if (key === undefined) return;
      if (owner.has(key)) {
        issues.add(path, `identity ${key} belongs to ${agentOf(key)}: an agent's identity cannot also be a person's, or the agent could approve its own tasks`);
        return;
      }
      const prev = personOwner.get(key);
      if (prev === undefined) {
        personOwner.set(key, { person: p, id: j });
        if (typeof person['name'] === 'string') personOf.set(key, person['name']);
      } else if (prev.person === p) issues.add(path, `identity ${key} is listed twice in this person`);
      else {
        const other = people[prev.person];
        const otherName = isObject(other) && typeof other['name'] === 'string' ? JSON.stringify(other['name']) : `people[${prev.person}]`;
        issues.add(path, `identity ${key} already belongs to person ${otherName} (line ${issues.line(['people', prev.person, 'identities', prev.id])}); an identity maps to one person`);
      }
    });
  });

  // approver groups: members are people or identities, never an agent's identity
  const groupsRaw = list(data['approvers']);
  uniqueNames(issues, 'approvers', groupsRaw);
  const groups = new Map<string, unknown[]>();
  groupsRaw.forEach((g, i) => {
    if (!isObject(g)) return;
    if (typeof g['name'] === 'string' && !groups.has(g['name'])) groups.set(g['name'], list(g['members']));
    list(g['members']).forEach((m, j) => {
      const path = ['approvers', i, 'members', j];
      checkIssuers(issues, path, m);
      if (isObject(m) && typeof m['person'] === 'string') {
        // (A name that is not a DNS label is reported by the schema already.)
        if (!personNames.has(m['person']) && DNS_LABEL.test(m['person'])) {
          issues.add([...path, 'person'], `person ${JSON.stringify(m['person'])} is not declared in "people"${personNames.size ? ` (declared: ${[...personNames].join(', ')})` : ''}`);
        }
        return;
      }
      const key = identityKey(m);
      if (key !== undefined && owner.has(key)) {
        issues.add(path, `identity ${key} belongs to ${agentOf(key)}: an agent's identity cannot approve, or the agent could approve its own tasks`);
      }
    });
  });

  // administrators: approver groups
  list(data['administrators']).forEach((name, i) => {
    if (typeof name === 'string' && !groups.has(name) && DNS_LABEL.test(name)) {
      const known = [...groups.keys()];
      issues.add(['administrators', i], `approver group ${JSON.stringify(name)} is not declared in "approvers"${known.length ? ` (declared: ${known.join(', ')})` : ''}`);
    }
  });

  // default approval requirement
  const approvalsRaw = isObject(data['approvals']) ? data['approvals'] : {};
  const defaultApprovers = Array.isArray(approvalsRaw['approvers']) ? strings(approvalsRaw['approvers']) : [...groups.keys()];
  if (isObject(data['approvals'])) checkApproval(issues, ['approvals'], approvalsRaw, groups, personOf, { approvers: [...groups.keys()], required: 1 });
  const defaultRequired = approvalsRaw['required'] ?? 1;

  // gated
  const gatedRaw = data['gated'];
  list(gatedRaw).forEach((g, i) => {
    if (!isObject(g)) return;
    for (const [one, many] of [['verb', 'verbs'], ['resource', 'resources']] as const) {
      const has1 = g[one] !== undefined;
      const hasN = g[many] !== undefined;
      if (has1 === hasN) {
        issues.add(has1 ? ['gated', i, many] : ['gated', i], `a gated entry has exactly one of "${one}" and "${many}"${has1 ? ', not both' : ''}`);
      }
    }
  });
  const gated = gatedRaw === undefined ? DEFAULT_GATED : expandGated(list(gatedRaw).filter(isObject));

  // templates
  const templates = list(data['templates']);
  uniqueNames(issues, 'templates', templates);
  templates.forEach((t, i) => {
    if (!isObject(t)) return;
    const at = (...rest: Seg[]): Seg[] => ['templates', i, ...rest];
    const hasRules = t['rules'] !== undefined;
    const hasRole = t['clusterRole'] !== undefined;
    if (hasRules === hasRole) {
      issues.add(hasRules ? at('clusterRole') : at(), `a template has exactly one of "rules" and "clusterRole"${hasRules ? ', not both' : ''}`);
    }
    const role = t['clusterRole'];
    if (typeof role === 'string' && role !== '' && (!CLUSTER_ROLE_NAME.test(role) || role === '.' || role === '..')) {
      issues.add(at('clusterRole'), `"clusterRole" must be a ClusterRole name (no '/' or '%'), got ${JSON.stringify(role)}`);
    }
    list(t['rules']).forEach((r, j) => {
      if (!isObject(r)) return;
      const rp = at('rules', j);
      if (r['nonResourceURLs'] !== undefined) {
        issues.add([...rp, 'nonResourceURLs'], `"nonResourceURLs" cannot be granted: a task's access is bound with a RoleBinding in one namespace, where non-resource URLs have no effect`);
      } else if (r['resources'] === undefined) {
        issues.add(rp, `a rule needs "resources" (and "apiGroups", default [""] for the core group)`);
      }
    });
    const seenNs = new Set<string>();
    list(t['namespaces']).forEach((ns, j) => {
      if (typeof ns !== 'string') return;
      if (seenNs.has(ns)) issues.add(at('namespaces', j), `namespace ${JSON.stringify(ns)} is listed twice`);
      seenNs.add(ns);
      const reserved = taskNs === undefined ? undefined : reservedNamespaceProblem(ns, { namespace: brokerNs, taskNamespace: taskNs });
      if (reserved) issues.add(at('namespaces', j), reserved);
    });
    const ttl = t['ttl'];
    if (isObject(ttl)) {
      const def = seconds(issues, at('ttl', 'default'), ttl['default']);
      const max = seconds(issues, at('ttl', 'max'), ttl['max']);
      if (def !== undefined && max !== undefined && def > max) {
        issues.add(at('ttl', 'default'), `"ttl.default" (${String(ttl['default'])}) must not be longer than "ttl.max" (${String(ttl['max'])})`);
      }
    }
    list(t['agents']).forEach((name, j) => {
      if (typeof name === 'string' && !agentNames.has(name)) {
        issues.add(at('agents', j), `agent ${JSON.stringify(name)} is not declared in "agents"${agentNames.size ? ` (declared: ${[...agentNames].join(', ')})` : ''}`);
      }
    });
    const approval = t['approval'];
    if (isObject(approval)) {
      checkApproval(issues, at('approval'), approval, groups, personOf, { approvers: defaultApprovers, required: defaultRequired });
    }
    // A template whose rules touch the gated set needs someone able to approve it.
    if (Array.isArray(t['rules'])) {
      const hits = gatedPairsHitBy(list(t['rules']).filter(isObject).map(toRule), gated);
      const approvers = isObject(approval) && Array.isArray(approval['approvers']) ? strings(approval['approvers']) : defaultApprovers;
      const first = hits[0];
      if (first && approvers.length === 0) {
        issues.add(at('rules'), `the rules include gated access (${describePair(first)}${hits.length > 1 ? ` and ${hits.length - 1} more` : ''}), which needs approval, but no approver groups are declared`);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Building the Policy (only once everything above passed, so the shapes hold)

interface RawIdentity {
  serviceAccount?: string;
  oidc?: { issuer: string; subject: string; claims?: RawClaims };
  oidcGroup?: { issuer: string; group: string };
}
type RawClaims = Record<string, string | string[]>;
interface RawIssuer {
  issuer: string;
  audience: string | string[];
  subjectClaim?: string;
  groupsClaim?: string;
  algorithms?: string[];
  claims?: RawClaims;
  login?: { clientId: string };
}
interface RawApproval {
  approvers?: string[];
  required?: number;
}
interface RawMember extends RawIdentity {
  person?: string;
}
interface RawPolicy {
  broker: {
    namespace?: string;
    taskNamespace: string;
    serviceAccount?: string;
    tokenTTL?: string;
    identityAudience?: string;
    approvalRequestTTL?: string;
    taskHistory?: string;
    notifyWebhook?: string;
    limits?: { activeTasksPerAgent?: number; openApprovalsPerAgent?: number };
    proxyOnly?: boolean;
  };
  agents: { name: string; identities?: RawIdentity[] }[];
  people?: { name: string; identities: RawIdentity[] }[];
  templates: {
    name: string;
    description?: string;
    namespaces: string[];
    rules?: Obj[];
    clusterRole?: string;
    ttl: { default: string; max: string };
    agents: string[];
    approval?: RawApproval;
  }[];
  gated?: Obj[];
  approvers?: { name: string; members: RawMember[] }[];
  approvals?: RawApproval;
  issuers?: RawIssuer[];
  administrators?: string[];
}

function toClaims(raw: RawClaims | undefined): ClaimConditions {
  return Object.fromEntries(Object.entries(raw ?? {}).map(([k, v]) => [k, typeof v === 'string' ? [v] : [...v]]));
}

function toIssuer(raw: RawIssuer): OidcIssuer {
  return {
    issuer: raw.issuer,
    audiences: typeof raw.audience === 'string' ? [raw.audience] : [...raw.audience],
    subjectClaim: raw.subjectClaim ?? 'sub',
    ...(raw.groupsClaim === undefined ? {} : { groupsClaim: raw.groupsClaim }),
    algorithms: raw.algorithms ? [...new Set(raw.algorithms)] : [...DEFAULT_ALGORITHMS],
    claims: toClaims(raw.claims),
    ...(raw.login === undefined ? {} : { login: { clientId: raw.login.clientId } }),
  };
}

function toIdentity(raw: RawIdentity): Identity {
  if (raw.serviceAccount !== undefined) {
    const [namespace = '', name = ''] = raw.serviceAccount.split('/');
    return { kind: 'serviceAccount', namespace, name, username: `system:serviceaccount:${namespace}:${name}` };
  }
  if (raw.oidc !== undefined) {
    const { issuer, subject, claims } = raw.oidc;
    return { kind: 'oidc', issuer, subject, ...(claims === undefined ? {} : { claims: toClaims(claims) }) };
  }
  const g = raw.oidcGroup!;
  return { kind: 'oidcGroup', issuer: g.issuer, group: g.group };
}

function toRule(raw: Obj): PolicyRule {
  const hasResources = raw['resources'] !== undefined;
  return {
    ...(hasResources || raw['apiGroups'] !== undefined
      ? { apiGroups: Array.isArray(raw['apiGroups']) ? strings(raw['apiGroups']) : [''] }
      : {}),
    ...(hasResources ? { resources: strings(raw['resources']) } : {}),
    ...(raw['resourceNames'] === undefined ? {} : { resourceNames: strings(raw['resourceNames']) }),
    ...(raw['nonResourceURLs'] === undefined ? {} : { nonResourceURLs: strings(raw['nonResourceURLs']) }),
    verbs: strings(raw['verbs']),
  };
}

function build(raw: RawPolicy): Policy {
  const b = raw.broker;
  const broker: BrokerSettings = {
    namespace: b.namespace ?? BROKER_DEFAULTS.namespace,
    taskNamespace: b.taskNamespace,
    serviceAccount: b.serviceAccount ?? BROKER_DEFAULTS.serviceAccount,
    tokenTtl: b.tokenTTL === undefined ? BROKER_DEFAULTS.tokenTtl : parseDuration(b.tokenTTL),
    identityAudience: b.identityAudience ?? BROKER_DEFAULTS.identityAudience,
    approvalRequestTtl: b.approvalRequestTTL === undefined ? BROKER_DEFAULTS.approvalRequestTtl : parseDuration(b.approvalRequestTTL),
    taskHistory: b.taskHistory === undefined ? BROKER_DEFAULTS.taskHistory : parseDuration(b.taskHistory),
    ...(b.notifyWebhook === undefined ? {} : { notifyWebhook: b.notifyWebhook }),
    limits: {
      activeTasksPerAgent: b.limits?.activeTasksPerAgent ?? BROKER_DEFAULTS.limits.activeTasksPerAgent,
      openApprovalsPerAgent: b.limits?.openApprovalsPerAgent ?? BROKER_DEFAULTS.limits.openApprovalsPerAgent,
    },
    proxyOnly: b.proxyOnly ?? BROKER_DEFAULTS.proxyOnly,
  };
  const agents: Agent[] = raw.agents.map((a) => ({ name: a.name, identities: (a.identities ?? []).map(toIdentity) }));
  const people: Person[] = (raw.people ?? []).map((p) => ({ name: p.name, identities: p.identities.map(toIdentity) }));
  const approverGroups: ApproverGroup[] = (raw.approvers ?? []).map((g) => ({
    name: g.name,
    members: g.members.map((m) => (m.person !== undefined ? { kind: 'person' as const, name: m.person } : toIdentity(m))),
  }));
  const defaultApproval: ApprovalRequirement = {
    approvers: raw.approvals?.approvers ?? approverGroups.map((g) => g.name),
    required: raw.approvals?.required ?? 1,
  };
  const templates: Template[] = raw.templates.map((t) => ({
    name: t.name,
    ...(t.description === undefined ? {} : { description: t.description }),
    namespaces: [...t.namespaces],
    ...(t.rules === undefined ? {} : { rules: t.rules.map(toRule) }),
    ...(t.clusterRole === undefined ? {} : { clusterRole: t.clusterRole }),
    defaultTtl: parseDuration(t.ttl.default),
    maxTtl: parseDuration(t.ttl.max),
    agents: [...t.agents],
    ...(t.approval === undefined
      ? {}
      : { approval: { approvers: t.approval.approvers ?? [...defaultApproval.approvers], required: t.approval.required ?? defaultApproval.required } }),
  }));
  const gated = raw.gated === undefined ? DEFAULT_GATED.map((p) => ({ ...p })) : expandGated(raw.gated);
  const issuers = (raw.issuers ?? []).map(toIssuer);
  return { broker, agents, people, templates, gated, approverGroups, defaultApproval, issuers, administrators: [...(raw.administrators ?? [])] };
}
