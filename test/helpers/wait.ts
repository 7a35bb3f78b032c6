/** Polling for what tests wait on. */
import { setTimeout as sleep } from 'node:timers/promises';

/** Calls `probe` every `intervalMs` until it returns a value (not undefined or false); fails after `timeoutMs`, naming `what`. */
export async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined | false> | T | undefined | false, intervalMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}
