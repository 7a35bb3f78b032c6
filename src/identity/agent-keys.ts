/**
 * Agent keys in the cluster, so every broker replica shares them: per enrolled agent a ConfigMap
 * `agent-key-AGENT` holding its Ed25519 public key, and per open enrolment a ConfigMap
 * `agent-enrolment-SHA256(CODE)` (the code itself is never stored). Both in the broker's own
 * namespace, both signed by the broker (src/state-signature.ts) and verified on every read: whoever
 * can write ConfigMaps there cannot plant a key.
 *
 * Each replica keeps the verified records in memory from a watch, so a key is looked up without a
 * round trip and a revocation by any replica reaches the others within the watch's latency; the
 * replica that revokes forgets the key at once.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as k8s from '@kubernetes/client-node';
import { BrokerError } from '../errors.ts';
import { clusterError, type KubeApis } from '../kube/config.ts';
import type { StateSigner } from '../state-signature.ts';
import type { SharedUsedProofs } from './proof-replay.ts';
import { SIGNATURE_ANNOTATION } from '../state-signature.ts';

/** Label on both kinds of record: `key` or `enrolment`. */
export const AGENT_KEY_LABEL = 'task-broker.dev/agent-key';
/** How long an enrolment code can be used (issue 14: 15 minutes). */
export const ENROLMENT_TTL_MS = 15 * 60_000;
const CODE_PREFIX = 'tbe1';
/** Proof ids remembered at once: 100 requests a second (the default per-identity limit) for 60 s, times 50 agents. */
const MAX_SEEN_PROOFS = 300_000;

export interface AgentKeyRecord {
  agent: string;
  /** Raw Ed25519 public key, base64url. */
  publicKey: string;
  enrolledAt: string;
  /** SHA-256 of the raw public key, base64url, first 16 characters: how logs and lists name the key. */
  fingerprint: string;
}

export interface Enrolment {
  agent: string;
  expiresAt: string;
  createdBy: string;
}

export function fingerprintOf(publicKey: string): string {
  return createHash('sha256').update(Buffer.from(publicKey, 'base64url')).digest('base64url').slice(0, 16);
}

const keyName = (agent: string) => `agent-key-${agent}`;
const enrolmentName = (code: string) => `agent-enrolment-${createHash('sha256').update(code).digest('hex')}`;

export interface AgentKeyStoreOptions {
  now?: () => number;
  log?: (line: string) => void;
  /** The used-proof table every replica on a PostgreSQL audit store shares (src/identity/proof-replay.ts). */
  usedProofs?: SharedUsedProofs | undefined;
}

export class AgentKeyStore {
  readonly #kube: KubeApis;
  readonly #ns: string;
  readonly #signer: StateSigner;
  readonly #now: () => number;
  readonly #log: (line: string) => void;
  readonly #keys = new Map<string, AgentKeyRecord>();
  readonly #enrolments = new Map<string, Enrolment>();
  /** Proof ids seen, until their proof expires: a proof is accepted once by this replica... */
  readonly #seen = new Map<string, number>();
  /** ...and, on a shared store, once by any replica (docs/identity.md). */
  readonly #usedProofs: SharedUsedProofs | undefined;
  #informer: k8s.Informer<k8s.V1ConfigMap> | undefined;

  constructor(kube: KubeApis, namespace: string, signer: StateSigner, options: AgentKeyStoreOptions = {}) {
    this.#kube = kube;
    this.#ns = namespace;
    this.#signer = signer;
    this.#now = options.now ?? Date.now;
    this.#log = options.log ?? ((line) => process.stderr.write(`broker: ${line}\n`));
    this.#usedProofs = options.usedProofs;
    this.#usedProofs?.start((err) => this.#log(`pruning the used agent proofs: ${err.message}`));
  }

