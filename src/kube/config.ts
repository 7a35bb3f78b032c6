/**
 * The broker's connection to the API server. One KubeConfig, one connection pool.
 */
import * as k8s from '@kubernetes/client-node';
import type { RequestContext } from '@kubernetes/client-node';
import { BrokerError } from '../errors.ts';

/**
 * client-node 2.x builds a new undici Agent (so a new TLS connection) for every request; this keeps
 * the first one and reuses it, so calls share keep-alive connections. The cluster and its CA are
 * fixed for the life of the process.
 */
export class PooledKubeConfig extends k8s.KubeConfig {
  #dispatcher: ReturnType<RequestContext['getDispatcher']>;

  override async applySecurityAuthentication(context: RequestContext): Promise<void> {
    await super.applySecurityAuthentication(context);
    const fresh = context.getDispatcher();
    if (fresh === undefined) return;
    this.#dispatcher ??= fresh;
    context.setDispatcher(this.#dispatcher);
  }
}

/** From a kubeconfig file, or in-cluster (the pod's ServiceAccount) when no file is given. */
export function loadKubeConfig(path?: string): PooledKubeConfig {
  const kc = new PooledKubeConfig();
  try {
    if (path) kc.loadFromFile(path);
    else kc.loadFromCluster();
  } catch (err) {
    throw new BrokerError('invalid_argument', `could not load the kubeconfig${path ? ` ${path}` : ' (in-cluster)'}: ${(err as Error).message}`, {
      field: '--kubeconfig',
      cause: err,
    });
  }
  if (!kc.getCurrentCluster()) {
    throw new BrokerError('invalid_argument', `the kubeconfig${path ? ` ${path}` : ''} has no current cluster`, { field: '--kubeconfig' });
  }
  return kc;
}

export interface KubeApis {
  config: k8s.KubeConfig;
  core: k8s.CoreV1Api;
  rbac: k8s.RbacAuthorizationV1Api;
  authn: k8s.AuthenticationV1Api;
  coordination: k8s.CoordinationV1Api;
}

export function kubeApis(config: k8s.KubeConfig): KubeApis {
  return {
    config,
    core: config.makeApiClient(k8s.CoreV1Api),
    rbac: config.makeApiClient(k8s.RbacAuthorizationV1Api),
    authn: config.makeApiClient(k8s.AuthenticationV1Api),
    coordination: config.makeApiClient(k8s.CoordinationV1Api),
  };
}

/** The HTTP status of a failed API call, or undefined when it never got an answer. */
export function apiStatus(err: unknown): number | undefined {
  return err instanceof k8s.ApiException ? err.code : undefined;
}

export function isNotFound(err: unknown): boolean {
  return apiStatus(err) === 404;
}

export function isConflict(err: unknown): boolean {
  return apiStatus(err) === 409;
}

/**
 * The one place where a failed Kubernetes call becomes a BrokerError. The API server's message is
 * kept in `cause` (for the broker's log), never in the message a caller sees.
 */
export function clusterError(doing: string, err: unknown): BrokerError {
  if (err instanceof BrokerError) return err;
  const status = apiStatus(err);
  return new BrokerError('cluster_unavailable', `${doing} failed${status ? ` (API server answered ${status})` : ' (API server unreachable)'}`, {
    cause: err,
  });
}
