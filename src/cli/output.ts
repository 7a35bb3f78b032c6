import chalk from 'chalk';
import { Option } from 'commander';

export type OutputFormat = 'text' | 'json';

/** `-o json|text`, the same on every command that prints data. */
export function outputOption(): Option {
  return new Option('-o, --output <format>', 'output format').choices(['text', 'json']).default('text');
}

/** One JSON document on stdout, for scripts. */
export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
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