  /** Starts watching the records; resolves once the first list is in and verified. */
  async watch(config: k8s.KubeConfig): Promise<void> {
    const core = config.makeApiClient(k8s.CoreV1Api);
    const namespace = this.#ns;
    const informer = k8s.makeInformer<k8s.V1ConfigMap>(
      config,
      `/api/v1/namespaces/${namespace}/configmaps`,
      () => core.listNamespacedConfigMap({ namespace, labelSelector: AGENT_KEY_LABEL }),
      AGENT_KEY_LABEL,
    );
    informer.on('add', (cm) => void this.#ingest(cm));
    informer.on('update', (cm) => void this.#ingest(cm));
    informer.on('delete', (cm) => this.#forget(cm));
    informer.on('error', () => undefined); // ListWatch reconnects by itself, with backoff
    this.#informer = informer;
    await informer.start();
    await Promise.all(informer.list().map((cm) => this.#ingest(cm)));
  }

  async stop(): Promise<void> {
    this.#usedProofs?.stop();
    await this.#informer?.stop();
  }

  /** The agent's current key, verified; undefined when it has none (never enrolled, or revoked). */
  keyOf(agent: string): AgentKeyRecord | undefined {
    return this.#keys.get(agent);
  }

  /**
   * Whether this is the first use of proof `jti` of `agent` (expiring at `exp`, seconds). Kept until
   * the proof expires; full (an agent flooding proofs past its rate limit), every proof is refused until
   * room frees. On a shared store, then asked of the used-proof table (one INSERT): a promise, which
   * rejects with audit_unavailable when the store cannot answer.
   */
  firstUse(jti: string, exp: number, agent: string): boolean | Promise<boolean> {
    const now = this.#now();
    if (this.#seen.has(jti)) return false;
    if (this.#seen.size >= MAX_SEEN_PROOFS) {
      for (const [k, until] of this.#seen) if (until <= now) this.#seen.delete(k);
      if (this.#seen.size >= MAX_SEEN_PROOFS) return false;
    }
    this.#seen.set(jti, exp * 1000 + 10_000);
    return this.#usedProofs ? this.#usedProofs.firstUse(agent, jti, exp) : true;
  }

  /** Every key and open enrolment, by agent. */
  list(): Array<{ agent: string; key?: AgentKeyRecord; enrolment?: Enrolment }> {
    const agents = new Set([...this.#keys.keys(), ...[...this.#enrolments.values()].filter((e) => Date.parse(e.expiresAt) > this.#now()).map((e) => e.agent)]);
    return [...agents].sort().map((agent) => {
      const key = this.#keys.get(agent);
      const enrolment = [...this.#enrolments.values()].find((e) => e.agent === agent && Date.parse(e.expiresAt) > this.#now());
      return { agent, ...(key ? { key } : {}), ...(enrolment ? { enrolment } : {}) };
    });
  }

  /** A new one-time enrolment code for `agent`, valid ENROLMENT_TTL_MS. Only its hash is stored. */
  async register(agent: string, createdBy: string): Promise<{ code: string; expiresAt: string }> {
    const code = `${CODE_PREFIX}.${randomBytes(24).toString('base64url')}`;
    const enrolment: Enrolment = { agent, expiresAt: new Date(this.#now() + ENROLMENT_TTL_MS).toISOString(), createdBy };
    const name = enrolmentName(code);
    const signature = await this.#signer.sign('agent-enrolment', { name, ...enrolment });
    try {
      await this.#kube.core.createNamespacedConfigMap({ namespace: this.#ns, body: configMap(name, 'enrolment', { ...enrolment }, signature) });
    } catch (err) {
      throw clusterError('storing the enrolment', err);
    }
    return { code, expiresAt: enrolment.expiresAt };
  }

  /**
   * Uses an enrolment code: valid, unexpired, signed by this broker, and not used before. Single use
   * holds across replicas: the record is deleted with its uid and resourceVersion as preconditions,
   * so of two uses at once exactly one deletes it. Throws `unauthenticated` with the reason.
   */
  async consume(code: string): Promise<Enrolment> {
    if (!code.startsWith(`${CODE_PREFIX}.`) || code.length > 100) throw new BrokerError('unauthenticated', 'enrolment refused: that is not an enrolment code');
    const name = enrolmentName(code);
    let cm: k8s.V1ConfigMap;
    try {
      cm = await this.#kube.core.readNamespacedConfigMap({ name, namespace: this.#ns });
    } catch (err) {
      if (err instanceof k8s.ApiException && err.code === 404) throw new BrokerError('unauthenticated', 'enrolment refused: the code is unknown, or was used already');
      throw clusterError('reading the enrolment', err);
    }
    const enrolment = await this.#verifiedEnrolment(cm);
    if (!enrolment) throw new BrokerError('unauthenticated', 'enrolment refused: the code is unknown, or was used already');
    try {
      await this.#kube.core.deleteNamespacedConfigMap({
        name,
        namespace: this.#ns,
        body: { preconditions: { uid: cm.metadata!.uid!, resourceVersion: cm.metadata!.resourceVersion! } },
      });
    } catch (err) {
      if (err instanceof k8s.ApiException && (err.code === 404 || err.code === 409)) throw new BrokerError('unauthenticated', 'enrolment refused: the code is unknown, or was used already');
      throw clusterError('using the enrolment', err);
    }
    this.#enrolments.delete(name);
    if (Date.parse(enrolment.expiresAt) <= this.#now()) throw new BrokerError('unauthenticated', `enrolment refused: the code expired at ${enrolment.expiresAt}`);
    return enrolment;
  }

  /** Stores `publicKey` as `agent`'s key, replacing any earlier one. */
  async enrol(agent: string, publicKey: string): Promise<AgentKeyRecord> {
    const record: AgentKeyRecord = { agent, publicKey, enrolledAt: new Date(this.#now()).toISOString(), fingerprint: fingerprintOf(publicKey) };
    const name = keyName(agent);
    const signature = await this.#signer.sign('agent-key', keyFacts(name, record));
    const body = configMap(name, 'key', { ...record }, signature);
    try {
      await this.#kube.core.createNamespacedConfigMap({ namespace: this.#ns, body });
    } catch (err) {
      if (!(err instanceof k8s.ApiException && err.code === 409)) throw clusterError('storing the agent key', err);
      try {
        await this.#kube.core.replaceNamespacedConfigMap({ name, namespace: this.#ns, body });
      } catch (err2) {
        throw clusterError('replacing the agent key', err2);
      }
    }
    this.#keys.set(agent, record);
    return record;
  }

  /** Removes the agent's key: forgotten here at once, by other replicas when their watch sees it. Whether there was one. */
  async revoke(agent: string): Promise<AgentKeyRecord | undefined> {
    const had = this.#keys.get(agent);
    this.#keys.delete(agent);
    try {
      await this.#kube.core.deleteNamespacedConfigMap({ name: keyName(agent), namespace: this.#ns });
    } catch (err) {
      if (!(err instanceof k8s.ApiException && err.code === 404)) throw clusterError('deleting the agent key', err);
      return had;
    }
    return had;
  }

  async #ingest(cm: k8s.V1ConfigMap): Promise<void> {
    const kind = cm.metadata?.labels?.[AGENT_KEY_LABEL];
    const name = cm.metadata?.name ?? '';
    if (kind === 'enrolment') {
      const enrolment = await this.#verifiedEnrolment(cm);
      if (enrolment) this.#enrolments.set(name, enrolment);
      return;
    }
    if (kind !== 'key') return;
    const d = cm.data ?? {};
    const record: AgentKeyRecord = { agent: d['agent'] ?? '', publicKey: d['publicKey'] ?? '', enrolledAt: d['enrolledAt'] ?? '', fingerprint: d['fingerprint'] ?? '' };
    let ok = false;
    try {
      ok = name === keyName(record.agent) && record.fingerprint === fingerprintOf(record.publicKey) && (await this.#signer.verify('agent-key', keyFacts(name, record), cm.metadata?.annotations?.[SIGNATURE_ANNOTATION]));
    } catch {
      ok = false; // the signing key could not be read: trust nothing
    }
    if (ok) this.#keys.set(record.agent, record);
    else {
      this.#keys.delete(record.agent);
      this.#log(`agent key record ${this.#ns}/${name} does not carry this broker's signature: ignored`);
    }
  }

  #forget(cm: k8s.V1ConfigMap): void {
    const kind = cm.metadata?.labels?.[AGENT_KEY_LABEL];
    const name = cm.metadata?.name ?? '';
    if (kind === 'enrolment') this.#enrolments.delete(name);
    else if (kind === 'key' && name.startsWith('agent-key-')) this.#keys.delete(name.slice('agent-key-'.length));
  }

  async #verifiedEnrolment(cm: k8s.V1ConfigMap): Promise<Enrolment | undefined> {
    const d = cm.data ?? {};
    const enrolment: Enrolment = { agent: d['agent'] ?? '', expiresAt: d['expiresAt'] ?? '', createdBy: d['createdBy'] ?? '' };
    const name = cm.metadata?.name ?? '';
    try {
      if (await this.#signer.verify('agent-enrolment', { name, ...enrolment }, cm.metadata?.annotations?.[SIGNATURE_ANNOTATION])) return enrolment;
    } catch {
      // the signing key could not be read: trust nothing
    }
    return undefined;
  }
}

function keyFacts(name: string, r: AgentKeyRecord): Record<string, string> {
  return { name, agent: r.agent, publicKey: r.publicKey, enrolledAt: r.enrolledAt };
}

function configMap(name: string, kind: 'key' | 'enrolment', data: Record<string, string>, signature: string): k8s.V1ConfigMap {
  return {
    metadata: {
      name,
      labels: { 'app.kubernetes.io/managed-by': 'task-broker', [AGENT_KEY_LABEL]: kind },
      annotations: { [SIGNATURE_ANNOTATION]: signature },
    },
    data,
  };
}
