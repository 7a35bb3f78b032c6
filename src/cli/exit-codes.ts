import type { ErrorCode } from '../errors.ts';

/** Process exit codes of the `broker` command, documented in docs/cli.md (a test keeps them in sync). */
export const EXIT = {
  ok: 0,
  error: 1,
  usage: 2,
} as const;

export type ExitName = keyof typeof EXIT;

/** Which exit code an error code maps to; anything not listed is a plain error (1). */
export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'usage':
    case 'invalid_argument':
      return EXIT.usage;
    default:
      return EXIT.error;
  }
}
