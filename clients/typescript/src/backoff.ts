export interface BackoffOptions {
  /** First wait, ms. Default 1000. */
  initial: number;
  /** Longest wait, ms. Default 30000. */
  max: number;
  /** Growth per attempt. Default 2. */
  factor: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { initial: 1000, max: 30_000, factor: 2 };

/**
 * The wait before retry `attempt` (0-based): `initial * factor^attempt`, capped at `max`, then
 * a random 50–100 % of that (`jitter` in 0..1), so a fleet of clients does not return in lockstep.
 */
export function backoffDelay(backoff: BackoffOptions, attempt: number, jitter = Math.random()): number {
  const exponential = backoff.initial * Math.pow(backoff.factor, Math.min(attempt, 64));
  const capped = Math.min(exponential, backoff.max);
  const clamped = Math.min(Math.max(jitter, 0), 1);
  return capped * (0.5 + 0.5 * clamped);
}
