/**
 * One replica at a time ends expired tasks and removes orphans: the one holding a
 * coordination.k8s.io Lease. Holders renew every `renewMs`; a Lease not renewed for `leaseMs` may be
 * taken over. Optimistic concurrency (resourceVersion) makes the take-over safe between replicas.
 */
import { hostname } from 'node:os';
import type { V1Lease } from '@kubernetes/client-node';
import { isConflict, isNotFound, type KubeApis } from '../kube/config.ts';
import type { TaskService } from './service.ts';

export const SWEEPER_LEASE = 'task-broker-sweeper';

export interface SweeperOptions {
  /** How often the holder sweeps for expired tasks. Default 1 s. */
  intervalMs?: number;
  /** How long a Lease is valid without renewal. Default 15 s. */
  leaseMs?: number;
  /** Orphaned objects younger than this are left alone (another replica may be mid-start). Default 30 s. */
  orphanGraceMs?: number;
  /** How often the holder looks for orphans. Default 30 s. */
  orphanIntervalMs?: number;
  identity?: string;
  log?: (msg: string) => void;
  /** Further clean-up the Lease holder runs with the orphan sweep. */
  housekeeping?: () => Promise<unknown>;
}

export class Sweeper {
  readonly #kube: KubeApis;
  readonly #tasks: TaskService;
  readonly #namespace: string;
  readonly #identity: string;
  readonly #intervalMs: number;
  readonly #leaseMs: number;
  readonly #graceMs: number;
  readonly #orphanIntervalMs: number;
  readonly #log: (msg: string) => void;
  readonly #housekeeping: (() => Promise<unknown>) | undefined;
  #timer: NodeJS.Timeout | undefined;
  #leader = false;
  #lastRenew = 0;
  #lastOrphanSweep = 0;
  /** When the Lease was last renewed, by any replica, as last seen here (ms since epoch; 0: never seen). */
  #observedRenew = 0;
  #running: Promise<void> | undefined;

  constructor(kube: KubeApis, tasks: TaskService, options: SweeperOptions = {}) {
    this.#kube = kube;
    this.#tasks = tasks;
    this.#namespace = tasks.brokerNamespace;
    this.#identity = options.identity ?? `${hostname()}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
    this.#intervalMs = options.intervalMs ?? 1_000;
    this.#leaseMs = options.leaseMs ?? 15_000;
    this.#graceMs = options.orphanGraceMs ?? 30_000;
    this.#orphanIntervalMs = options.orphanIntervalMs ?? 30_000;
    this.#log = options.log ?? (() => undefined);
    this.#housekeeping = options.housekeeping;
  }

  get leader(): boolean {
    return this.#leader;
  }

  /**
   * Seconds since any replica last renewed the sweeper Lease, as seen here; Infinity before it was
   * first seen. Above the lease duration, nobody is ending expired tasks (an alert in docs/operations.md).
   */
  leaseAgeSeconds(now = Date.now()): number {
    return this.#observedRenew === 0 ? Infinity : Math.max(0, (now - this.#observedRenew) / 1000);
  }

  start(): void {
    const tick = () => {
      this.#running = this.tick()
        .catch((err: unknown) => this.#log(`sweep failed: ${(err as Error).message}`))
        .finally(() => {
          this.#running = undefined;
          if (this.#timer !== undefined) this.#timer = setTimeout(tick, this.#intervalMs);
        });
    };
    this.#timer = setTimeout(tick, 0);
  }

  /** Stops sweeping and hands the Lease back, so another replica takes over at once. */
  async stop(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#running;
    if (this.#leader) await this.#release().catch(() => undefined);
    this.#leader = false;
  }

  async tick(): Promise<void> {
    const now = Date.now();
    if (!this.#leader || now - this.#lastRenew > this.#leaseMs / 3) {
      this.#leader = await this.#acquireOrRenew();
      if (this.#leader) this.#lastRenew = now;
    }
    if (!this.#leader) return;
    await this.#tasks.sweepExpired();
    if (now - this.#lastOrphanSweep >= this.#orphanIntervalMs) {
      this.#lastOrphanSweep = now;
      await this.#tasks.sweepOrphans(this.#graceMs);
      await this.#housekeeping?.();
      // Ended tasks past the policy's broker.taskHistory leave the history (src/tasks/history.ts).
      await this.#tasks.history.sweep().catch((err: unknown) => this.#log(`task history sweep failed: ${(err as Error).message}`));
    }
  }

  async #acquireOrRenew(): Promise<boolean> {
    const coordination = this.#kube.coordination;
    const now = new Date();
    let lease: V1Lease;
    try {
      lease = await coordination.readNamespacedLease({ name: SWEEPER_LEASE, namespace: this.#namespace });
    } catch (err) {
      if (!isNotFound(err)) throw err;
      try {
        await coordination.createNamespacedLease({
          namespace: this.#namespace,
          body: {
            metadata: { name: SWEEPER_LEASE },
            spec: this.#spec(now, now, 0),
          },
        });
        this.#observedRenew = now.getTime();
        return true;
      } catch (createErr) {
        if (isConflict(createErr)) return false;
        throw createErr;
      }
    }
    const spec = lease.spec ?? {};
    const mine = spec.holderIdentity === this.#identity;
    const renewed = spec.renewTime ? new Date(spec.renewTime).getTime() : 0;
    const duration = (spec.leaseDurationSeconds ?? 0) * 1000;
    const free = !spec.holderIdentity || renewed + duration < now.getTime();
    if (spec.holderIdentity) this.#observedRenew = renewed;
    if (!mine && !free) return false;
    const acquired = mine && spec.acquireTime ? new Date(spec.acquireTime) : now;
    const transitions = (spec.leaseTransitions ?? 0) + (mine ? 0 : 1);
    try {
      await coordination.replaceNamespacedLease({
        name: SWEEPER_LEASE,
        namespace: this.#namespace,
        body: { ...lease, spec: this.#spec(acquired, now, transitions) },
      });
      this.#observedRenew = now.getTime();
      return true;
    } catch (err) {
      if (isConflict(err)) return false; // another replica got there first
      throw err;
    }
  }

  #spec(acquireTime: Date, renewTime: Date, leaseTransitions: number) {
    return {
      holderIdentity: this.#identity,
      leaseDurationSeconds: Math.ceil(this.#leaseMs / 1000),
      acquireTime: microTime(acquireTime),
      renewTime: microTime(renewTime),
      leaseTransitions,
    };
  }

  async #release(): Promise<void> {
    const lease = await this.#kube.coordination.readNamespacedLease({ name: SWEEPER_LEASE, namespace: this.#namespace });
    if (lease.spec?.holderIdentity !== this.#identity) return;
    await this.#kube.coordination.replaceNamespacedLease({
      name: SWEEPER_LEASE,
      namespace: this.#namespace,
      body: { ...lease, spec: { ...lease.spec, holderIdentity: '', renewTime: microTime(new Date(0)) } },
    });
  }
}

/**
 * Lease times are MicroTime: RFC 3339 with exactly six fractional digits. client-node passes them
 * through untyped, and a Date would be sent with three digits, which the API server refuses.
 */
function microTime(date: Date): Date {
  return date.toISOString().replace(/\.(\d{3})Z$/, '.$1000Z') as unknown as Date;
}
