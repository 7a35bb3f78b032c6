/**
 * The one error family of task-broker. Every failure a user can see carries a stable `code`; the
 * list below is the whole set, and docs/errors.md documents each (test/unit/errors-doc.test.ts keeps
 * the two in sync in both directions).
 */
export const ERROR_CODES = {
  usage: 'The command line was not understood: an unknown command, flag or missing argument.',
  invalid_argument: 'A value given on the command line or in a request is not valid; `field` names it.',
  cluster_binaries_missing:
    'The local control plane (test/cluster) has not been built: run ./install.sh with Go installed.',
  cluster_start_failed: 'The local kube-apiserver did not become ready; the message quotes its log.',
  cluster_not_found: 'No local control plane state was found in the given directory.',
  cluster_dir_not_empty: 'dev-cluster up was given a directory that exists and is not empty.',
  internal: 'An unexpected failure inside task-broker. The message is generic; details go to the log.',
} as const satisfies Record<string, string>;

export type ErrorCode = keyof typeof ERROR_CODES;

export interface BrokerErrorOptions {
  /** The input field (flag, JSON path, policy path) the error is about. */
  field?: string;
  cause?: unknown;
}

export class BrokerError extends Error {
  override name = 'BrokerError';
  readonly code: ErrorCode;
  readonly field: string | undefined;

  constructor(code: ErrorCode, message: string, options: BrokerErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.field = options.field;
  }
}

export function isBrokerError(err: unknown): err is BrokerError {
  return err instanceof BrokerError;
}
