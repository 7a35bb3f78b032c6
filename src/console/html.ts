/**
 * HTML for the web console, made in one way only: the `html` tag escapes every interpolated value
 * (through `escapeHtml`) unless it is already `Html` made by this tag. Text from outside (reasons,
 * names, request URIs, recordings) also goes through `visible`, which shows control characters and
 * bidirectional overrides as visible escapes (as `printable` does for the CLI, src/text.ts), so a
 * reason cannot read backwards or hide part of itself on an approver's screen.
 */
import { printable } from '../text.ts';

/** Markup made by `html` (or `raw`, for constant markup of our own): inserted as it is. */
export class Html {
  readonly value: string;
  constructor(value: string) {
    this.value = value;
  }
  toString(): string {
    return this.value;
  }
}

const ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;', '`': '&#96;' };

/** The one escaping function: text safe inside an element and inside a quoted attribute. */
export function escapeHtml(s: string): string {
  return s.replace(/[&<>"'`]/g, (c) => ESCAPES[c]!);
}

/** Text from outside, its control and bidi characters shown as escapes (`\u202e`), then HTML-escaped by `html`. */
export function visible(s: string): string {
  return printable(s);
}

type Value = Html | string | number | boolean | null | undefined | readonly Value[];

function render(v: Value): string {
  if (v === null || v === undefined || v === false) return '';
  if (v instanceof Html) return v.value;
  if (Array.isArray(v)) return v.map(render).join('');
  return escapeHtml(String(v));
}

/** `html\`<p>${text}</p>\``: every value escaped, nested `Html` kept. */
export function html(strings: TemplateStringsArray, ...values: Value[]): Html {
  let out = strings[0]!;
  for (let i = 0; i < values.length; i++) out += render(values[i]!) + strings[i + 1]!;
  return new Html(out);
}

/** Constant markup of the console's own (never text from outside). */
export function raw(s: string): Html {
  return new Html(s);
}

/**
 * A session recording's bytes as text for the player's terminal view: line breaks kept (CR LF and a
 * lone CR as a line break), tab kept; every other control character shown as its Control Pictures
 * symbol (ESC as ␛, so `␛[31m` is seen, not obeyed); bidirectional overrides and other invisible
 * formatting characters as `<U+202E>`. Nothing in a recording can move the cursor or hide text.
 */
export function terminalText(s: string): string {
  return s
    .replace(/\r\n/g, '\n')
    .replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g, (c) => (c === '\r' ? '\n' : String.fromCharCode(c === '\u007f' ? 0x2421 : 0x2400 + c.charCodeAt(0))))
    .replace(/[\u0080-\u009f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/g, (c) => `<U+${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}>`);
}
