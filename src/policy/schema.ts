/**
 * The one JSON schema of the policy file (after YAML parsing). It checks structure only: every
 * object is closed (`additionalProperties: false`, so a misspelt key is an error), types, required
 * keys and the form of names and durations. What a schema cannot say (uniqueness, references
 * between sections, N-of-M, ttl.default <= ttl.max, ...) is checked in parse.ts.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { DURATION_PATTERN } from './duration.ts';

/** The JWS algorithms an issuer may use: asymmetric only (never `none`, never an HMAC algorithm). */
export const ASYMMETRIC_ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA', 'Ed25519'];

export const POLICY_API_VERSION = 'task-broker/v1alpha1';
export const POLICY_KIND = 'Policy';

/** DNS-1123 label: lowercase alphanumerics and '-', at most 63 characters, starting and ending alphanumeric. */
export const DNS_LABEL_PATTERN = '^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$';
const LABEL = DNS_LABEL_PATTERN.slice(1, -1);

const ref = (name: string) => ({ $ref: `#/$defs/${name}` });
const closed = (properties: Record<string, unknown>, required: string[] = []) => ({
  type: 'object',
  additionalProperties: false,
  ...(required.length ? { required } : {}),
  properties,
});
const arrayOf = (items: unknown, minItems = 0) => ({ type: 'array', ...(minItems ? { minItems } : {}), items });

export const POLICY_SCHEMA = {
  $schema: 'http://json-schema.org/draft-07/schema#',
  title: 'task-broker policy',
  ...closed(
    {
      apiVersion: { type: 'string', const: POLICY_API_VERSION },
      kind: { type: 'string', const: POLICY_KIND },
      broker: closed(
        {
          namespace: ref('dnsLabel'),
          taskNamespace: ref('dnsLabel'),
          serviceAccount: ref('dnsLabel'),
          tokenTTL: ref('duration'),
          identityAudience: ref('text'),
          approvalRequestTTL: ref('duration'),
          taskHistory: ref('duration'),
          notifyWebhook: ref('text'),
          limits: closed({ activeTasksPerAgent: ref('positiveInteger'), openApprovalsPerAgent: ref('positiveInteger') }),
          proxyOnly: { type: 'boolean' },
        },
        ['taskNamespace'],
      ),
      agents: arrayOf(ref('agent')),
      people: arrayOf(ref('person')),
      templates: arrayOf(ref('template')),
      gated: arrayOf(ref('gated')),
      approvers: arrayOf(ref('approverGroup')),
      approvals: ref('approval'),
      issuers: arrayOf(ref('issuer')),
      administrators: arrayOf(ref('dnsLabel')),
    },
    ['apiVersion', 'kind', 'broker', 'agents', 'templates'],
  ),
  $defs: {
    // `title` names the kind of value so that parse.ts can word errors about it ("must be a duration").
    text: { title: 'text', type: 'string', minLength: 1 },
    dnsLabel: { title: 'dnsLabel', type: 'string', pattern: DNS_LABEL_PATTERN },
    duration: { title: 'duration', type: 'string', pattern: DURATION_PATTERN },
    positiveInteger: { title: 'positiveInteger', type: 'integer', minimum: 1 },
    serviceAccountRef: { title: 'serviceAccountRef', type: 'string', pattern: `^${LABEL}/${LABEL}$` },
    oidc: closed({ issuer: ref('text'), subject: ref('text'), claims: ref('claims') }, ['issuer', 'subject']),
    // Claim conditions: claim name -> the value, or a list of values one of which it must equal.
    claims: { type: 'object', minProperties: 1, additionalProperties: { anyOf: [ref('text'), arrayOf(ref('text'), 1)] } },
    algorithm: { title: 'algorithm', type: 'string', enum: ASYMMETRIC_ALGORITHMS },
    issuer: closed(
      {
        issuer: ref('text'),
        audience: { anyOf: [ref('text'), arrayOf(ref('text'), 1)] },
        subjectClaim: ref('text'),
        groupsClaim: ref('text'),
        algorithms: arrayOf(ref('algorithm'), 1),
        claims: ref('claims'),
        login: closed({ clientId: ref('text') }, ['clientId']),
      },
      ['issuer', 'audience'],
    ),
    oidcGroup: closed({ issuer: ref('text'), group: ref('text') }, ['issuer', 'group']),
    identity: {
      title: 'identity',
      ...closed({ serviceAccount: ref('serviceAccountRef'), oidc: ref('oidc') }),
      minProperties: 1,
      maxProperties: 1,
    },
    // An approver group member: an identity, or `person: NAME` (a person declared in `people`, all their identities).
    member: {
      title: 'member',
      ...closed({ serviceAccount: ref('serviceAccountRef'), oidc: ref('oidc'), oidcGroup: ref('oidcGroup'), person: ref('dnsLabel') }),
      minProperties: 1,
      maxProperties: 1,
    },
    // `identities` may be empty or absent: an agent enrolled with an agent key (broker agent enroll) needs only its name.
    agent: closed({ name: ref('dnsLabel'), identities: arrayOf(ref('identity')) }, ['name']),
    // A person signs in with one or more identities (no agent keys), so `identities` is required.
    person: closed({ name: ref('dnsLabel'), identities: arrayOf(ref('identity'), 1) }, ['name', 'identities']),
    rule: closed(
      {
        apiGroups: arrayOf({ type: 'string' }, 1),
        resources: arrayOf(ref('text'), 1),
        resourceNames: arrayOf(ref('text'), 1),
        nonResourceURLs: arrayOf(ref('text'), 1),
        verbs: arrayOf(ref('text'), 1),
      },
      ['verbs'],
    ),
    approval: closed({
      approvers: arrayOf(ref('dnsLabel'), 1),
      required: { type: 'integer', minimum: 1 },
    }),
    template: closed(
      {
        name: ref('dnsLabel'),
        description: { type: 'string' },
        namespaces: arrayOf(ref('dnsLabel'), 1),
        rules: arrayOf(ref('rule'), 1),
        clusterRole: ref('text'),
        ttl: closed({ default: ref('duration'), max: ref('duration') }, ['default', 'max']),
        agents: arrayOf(ref('dnsLabel'), 1),
        approval: ref('approval'),
      },
      ['name', 'namespaces', 'ttl', 'agents'],
    ),
    gated: closed({
      verb: ref('text'),
      verbs: arrayOf(ref('text'), 1),
      resource: ref('text'),
      resources: arrayOf(ref('text'), 1),
      apiGroup: { type: 'string' },
    }),
    approverGroup: closed({ name: ref('dnsLabel'), members: arrayOf(ref('member'), 1) }, ['name', 'members']),
  },
} as const;

let compiled: ValidateFunction | undefined;

/** Validates `data` against POLICY_SCHEMA; returns every error (allErrors), each with the offending data (verbose). */
export function schemaErrors(data: unknown): ErrorObject[] {
  compiled ??= new Ajv({ allErrors: true, verbose: true, strict: true }).compile(POLICY_SCHEMA);
  return compiled(data) ? [] : [...(compiled.errors ?? [])];
}
