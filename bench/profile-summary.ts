/**
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`): self time by package/file and by function,
 * and total time (self + callees) by function. Idle time is left out of the percentages of the busy
 * time ("busy" = every sample but `(idle)`), so profiles of runs of different lengths compare.
 *
 *   bin/bench profile-summary FILE.cpuprofile [TOP=25] [--callers NAME] [--depth 5] [--windows A-B,...] [--requests N]
 *
 * --callers NAME prints, for the function NAME, its self time by call chain (NAME < caller < ...).
 * --windows A-B,... counts only the samples taken within these spans (monotonic clock, microseconds,
 * as process.hrtime and V8's profiler read it): the measured slices of a benchmark, without start-up
 * and without the slices of other servers (bench/credential.ts prints them).
 * --requests N: the requests served in those windows; each line then also gives microseconds a request.
 * The samples count wall time: a thread waiting for a core (on a busy machine) or in a system call counts.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
const { values: flags, positionals } = parseArgs({
  options: { callers: { type: 'string' }, depth: { type: 'string', default: '5' }, windows: { type: 'string' }, requests: { type: 'string' } },
  allowPositionals: true,
});
const file = positionals[0];
if (!file) throw new Error('usage: bin/bench profile-summary FILE.cpuprofile [TOP] [--callers NAME] [--depth N]');
const top = Number(positionals[1] ?? 25);
const prof = JSON.parse(readFileSync(file, 'utf8')) as { nodes: Node[]; samples: number[]; timeDeltas: number[]; startTime: number };
const windows = flags.windows?.split(',').map((w) => w.split('-').map(Number) as [number, number]);
const requests = flags.requests ? Number(flags.requests) : undefined;
const byId = new Map(prof.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const self = new Map<number, number>();
let at = prof.startTime;
prof.samples.forEach((id, i) => {
  at += prof.timeDeltas[i] ?? 0;
  if (windows && !windows.some(([a, b]) => at >= a && at <= b)) return;
  self.set(id, (self.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0));
});
const total = [...self.values()].reduce((a, b) => a + b, 0);
const idle = [...self].filter(([id]) => byId.get(id)!.callFrame.functionName === '(idle)').reduce((a, [, t]) => a + t, 0);
const busy = total - idle;

const where = (url: string) => {
  const m = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (m) return m[1]!;
  if (url.startsWith('node:')) return url;
  const s = /\/(src\/.*|bench\/.*)$/.exec(url);
  return s ? s[1]! : url || '(native/gc/idle)';
};
const label = (n: Node) => `${n.callFrame.functionName || '(anonymous)'} ${where(n.callFrame.url)}:${n.callFrame.lineNumber + 1}`;
const fn = new Map<string, number>();
const pkg = new Map<string, number>();
const inclusive = new Map<string, number>();
for (const [id, t] of self) {
  const n = byId.get(id)!;
  if (n.callFrame.functionName === '(idle)') continue;
  const w = where(n.callFrame.url);
  fn.set(label(n), (fn.get(label(n)) ?? 0) + t);
  pkg.set(w, (pkg.get(w) ?? 0) + t);
  // Every function on this sample's stack, once (recursion counted once).
  const seen = new Set<string>();
  for (let p: number | undefined = id; p !== undefined; p = parent.get(p)) {
    const k = label(byId.get(p)!);
    if (seen.has(k)) continue;
    seen.add(k);
    inclusive.set(k, (inclusive.get(k) ?? 0) + t);
  }
}
const show = (title: string, m: Map<string, number>) => {
  console.log(`\n${title}`);
  const perRequest = (t: number) => (requests ? `${(t / requests).toFixed(2).padStart(7)} us/req  ` : '');
  for (const [k, t] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${((100 * t) / busy).toFixed(1).padStart(5)}%  ${(t / 1000).toFixed(0).padStart(7)} ms  ${perRequest(t)}${k}`);
};
console.log(
  `total ${(total / 1000).toFixed(0)} ms sampled${windows ? ` in ${windows.length} windows` : ''}, of which busy (not idle) ${(busy / 1000).toFixed(0)} ms${requests ? ` (${(busy / requests).toFixed(1)} us a request, ${requests} requests)` : ''}; percentages are of the busy time`,
);
if (flags.callers) {
  const chains = new Map<string, number>();
  for (const [id, t] of self) {
    const n = byId.get(id)!;
    if (n.callFrame.functionName !== flags.callers) continue;
    const chain: string[] = [label(n)];
    let p = parent.get(id);
    for (let i = 0; i < Number(flags.depth) && p !== undefined; i++, p = parent.get(p)) chain.push(label(byId.get(p)!));
    const k = chain.join(' < ');
    chains.set(k, (chains.get(k) ?? 0) + t);
  }
  show(`self time of ${flags.callers} by call chain`, chains);
} else {
  show('self time by file/package', pkg);
  show('self time by function', fn);
  show('total time (self + callees) by function', inclusive);
}
