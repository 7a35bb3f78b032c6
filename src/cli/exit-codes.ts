import type { ErrorCode } from '../errors.ts';

/**
 * Process exit codes of the `broker` command (and of `broker credential`), documented in docs/cli.md;
 * a test keeps the two in sync. `broker run` exits with its command's code once the command ran.
 */
export const EXIT = {
  ok: 0,
  error: 1,
  usage: 2,
  approval_required: 3,
  unauthenticated: 4,
  unavailable: 5,
} as const;

export type ExitName = keyof typeof EXIT;

/** Which exit code an error code maps to; anything not listed is a plain error (1). */
export function exitCodeFor(code: ErrorCode | 'approval_required'): number {
  switch (code) {
    case 'usage':
    case 'invalid_argument':
      return EXIT.usage;
    case 'approval_required':
      return EXIT.approval_required;
    case 'unauthenticated':
    case 'keychain_unavailable':
      return EXIT.unauthenticated;
    case 'broker_unreachable':
    case 'audit_unavailable':
    case 'cluster_unavailable':
    case 'identity_provider_unavailable':
    case 'rate_limited':
      return EXIT.unavailable;
    default:
      return EXIT.error;
  }
}
