/**
 * The docs and the command line, compared: docs/cli.md has a section for every command commander
 * knows, and every `broker ...` command and flag it shows exists (in both directions). The README
 * and the other docs show only commands and flags that exist too (a line that calls one planned is
 * left alone), benchmarks run through `bin/bench` (Node 20 cannot run `node bench/X.ts`), and the
 * repository files and links they name exist.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Command } from 'commander';

const ROOT = new URL('../..', import.meta.url).pathname;
const read = (path: string) => readFileSync(join(ROOT, path), 'utf8');
const DOCS = ['README.md', ...readdirSync(join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];

let program: Command;

before(async () => {
  // src/cli/main.ts runs the CLI when it is loaded: give it `--version` (prints one line, changes
  // nothing), with stdout muted, and keep its buildProgram.
  const saved = { argv: process.argv, write: process.stdout.write, exitCode: process.exitCode };
  process.argv = [process.argv[0]!, 'broker', '--version'];
  process.stdout.write = (() => true) as typeof process.stdout.write;
  try {
    const { buildProgram } = (await import('../../src/cli/main.ts')) as { buildProgram: () => Command };
    program = buildProgram();
  } finally {
    process.argv = saved.argv;
    process.stdout.write = saved.write;
    process.exitCode = saved.exitCode;
  }
});

const hidden = (cmd: Command) => (cmd as unknown as { _hidden?: boolean })._hidden === true;
const hasAction = (cmd: Command) => (cmd as unknown as { _actionHandler?: unknown })._actionHandler != null;

/** Every command path (`task start`), and whether it runs (has an action) or only groups others. */
function commands(cmd: Command, prefix: string[] = []): Array<{ path: string; runs: boolean }> {
  return cmd.commands
    .filter((c) => !hidden(c))
    .flatMap((c) => [{ path: [...prefix, c.name()].join(' '), runs: hasAction(c) || c.commands.length === 0 }, ...commands(c, [...prefix, c.name()])]);
}

/** The `broker credential` plugin parses its own flags (src/credential/main.cts): commander only lists it. */
const PLUGIN_FLAGS = ['--task', '--broker', '--broker-ca', '--via', '-h', '--help'];

interface Named {
  /** `broker task start` as written, for messages. */
  text: string;
  /** The command it resolves to ('' for the program), or undefined when it names no command. */
  path: string | undefined;
  problems: string[];
}

/**
 * What `broker WORDS...` names: the longest run of words that are subcommands, then its flags (from
 * a command line or a synopsis such as `[--dir DIR] [-o json]`) checked against that command and the
 * ones above it. A lowercase word that is no subcommand where only subcommands can follow is a problem.
 */
