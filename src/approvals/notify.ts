/**
 * Tells people a request waits for them: a JSON POST to the policy's `notifyWebhook` with a `text`
 * field that chat tools display. `text` is made only of what the policy and the broker chose (agent and
 * template names, DNS-label task names and namespaces, numbers, the request id), escaped for chat
 * markup all the same; the agent's free text (its reason) travels only in the separate `reason` field,
 * so no link, mention or formatting of the agent's reaches an approver as the broker's own words. Retried with exponential backoff; it runs in the background, so its
 * failure never blocks or loses the request (which is already stored in the cluster).
 */
import { request } from 'undici';
import type { ApprovalRequest } from './model.ts';

export interface NotifierOptions {
  attempts?: number;
  firstDelayMs?: number;
  log?: (line: string) => void;
}

export class Notifier {
  readonly #url: string;
  readonly #attempts: number;
  readonly #firstDelayMs: number;
  readonly #log: (line: string) => void;
  readonly #pending = new Set<Promise<void>>();

  constructor(url: string, options: NotifierOptions = {}) {
    this.#url = url;
    this.#attempts = options.attempts ?? 5;
    this.#firstDelayMs = options.firstDelayMs ?? 1000;
    this.#log = options.log ?? ((line) => process.stderr.write(line + '\n'));
  }

  notify(req: ApprovalRequest): void {
    const body = JSON.stringify({
      text: chatText(
        `task-broker: agent ${req.requester.agent} asks for template "${req.template}" in namespace ${req.namespace} for ${Math.round(req.ttl / 60)} min. ` +
          `${req.required} approval(s) needed: broker approve ${req.id}${req.reason ? ' (the agent\'s reason: broker approvals list)' : ''}`,
      ),
      requestId: req.id,
      requester: req.requester.subject,
      agent: req.requester.agent,
      template: req.template,
      namespace: req.namespace,
      task: req.name,
      ttlSeconds: req.ttl,
      reason: req.reason ?? null,
      required: req.required,
      approvers: req.approvers,
      expiresAt: req.expiresAt,
    });
    const p = this.#send(body, req.id).finally(() => this.#pending.delete(p));
    this.#pending.add(p);
  }

  /** Waits for deliveries in flight (for shutdown and tests). */
  async drain(): Promise<void> {
    await Promise.all([...this.#pending]);
  }

  async #send(body: string, id: string): Promise<void> {
    let delay = this.#firstDelayMs;
    for (let attempt = 1; attempt <= this.#attempts; attempt++) {
      try {
        const res = await request(this.#url, { method: 'POST', headers: { 'content-type': 'application/json' }, body, headersTimeout: 5000, bodyTimeout: 5000 });
        await res.body.dump();
        if (res.statusCode < 300) return;
        if (res.statusCode < 500 && res.statusCode !== 429) {
          this.#log(`broker: approval notification for ${id} refused with ${res.statusCode}; not retried`);
          return;
        }
      } catch {
        // network failure: retried below
      }
      if (attempt < this.#attempts) {
        await new Promise((done) => setTimeout(done, delay).unref());
        delay *= 2;
      }
    }
    this.#log(`broker: approval notification for ${id} failed after ${this.#attempts} attempts`);
  }
}

/** Escapes what chat markup (Slack mrkdwn and its kin) turns into links and mentions: `&`, `<`, `>`. */
export function chatText(text: string): string {
  return text.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;');
}
