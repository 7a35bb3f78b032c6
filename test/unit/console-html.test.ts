/**
 * The console's one escaping path (src/console/html.ts) and its plain words for grants
 * (src/console/grants.ts): markup never survives interpolation, bidi overrides and control
 * characters are shown, recordings are inert text.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { escapeHtml, html, raw, terminalText, visible } from '../../src/console/html.ts';
import { grantWords, isPersistent, ttlWords } from '../../src/console/grants.ts';
import { DEFAULT_GATED } from '../../src/policy/grants.ts';
import type { Policy, Template } from '../../src/policy/types.ts';

test('html escapes every interpolated string, in text and in attributes; nested html is kept', () => {
  const evil = `<img src=x onerror="alert(1)"></script>'\`&`;
  const out = html`<p title="${evil}">${evil}${html`<b>${evil}</b>`}${raw('<i>ours</i>')}</p>`.value;
  assert.equal(out.includes('<img'), false);
  assert.equal(out.includes('</script>'), false);
  assert.equal(/"[^"]*"[^>]*onerror/.test(out.split('>')[0]!), false, 'the attribute cannot be closed');
  assert.match(out, /<b>&lt;img src=x onerror=&quot;alert\(1\)&quot;&gt;&lt;\/script&gt;&#39;&#96;&amp;<\/b><i>ours<\/i>/);
  assert.equal(escapeHtml('a&b'), 'a&amp;b');
  assert.equal(html`${[1, 'x<', null, undefined, false]}`.value, '1x&lt;');
});

test('visible shows bidi overrides and control characters as escapes (as the CLI does)', () => {
  assert.equal(visible('abc\u202edef\u001b[31m\\'), 'abc\\u202edef\\x1b[31m\\\\');
  assert.equal(html`${visible('\u2066x\u2069')}`.value, '\\u2066x\\u2069');
});

test('terminalText: line breaks kept, escapes shown as Control Pictures, bidi as <U+NNNN>: nothing can move the cursor', () => {
  assert.equal(terminalText('a\r\nb\rc\td'), 'a\nb\nc\td');
  assert.equal(terminalText('\u001b[2J\u001b[31mred\u0007'), '␛[2J␛[31mred␇');
  assert.equal(terminalText('x\u202ey\u200fz\u009b'), 'x<U+202E>y<U+200F>z<U+009B>');
  assert.equal(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u202e]/.test(terminalText('\u0000\u007f\u0085\u202e')), false);
});

test('grant words: verbs x resources x namespace; gated pairs with their reason; those that outlive the task flagged', () => {
  const template: Template = {
    name: 'debug',
    namespaces: ['shop'],
    rules: [
      { apiGroups: [''], resources: ['pods', 'pods/exec'], verbs: ['get', 'create'] },
      { apiGroups: ['rbac.authorization.k8s.io'], resources: ['rolebindings'], verbs: ['create'] },
    ],
    defaultTtl: 600,
    maxTtl: 600,
    agents: ['a'],
  };
  const words = grantWords({ gated: DEFAULT_GATED } as Policy, template, 'shop', undefined);
  assert.deepEqual(words.lines[0], { verbs: ['get', 'create'], resources: ['pods', 'pods/exec'], namespaces: ['shop'] });
  assert.deepEqual(words.lines[1]!.resources, ['rolebindings.rbac.authorization.k8s.io']);
  const exec = words.gated.find((g) => g.pair === 'create pods/exec')!;
  assert.equal(exec.persistent, false);
  const pods = words.gated.find((g) => g.pair === 'create pods')!;
  assert.equal(pods.persistent, true, pods.reason);
  assert.equal(words.gated.find((g) => g.pair.startsWith('create rolebindings'))!.persistent, true);
  assert.equal(isPersistent('can read Secrets: passwords, keys and ServiceAccount tokens'), false);
  const cr = grantWords({ gated: DEFAULT_GATED } as Policy, { ...template, rules: undefined, clusterRole: 'edit' } as unknown as Template, 'shop', undefined);
  assert.equal(cr.clusterRole, 'edit');
  assert.deepEqual([ttlWords(45), ttlWords(900), ttlWords(5400), ttlWords(7200)], ['45 s', '15 min', '1 h 30 min', '2 h']);
});
