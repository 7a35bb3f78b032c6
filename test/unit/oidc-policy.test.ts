/**
 * The policy's `issuers` section (issue 14): its form, its defaults, and what it refuses.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PolicyError, parsePolicy } from '../../src/policy/parse.ts';
import { identitySummary } from '../../src/identity/summary.ts';

const BASE = `apiVersion: task-broker/v1alpha1
kind: Policy
broker: { taskNamespace: tasks }
agents:
  - name: ci
    identities:
      - oidc: { issuer: "https://token.actions.githubusercontent.com", subject: "repo:acme/shop:ref:refs/heads/main", claims: { ref: refs/heads/main } }
templates: []
`;

function issuesOf(text: string): string[] {
  try {
    parsePolicy(text);
  } catch (err) {
    if (err instanceof PolicyError) return err.issues.map((i) => `${i.path}: ${i.message}`);
    throw err;
  }
  return [];
}

test('issuers: defaults (subject claim sub, common asymmetric algorithms, no conditions) and claim conditions as lists', () => {
  const p = parsePolicy(
    BASE +
      'issuers:\n  - issuer: https://token.actions.githubusercontent.com\n    audience: task-broker\n    claims: { repository_owner: acme, ref: [refs/heads/main, refs/heads/release] }\n  - issuer: http://127.0.0.1:5556\n    audience: [a, b]\n    subjectClaim: email\n    groupsClaim: groups\n    algorithms: [ES256]\n',
  );
  assert.deepEqual(p.issuers, [
    {
      issuer: 'https://token.actions.githubusercontent.com',
      audiences: ['task-broker'],
      subjectClaim: 'sub',
      algorithms: ['RS256', 'PS256', 'ES256', 'EdDSA'],
      claims: { repository_owner: ['acme'], ref: ['refs/heads/main', 'refs/heads/release'] },
    },
    { issuer: 'http://127.0.0.1:5556', audiences: ['a', 'b'], subjectClaim: 'email', groupsClaim: 'groups', algorithms: ['ES256'], claims: {} },
  ]);
  assert.deepEqual(p.agents[0]!.identities[0], {
    kind: 'oidc',
    issuer: 'https://token.actions.githubusercontent.com',
    subject: 'repo:acme/shop:ref:refs/heads/main',
    claims: { ref: ['refs/heads/main'] },
  });
  assert.deepEqual(parsePolicy(BASE).issuers, []);
});

test('issuers: alg none and HMAC algorithms are refused, as are http issuers off loopback, duplicates and a missing audience', () => {
  const issues = issuesOf(
    BASE +
      'issuers:\n  - issuer: https://idp.example.com\n    audience: x\n    algorithms: [RS256, none]\n  - issuer: https://idp.example.com\n    audience: x\n    algorithms: [HS256]\n  - issuer: http://idp.example.com\n  - issuer: https://b.example.com\n    audience: x\n    claims: {}\n',
  );
  assert.deepEqual(issues, [
    'issuers[0].algorithms[1]: "algorithms[1]" must be one of "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519", got "none"',
    'issuers[1].issuer: issuer "https://idp.example.com" is already listed at issuers[0] (line 10)',
    'issuers[1].algorithms[0]: "algorithms[0]" must be one of "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519", got "HS256"',
    'issuers[2].audience: "audience" is required',
    'issuers[2].issuer: "issuer" must be an https URL (http only for localhost or 127.0.0.1), got "http://idp.example.com"',
    'issuers[3].claims: "claims" must not be empty',
  ]);
});

test('serve summary says which OIDC identities cannot sign in because their issuer is not listed', () => {
  const unlisted = identitySummary(parsePolicy(BASE));
  assert.match(unlisted.text, /OIDC identities of https:\/\/token.actions.githubusercontent.com cannot sign in: that issuer is not in "issuers"/);
  const listed = identitySummary(parsePolicy(BASE + 'issuers:\n  - { issuer: "https://token.actions.githubusercontent.com", audience: task-broker }\n'));
  assert.match(listed.text, /OIDC tokens of https:\/\/token.actions.githubusercontent.com \(audience task-broker\) \(1 OIDC identity\)/);
  assert.deepEqual(listed.facts['oidc'], { issuers: ['https://token.actions.githubusercontent.com'], identities: 1 });
});
