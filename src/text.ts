/**
 * Text from outside (agents' reasons, names, request URIs) never reaches a terminal raw: the API
 * refuses control characters in free-text fields, and every view escapes what it prints from the
 * broker or the log (older records included).
 */

import { BrokerError } from './errors.ts';

// C0, DEL, C1, LRM/RLM/ALM, line/paragraph separators, bidi embeddings, overrides and isolates, BOM.
const CONTROL = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]/;
// The same, and backslash (doubled when escaping, so an escape cannot be faked).
const UNSAFE = new RegExp(`${CONTROL.source.slice(0, -1)}\\\\]`, 'g');
const hex = (n: number, width: number) => n.toString(16).padStart(width, '0');

/** The first control or bidirectional-override character in `s`, as `U+NNNN at position I`, or undefined. */
export function controlCharacterIn(s: string): string | undefined {
  const m = CONTROL.exec(s);
  return m ? `U+${hex(m[0].charCodeAt(0), 4).toUpperCase()} at position ${m.index}` : undefined;
}

/**
 * Refuses free text (an API field) that holds a control or bidirectional-override character, naming
 * the field: such text could rewrite an approver's terminal or make a reason read backwards.
 */
export function checkFreeText(field: string, value: string | undefined): void {
  const bad = value === undefined ? undefined : controlCharacterIn(value);
  if (bad) {
    throw new BrokerError('invalid_argument', `"${field}" must not contain control or bidirectional-override characters (found ${bad})`, { field });
  }
}

/**
 * `s` with every character that could act on a terminal escaped: C0 controls and DEL as `\xNN`, C1
 * controls as `\u00NN` (U+009B is a one-byte CSI on some terminals), line and paragraph separators and
 * bidirectional overrides as `\uNNNN`; a backslash is doubled so an escape cannot be faked.
 */
export function printable(s: string): string {
  return s.replace(UNSAFE, (c) => {
    if (c === '\\') return '\\\\';
    const code = c.charCodeAt(0);
    return code < 0x20 || code === 0x7f ? `\\x${hex(code, 2)}` : `\\u${hex(code, 4)}`;
  });
}

/** JSON text safe for a terminal: the same as JSON.stringify, with C1 and bidi characters as \u escapes (still the same JSON). */
export function safeJson(value: unknown, indent?: number): string {
  return JSON.stringify(value, null, indent).replace(new RegExp(CONTROL.source.replace('\\u0000-\\u001f', ''), 'g'), (c) => `\\u${hex(c.charCodeAt(0), 4)}`);
}
