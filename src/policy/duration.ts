/**
 * Durations in the policy file: strings of hours, minutes and seconds in that order, each part
 * optional but at least one present ("600s", "10m", "1h", "1h30m", "2h0m30s"). Bare numbers are
 * refused: "600" could mean seconds or minutes, and YAML would hand it over as a number anyway.
 */
import { BrokerError } from '../errors.ts';

/** The same grammar as parseDuration, as a JSON-schema `pattern` (the schema checks the form, parseDuration the value). */
export const DURATION_PATTERN = '^(?=[0-9])(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+s)?$';

const DURATION_RE = /^(?=\d)(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/;

/** Why `value` is not a usable duration, or undefined when it is one. */
export function durationProblem(value: unknown): string | undefined {
  if (typeof value === 'number') {
    return `bare numbers are not durations: write "${value}s" or "${value}m"`;
  }
  if (typeof value !== 'string') return `a duration must be a string like "10m", "1h" or "1h30m"`;
  const m = DURATION_RE.exec(value.trim());
  if (!m) return `${JSON.stringify(value)} is not a duration like "10m", "1h" or "1h30m" (units h, m, s, in that order)`;
  const seconds = Number(m[1] ?? 0) * 3600 + Number(m[2] ?? 0) * 60 + Number(m[3] ?? 0);
  if (!Number.isSafeInteger(seconds)) return `${JSON.stringify(value)} is too long`;
  if (seconds <= 0) return `a duration must be greater than zero, got ${JSON.stringify(value)}`;
  return undefined;
}

/**
 * "600s", "10m", "1h", "1h30m" → whole seconds. Throws BrokerError 'invalid_argument' for anything
 * else: bare numbers, unknown units, wrong order ("30m1h"), zero, or an empty string.
 */
export function parseDuration(text: string): number {
  const problem = durationProblem(text);
  if (problem !== undefined) throw new BrokerError('invalid_argument', problem);
  const m = DURATION_RE.exec(text.trim())!;
  return Number(m[1] ?? 0) * 3600 + Number(m[2] ?? 0) * 60 + Number(m[3] ?? 0);
}

/** Seconds → the shortest duration string parseDuration reads back ("1h30m", "45s", "0s"). */
export function formatDuration(seconds: number): string {
  if (seconds <= 0) return '0s';
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return `${h ? `${h}h` : ''}${m ? `${m}m` : ''}${s ? `${s}s` : ''}`;
}
