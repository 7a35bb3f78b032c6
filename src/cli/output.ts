import chalk from 'chalk';
import { Option } from 'commander';
import { safeJson } from '../text.ts';

/**
 * Text from the broker (task names, reasons, subjects: an agent chose some of it) with every
 * character that could act on a terminal escaped (C0, DEL, C1, bidi overrides; a backslash doubled).
 * The same escaping as `broker audit show`, from the one place that defines it.
 */
export { printable as safe } from '../text.ts';

export type OutputFormat = 'text' | 'json';

/** `-o json|text`, the same on every command that prints data. */
export function outputOption(): Option {
  return new Option('-o, --output <format>', 'output format').choices(['text', 'json']).default('text');
}

/** One JSON document on stdout, for scripts (C1 and bidi characters as \u escapes: the same JSON, safe on a terminal). */
export function printJson(value: unknown): void {
  process.stdout.write(safeJson(value, 2) + '\n');
}

/**
 * When `iso` is from `now`, for text views: "in 9m", "3m ago", "in 1h20m", "2d3h ago", "now". An
 * unreadable time is shown as it came (JSON output keeps the absolute time).
 */
export function relativeTime(iso: string, now: number = Date.now()): string {
  const at = Date.parse(iso);
  if (Number.isNaN(at)) return iso;
  const seconds = Math.floor(Math.abs(at - now) / 1000);
  if (seconds < 1) return 'now';
  const span = seconds < 60 ? `${seconds}s` : seconds < 3600 ? `${Math.floor(seconds / 60)}m` : seconds < 86400 ? hm(seconds) : dh(seconds);
  return at > now ? `in ${span}` : `${span} ago`;
}

const hm = (s: number) => `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60) ? `${Math.floor((s % 3600) / 60)}m` : ''}`;
const dh = (s: number) => `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600) ? `${Math.floor((s % 86400) / 3600)}h` : ''}`;

/** A time for a detail view: relative, then the absolute time in parentheses. */
export function when(iso: string, now: number = Date.now()): string {
  return `${relativeTime(iso, now)} (${iso})`;
}

/** `key  value` lines, keys padded to one width (a detail view); rows whose value is undefined are left out. */
export function fields(rows: Array<[string, string | undefined]>): string {
  const shown = rows.filter((r): r is [string, string] => r[1] !== undefined);
  const width = Math.max(0, ...shown.map(([k]) => k.length));
  return shown.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join('\n') + '\n';
}

// chalk detects a TTY (and FORCE_COLOR) but not NO_COLOR (https://no-color.org): no colour when it is set.
if (process.env['NO_COLOR'] !== undefined && process.env['NO_COLOR'] !== '') chalk.level = 0;

/** Colour only on a TTY and never with NO_COLOR set. */
export const style = {
  error: (s: string) => chalk.red(s),
  dim: (s: string) => chalk.dim(s),
  ok: (s: string) => chalk.green(s),
};

/** Rows under a header, in columns two spaces apart; `empty` when there are no rows. */
export function columns(header: string[], rows: string[][], empty: string): string {
  if (rows.length === 0) return `${empty}\n`;
  const all = [header, ...rows];
  const widths = header.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  return all.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n') + '\n';
}
