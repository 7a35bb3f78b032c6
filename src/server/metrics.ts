/** Prometheus metrics of one broker process (prom-client), served at /metrics. */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Why a request was refused before its caller was identified (label `reason`; never the path or token). */
export const AUTH_FAILURE_REASONS = ['no_credential', 'rejected', 'rate_limited', 'error'] as const;
export type AuthFailureReason = (typeof AUTH_FAILURE_REASONS)[number];

/** Which limit refused a request with 429 (label `limit`). */
export const RATE_LIMITS = ['source', 'auth_failures', 'identity', 'token_reviews'] as const;
export type RateLimitName = (typeof RATE_LIMITS)[number];

/** Why a connection was closed as soon as it was accepted (label `reason`). */
export const CONNECTION_REFUSALS = ['global', 'per_source'] as const;

export class Metrics {
  readonly registry = new Registry();
  readonly requests = new Histogram({
    name: 'broker_http_request_duration_seconds',
    help: 'Broker API requests by route, method and status',
    labelNames: ['route', 'method', 'status'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [this.registry],
  });
  readonly tasksStarted = new Counter({ name: 'broker_tasks_started_total', help: 'Tasks started', registers: [this.registry] });
  readonly credentials = new Counter({ name: 'broker_credentials_served_total', help: 'Credentials served (minted or from memory)', registers: [this.registry] });
  readonly activeTasks = new Gauge({ name: 'broker_active_tasks', help: 'Active tasks known to this replica', registers: [this.registry] });
  readonly authFailures = new Counter({
    name: 'broker_auth_failures_total',
    help: 'Requests refused before the caller was identified, by reason: no_credential, rejected (credential not accepted), rate_limited, error (the check itself failed)',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  readonly rateLimited = new Counter({
    name: 'broker_rate_limited_total',
    help: 'Requests refused with 429, by the limit that refused them: source, auth_failures, identity, token_reviews',
    labelNames: ['limit'] as const,
    registers: [this.registry],
  });
  readonly connectionsRefused = new Counter({
    name: 'broker_connections_refused_total',
    help: 'Connections closed on accept: over the global cap (global) or over the per-source cap (per_source)',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  readonly openConnections = new Gauge({ name: 'broker_open_connections', help: 'Client connections open now', registers: [this.registry] });
  readonly tokenReviews = new Counter({ name: 'broker_token_reviews_total', help: 'TokenReviews sent to the API server', registers: [this.registry] });
  readonly tokenReviewsInFlight = new Gauge({ name: 'broker_token_reviews_in_flight', help: 'TokenReviews awaiting the API server now', registers: [this.registry] });
  readonly auditLogBytes = new Gauge({ name: 'broker_audit_log_bytes', help: 'Size of the audit log file in bytes', registers: [this.registry] });
  readonly kubeAuditEvents = new Counter({
    name: 'broker_kube_audit_events_total',
    help: 'API server audit events received by the webhook (src/server/kube-audit.ts), by outcome: recorded, duplicate (auditID already recorded), other_user (not a task), stage (not ResponseComplete or Panic)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  });

  readonly proxyRequests = new Histogram({
    name: 'broker_proxy_request_duration_seconds',
    help: 'Requests through the Kubernetes API proxy (src/proxy/server.ts) by outcome: allowed, denied (by the API server), refused (by the proxy: impersonation, path escapes, SPDY, ...), unauthenticated (no valid session or task), error (upstream unreachable, timed out, 5xx); streams count once, at their end',
    labelNames: ['outcome'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 10],
    registers: [this.registry],
  });
  readonly proxyOpenStreams = new Gauge({
    name: 'broker_proxy_open_streams',
    help: 'Streams open through the proxy now: watches, logs -f, large answers, exec, attach and port-forward sessions',
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry });
    for (const outcome of ['allowed', 'denied', 'refused', 'unauthenticated', 'error']) this.proxyRequests.zero({ outcome });
    // Every label value from the start, so alerts on rate() see a zero rather than no series.
    for (const reason of AUTH_FAILURE_REASONS) this.authFailures.inc({ reason }, 0);
    for (const limit of RATE_LIMITS) this.rateLimited.inc({ limit }, 0);
    for (const reason of CONNECTION_REFUSALS) this.connectionsRefused.inc({ reason }, 0);
  }

  /**
   * `broker_sweeper_lease_age_seconds`: how long ago any replica last renewed the sweeper Lease, as
   * this replica saw it. Above the lease duration nobody ends expired tasks (docs/operations.md).
   */
  watchSweeperLease(ageSeconds: () => number): void {
    new Gauge({
      name: 'broker_sweeper_lease_age_seconds',
      help: 'Seconds since any replica last renewed the sweeper Lease (+Inf before it was first seen)',
      registers: [this.registry],
      collect() {
        this.set(ageSeconds());
      },
    });
  }

  /** The histogram's child per route, method and status: prom-client hashes a label object at every observe otherwise. */
  readonly #requestSeries = new Map<string, { observe(seconds: number): void }>();

  observeRequest(route: string, method: string, status: number, seconds: number): void {
    const key = `${method} ${status} ${route}`;
    let series = this.#requestSeries.get(key);
    if (!series) this.#requestSeries.set(key, (series = this.requests.labels({ route, method, status: String(status) })));
    series.observe(seconds);
  }
}
