/**
 * A host of its own for a test: a network namespace joined to this one by a veth pair, with
 * addresses from TEST-NET-1 (192.0.2.0/24, RFC 5737: documentation only, never routed), and nothing
 * else: no route out, its own loopback. Made with iproute2 (`ip netns`, `ip link`), removed by
 * remove(), also after a failed test. Needs root (CAP_NET_ADMIN).
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

/** A namespace on 192.0.2.(4n+2)/30 with this side on 192.0.2.(4n+1); n chosen at random. */
export function makeNetnsHost(): NetnsHost {
  const id = randomBytes(3).toString('hex');
  const name = `tb-${id}`;
  const hostIf = `tbh${id}`;
  const nsIf = `tba${id}`;
  const n = randomBytes(1)[0]! % 63;
  const hostAddress = `192.0.2.${4 * n + 1}`;
  const address = `192.0.2.${4 * n + 2}`;
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
