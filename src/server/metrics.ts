/** Prometheus metrics of one broker process (prom-client), served at /metrics. */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

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

  constructor() {
    collectDefaultMetrics({ register: this.registry });
  }

  observeRequest(route: string, method: string, status: number, seconds: number): void {
    this.requests.observe({ route, method, status: String(status) }, seconds);
  }
}