function resolve(words: string[]): Named {
  let node = program;
  const path: string[] = [];
  const problems: string[] = [];
  let i = 0;
  for (; i < words.length; i++) {
    const w = words[i]!;
    if (!/^[a-z][a-z0-9-]*$/.test(w)) break;
    const sub = node.commands.find((c) => c.name() === w || c.aliases().includes(w));
    if (sub) {
      node = sub;
      path.push(w);
      continue;
    }
    // An argument (`broker run deployer`, `broker approve ar-1`), unless only subcommands may follow.
    if (node.commands.length > 0 && node.registeredArguments.length === 0 && !hasAction(node)) problems.push(`no command "${[...path, w].join(' ')}"`);
    break;
  }
  // `broker credential: ...` (output, not a command line).
  if (i === 0 && words.length > 0 && !/^-|^[a-z][a-z0-9-]*$/.test(words[0]!)) return { text: `broker ${words.join(' ')}`, path: undefined, problems: [] };
  const known = new Set<string>(['-h', '--help']);
  for (let n: Command | null = node; n; n = n.parent) for (const o of n.options) for (const f of [o.short, o.long]) if (f) known.add(f);
  if (path[0] === 'credential') PLUGIN_FLAGS.forEach((f) => known.add(f));
  for (const w of words.slice(i)) {
    if (w === '--') break; // the rest is another command's (`broker run ... -- kubectl ...`)
    if (w.endsWith('--')) continue; // an arrow of a diagram (`--HTTPS-->`)
    const flag = /^\[*(-{1,2}[A-Za-z][\w-]*)/.exec(w)?.[1];
    if (flag && !known.has(flag)) problems.push(`no flag ${flag} on "broker ${path.join(' ')}"`);
  }
  return { text: `broker ${words.slice(0, i + 1).join(' ')}`.trim(), path: path.join(' '), problems };
}

/**
 * Code in Markdown, each piece with the line it starts on: the lines of fenced blocks, and inline
 * code spans (which may run over a line break: joined with a space). Prose is left out.
 */
function code(markdown: string): Array<{ line: number; text: string }> {
  const out: Array<{ line: number; text: string }> = [];
  let fenced = false;
  // Text outside fences, blanked inside them, so that offsets still give line numbers.
  const prose = markdown
    .split('\n')
    .map((line, n) => {
      if (/^\s*```/.test(line)) {
        fenced = !fenced;
        return '';
      }
      if (fenced) {
        out.push({ line: n + 1, text: line });
        return '';
      }
      return line;
    })
    .join('\n');
  for (const m of prose.matchAll(/`([^`]+)`/g)) {
    out.push({ line: prose.slice(0, m.index).split('\n').length, text: m[1]!.replace(/\s*\n\s*/g, ' ') });
  }
  return out.sort((a, b) => a.line - b.line);
}

/**
 * Each `broker ...` command line in a piece of code: the words after `broker` up to a shell separator,
 * where `broker` starts a command (not `kubectl config set-credentials broker ...`, where it is a name).
 */
function brokerCommands(text: string): string[][] {
  const found: string[][] = [];
  for (const m of text.matchAll(/(?<![\w.:@/-])((?:\.\/)?bin\/)?broker ((?:[^\s|;&)`#<>]+ ?)+)/g)) {
    if (!startsCommand(text.slice(0, m.index))) continue;
    // Continued lines end with a backslash.
    found.push(m[2]!.trim().split(/\s+/).filter((w) => w !== '\\'));
  }
  return found;
}

/** Whether what comes before a word leaves it in command position: nothing, a separator, `$(`, `VAR=x`, `exec`. */
function startsCommand(before: string): boolean {
  const words = before.trimEnd().split(/\s+/);
  for (let i = words.length - 1; i >= 0; i--) {
    const w = words[i]!;
    if (w === '' || /[(|;&`"]$/.test(w) || ['exec', 'time', 'then', 'do', 'env', '!', '$'].includes(w)) return true;
    if (!/^[A-Za-z_]\w*=\S*$/.test(w)) return false; // an argument of another command
  }
  return true;
}

/** Lines that say a command is planned are not held to exist. */
const planned = (markdown: string, line: number) => /\bplanned\b/i.test(markdown.split('\n')[line - 1] ?? '');

test('every command commander knows has a section in docs/cli.md', () => {
  const sections = read('docs/cli.md')
    .split('\n')
    .filter((l) => l.startsWith('### '))
    .flatMap((l) => [...l.matchAll(/`([^`]+)`/g)].map((m) => m[1]!))
    .filter((s) => /^broker( |$)/.test(s))
    .map((s) => resolve(s.split(/\s+/).slice(1)).path);
  const documented = new Set(sections);
  const missing = commands(program)
    .filter((c) => c.runs && !documented.has(c.path))
    .map((c) => `broker ${c.path}`);
  assert.deepEqual(missing, [], `docs/cli.md has no "### \`broker ...\`" section for: ${missing.join(', ')}`);
});

test('every broker command and flag docs/cli.md shows exists', () => {
  const md = read('docs/cli.md');
  const problems = code(md).flatMap(({ line, text }) =>
    brokerCommands(text).flatMap((words) => resolve(words).problems.map((p) => `docs/cli.md:${line}: \`broker ${words.join(' ')}\`: ${p}`)),
  );
  assert.deepEqual(problems, []);
});

test('the README and every doc show only broker commands and flags that exist (a line may call one planned)', () => {
  const problems = DOCS.filter((f) => f !== 'docs/cli.md').flatMap((file) => {
    const md = read(file);
    return code(md)
      .filter(({ line }) => !planned(md, line))
      .flatMap(({ line, text }) => brokerCommands(text).flatMap((words) => resolve(words).problems.map((p) => `${file}:${line}: \`broker ${words.join(' ')}\`: ${p}`)));
  });
  assert.deepEqual(problems, []);
});

test('benchmarks are run with bin/bench (the project\'s Node), and each one named exists', () => {
  const problems = DOCS.flatMap((file) =>
    read(file)
      .split('\n')
      .flatMap((l, n) => [
        ...(/\bnode bench\//.test(l) ? [`${file}:${n + 1}: \`node bench/...\` needs Node >= 22.18: use bin/bench NAME`] : []),
        ...[...l.matchAll(/\bbin\/bench ([a-z][\w-]*)/g)].filter((m) => !existsSync(join(ROOT, 'bench', `${m[1]}.ts`))).map((m) => `${file}:${n + 1}: no bench/${m[1]}.ts`),
      ]),
  );
  assert.deepEqual(problems, []);
});

test('the repository files and the links the docs name exist', () => {
  const problems = DOCS.flatMap((file) => {
    const md = read(file);
    const lines = md.split('\n');
    const missing: string[] = [];
    // Relative links, from the file's own directory.
    lines.forEach((l, n) => {
      for (const m of l.matchAll(/\]\(([^)\s#]+)(?:#[^)]*)?\)/g)) {
        const target = m[1]!;
        if (/^[a-z]+:/.test(target)) continue;
        if (!existsSync(join(ROOT, dirname(file), target))) missing.push(`${file}:${n + 1}: link to ${target}`);
      }
    });
    // Paths in code that start at the top of the repository (no placeholders, no globs).
    for (const { line, text } of code(md)) {
      if (planned(md, line)) continue;
      for (const m of text.matchAll(/(?<![\w./$-])((?:bin|bench|docs|native|src|test)\/[\w.\/-]*[\w]|install\.sh)(?![\w*{$\/-])/g)) {
        const path = m[1]!;
        if (/[A-Z]{3,}/.test(path)) continue; // DIR, NAME: a placeholder
        if (!existsSync(join(ROOT, path))) missing.push(`${file}:${line}: ${path}`);
      }
    }
    return missing;
  });
  assert.deepEqual(problems, []);
});
