/**
 * Revocation: from the broker's reply to `DELETE /v1/tasks/{id}` to the first refusal of the old token
 * by the real API server. Each trial starts a task, gets its credential, checks that a request with it
 * succeeds (GET /api/v1/namespaces/team-a/pods over HTTPS with the cluster CA, one kept-alive
 * connection), ends the task, then repeats that request back to back until it is refused (403: the
 * RoleBinding is gone; or 401). For the first few trials it goes on until the token is refused outright
 * (401: the bound Secret is gone and the API server's authentication cache, up to ~10 s, has lapsed).
 *
 * Goal: <= 1 s in every trial.
 *
 *   bin/bench revocation [--trials 20] [--outright 3]
 */
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { DEFAULT_TIMINGS, median, met, ms, table, withEnv } from './_common.ts';

const { values: flags } = parseArgs({
  options: { trials: { type: 'string', default: '20' }, outright: { type: 'string', default: '3' } },
});
const TRIALS = Number(flags.trials);
const OUTRIGHT = Number(flags.outright);
const FORBIDDEN_LIMIT_MS = 10_000;
const OUTRIGHT_LIMIT_MS = 20_000;

interface Trial {
  forbiddenMs: number;
  status: number;
  allowedAfterReply: number;
  outrightMs?: number;
}

await withEnv(async (env) => {
  const broker = await env.startBroker({ extraArgs: DEFAULT_TIMINGS });
  const agentToken = await env.agentToken('alpha');
  const dispatcher = new Agent({ connect: { ca: readFileSync(env.cluster.caFile) }, connections: 1 });
  const podsUrl = `${env.cluster.server}/api/v1/namespaces/team-a/pods`;
  const probe = async (token: string): Promise<number> => {
    const res = await request(podsUrl, { dispatcher, headers: { authorization: `Bearer ${token}` } });
    await res.body.dump();
    return res.statusCode;
  };

  const trials: Trial[] = [];
  try {
    for (let i = 0; i < TRIALS; i++) {
      const start = await broker.request('POST', '/v1/tasks', agentToken, { template: 'read-pods', namespace: 'team-a', name: `rev-${i}` });
      if (start.status !== 201) throw new Error(`trial ${i}: task start ${start.status} ${JSON.stringify(start.body)}`);
      const cred = await broker.request('POST', `/v1/tasks/${start.body.id}/credential`, agentToken);
      if (cred.status !== 200) throw new Error(`trial ${i}: credential ${cred.status} ${JSON.stringify(cred.body)}`);
      const token: string = cred.body.token;
      const before = await probe(token);
      if (before !== 200) throw new Error(`trial ${i}: the task token was refused (${before}) before the task ended`);

      const end = await broker.request('DELETE', `/v1/tasks/${start.body.id}`, agentToken);
      const replied = performance.now();
      if (end.status !== 200) throw new Error(`trial ${i}: task end ${end.status} ${JSON.stringify(end.body)}`);
      let status = 200;
      let allowedAfterReply = 0;
      while (status === 200 && performance.now() - replied < FORBIDDEN_LIMIT_MS) {
        status = await probe(token);
        if (status === 200) allowedAfterReply++;
      }
      const trial: Trial = { forbiddenMs: performance.now() - replied, status, allowedAfterReply };
      if (status !== 403 && status !== 401) throw new Error(`trial ${i}: still ${status} ${FORBIDDEN_LIMIT_MS} ms after the task ended`);
      if (i < OUTRIGHT) {
        while (status !== 401 && performance.now() - replied < OUTRIGHT_LIMIT_MS) {
          await sleep(50);
          status = await probe(token);
        }
        if (status === 401) trial.outrightMs = performance.now() - replied;
      }
      trials.push(trial);
    }
  } finally {
    await dispatcher.close();
  }
  await broker.stop();

  const times = trials.map((t) => t.forbiddenMs);
  const worst = Math.max(...times);
  console.log(`revocation: DELETE /v1/tasks/{id} reply -> first refused request with the old token (real kube-apiserver), ${TRIALS} trials`);
  console.log(
    table(
      ['trial', 'to first refusal', 'status', 'requests still allowed after the reply', 'to 401 (token refused outright)'],
      trials.map((t, i) => [i + 1, ms(t.forbiddenMs, 2), t.status, t.allowedAfterReply, t.outrightMs === undefined ? (i < OUTRIGHT ? 'not within 20 s' : '-') : ms(t.outrightMs, 0)]),
    ),
  );
  const outright = trials.flatMap((t) => (t.outrightMs === undefined ? [] : [t.outrightMs]));
  console.log('');
  console.log(
    table(
      ['goal', 'figure', 'result'],
      [
        ['first refusal <= 1 s in every trial', `max ${ms(worst, 2)}, p50 ${ms(median(times), 2)}`, met(worst <= 1000 && trials.length === TRIALS)],
        ['(info) requests allowed after the reply, all trials', String(trials.reduce((a, t) => a + t.allowedAfterReply, 0)), ''],
        ['(info) token refused outright (401)', outright.length ? `max ${ms(Math.max(...outright), 0)} over ${outright.length} trials (API server auth cache <= 10 s)` : '-', ''],
      ],
    ),
  );
});
