/**
 * Crash points for tests, in the manner of etcd's gofail: with TASK_BROKER_FAILPOINTS=NAME[,NAME...]
 * set in the broker's environment, reaching `failpoint(NAME)` kills the process with SIGKILL, so the
 * tests can show that a crash at that exact step leaves nothing standing. Unset, it costs one lookup.
 *
 * Names: start-after-secret, -serviceaccount, -rolebinding, -activate, and start-after-started-record
 * (the `task.started` record durable, the activating patch not sent: armed, the start waits for the
 * record before patching) (src/tasks/service.ts);
 * kube-audit-before-reply (src/server/kube-audit.ts: a webhook batch's records are durable, the answer
 * not sent, so the API server retries a batch the log already holds).
 */
const armed = new Set((process.env['TASK_BROKER_FAILPOINTS'] ?? '').split(',').filter(Boolean));

export function failpoint(name: string): void {
  if (armed.size > 0 && armed.has(name)) process.kill(process.pid, 'SIGKILL');
}
