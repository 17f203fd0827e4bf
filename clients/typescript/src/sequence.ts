export type Sequence = "next" | "duplicate" | "gap";

/**
 * Where `offset` stands after `last` (a channel's offsets are consecutive within an epoch),
 * given that the server `skipped` that many lower-priority updates before it for a slow
 * connection: those are not a gap.
 */
export function classifyOffset(last: number, offset: number, skipped: number): Sequence {
  if (offset <= last) return "duplicate";
  if (offset === last + 1 + skipped) return "next";
  return "gap";
}
