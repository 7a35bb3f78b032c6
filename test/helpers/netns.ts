/**
 * A host of its own for a test: a network namespace joined to this one by a veth pair, on a /30 from
 * 198.18.0.0/15 (RFC 2544: for benchmarking, never routed) that overlaps no address or route this
 * machine already has, and nothing else: no route out, its own loopback. Made with iproute2 (`ip
 * netns`, `ip link`), removed by remove(), also after a failed test. Needs root (CAP_NET_ADMIN).
 *
 * Not TEST-NET-1 (192.0.2.0/24), which it used first: some machines' own networks use it (a CI host
 * with 192.0.2.2/24 on eth0 and its gateway on .1), and a link on 192.0.2.0/30 there took the host's
 * own address and its gateway's: the namespace's connections failed with EHOSTUNREACH.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';

export interface NetnsHost {
  /** The namespace's name (`ip netns exec NAME ...`). */
  name: string;
  /** This side's address on the link: what the namespace can reach. */
  hostAddress: string;
  /** The namespace's own address. */
  address: string;
  remove(): void;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();

/** Whether this process may make network namespaces (root, with iproute2). */
export function canMakeNetns(): boolean {
  try {
    if (process.getuid?.() !== 0) return false;
    ip('netns', 'list');
    return true;
  } catch {
    return false;
  }
}

/** An IPv4 address as a number. */
const toNumber = (a: string): number => a.split('.').reduce((n, octet) => n * 256 + Number(octet), 0);
const toAddress = (n: number): string => [24, 16, 8, 0].map((shift) => Math.floor(n / 2 ** shift) % 256).join('.');

/** The IPv4 prefixes this machine already has: its addresses' subnets and its routes (the default route aside), as [first, last]. */
function prefixesInUse(): Array<[number, number]> {
  const ranges: Array<[number, number]> = [];
  const add = (address: string, bits: number) => {
    const size = 2 ** (32 - bits);
    const first = Math.floor(toNumber(address) / size) * size;
    ranges.push([first, first + size - 1]);
  };
  for (const link of JSON.parse(ip('-j', '-4', 'addr', 'show')) as Array<{ addr_info?: Array<{ local: string; prefixlen: number }> }>) {
    for (const a of link.addr_info ?? []) add(a.local, a.prefixlen);
  }
  for (const route of JSON.parse(ip('-j', '-4', 'route', 'show', 'table', 'all')) as Array<{ dst: string }>) {
    if (!/^\d+\.\d+\.\d+\.\d+(\/\d+)?$/.test(route.dst)) continue; // default, broadcast types named otherwise
    const [address, bits] = route.dst.split('/');
    add(address!, bits === undefined ? 32 : Number(bits));
  }
  return ranges;
}

/** A /30 of 198.18.0.0/15 at random that overlaps nothing in use here: [this side's address, the namespace's]. */
function freeLink(): [string, string] {
  const used = prefixesInUse();
  const base = toNumber('198.18.0.0');
  for (let attempt = 0; attempt < 64; attempt++) {
    const first = base + 4 * (randomBytes(2).readUInt16BE(0) % 32768);
    if (used.some(([lo, hi]) => first <= hi && first + 3 >= lo)) continue;
    return [toAddress(first + 1), toAddress(first + 2)];
  }
  throw new Error('no free /30 in 198.18.0.0/15 for a test network namespace');
}

/** A namespace on a /30 that overlaps nothing this machine has (freeLink), this side on its first address. */
export function makeNetnsHost(): NetnsHost {
  const id = randomBytes(3).toString('hex');
  const name = `tb-${id}`;
  const hostIf = `tbh${id}`;
  const nsIf = `tba${id}`;
  const [hostAddress, address] = freeLink();
  const remove = () => {
    try {
      ip('netns', 'del', name);
    } catch {
      // not there (any more)
    }
    try {
      ip('link', 'del', hostIf);
    } catch {
      // went with the namespace
    }
  };
  try {
    ip('netns', 'add', name);
    ip('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
    ip('link', 'set', nsIf, 'netns', name);
    ip('addr', 'add', `${hostAddress}/30`, 'dev', hostIf);
    ip('link', 'set', hostIf, 'up');
    ip('netns', 'exec', name, 'ip', 'addr', 'add', `${address}/30`, 'dev', nsIf);
    ip('netns', 'exec', name, 'ip', 'link', 'set', nsIf, 'up');
    ip('netns', 'exec', name, 'ip', 'link', 'set', 'lo', 'up');
  } catch (err) {
    remove();
    throw err;
  }
  return { name, hostAddress, address, remove };
}

/** Whether a namespace of this name exists (for the test's check that it was removed). */
export function netnsExists(name: string): boolean {
  return ip('netns', 'list').split('\n').some((l) => l.split(' ')[0] === name);
}
