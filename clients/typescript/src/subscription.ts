import { Emitter } from "./emitter.js";
import type { UpdateType } from "./gen/realtime_pb.js";
import type { Update } from "./update.js";

/** Which updates a subscription passes on; applied in the client, the server sends them all. */
export type UpdateFilter =
  | ((update: Update) => boolean)
  | {
      types?: UpdateType[];
      keys?: string[];
      minConfidence?: number;
    };

export interface SubscribeOptions {
  /** Client-side filter: updates it rejects are still counted (offsets, recovery) but not emitted. */
  filter?: UpdateFilter;
  /** Acknowledged delivery: the server resends what `client.acknowledge` has not confirmed. */
  ack?: boolean;
  /** Start from this position (a saved `subscription.position`): every later update is recovered. */
  since?: Position;
}

export interface Position {
  epoch: string;
  offset: number;
}

/** What became of one channel after a reconnect (or a gap): whether every missed update arrives. */
export interface ChannelRecovery {
  channel: string;
  /** Every missed update was (or is being) delivered, in order. */
  recovered: boolean;
  /**
   * Why not: the server's `RecoveryFailure` name (`EPOCH_CHANGED`, `GAP_TOO_OLD`,
   * `WINDOW_EXCEEDED`, `TOO_MANY`, `OFFSET_AHEAD`), `NOT_ATTEMPTED` when the client did not ask
   * (messageRecovery off, or away longer than recoveryWindow), or `NONE`.
   */
  failure: string;
  /** Missed updates fetched with `History` after the server refused recovery (syncOnReconnect). */
  synced: number;
  epoch: string;
  /** The channel's offset when it was resubscribed. */
  offset: number;
}

export interface SubscribedInfo {
  channel: string;
  epoch: string;
  /** Updates start after this offset (unless `since` recovered earlier ones). */
  offset: number;
  recovery?: ChannelRecovery;
}

/** Updates that were lost for good: neither recovery nor history had them. */
export interface GapEvent {
  channel: string;
  /** First and last missing offsets. */
  from: number;
  to: number;
}

export interface SubscriptionEvents {
  update: Update;
  subscribed: SubscribedInfo;
  recovered: ChannelRecovery;
  gap: GapEvent;
  error: Error;
}

export function passes(filter: UpdateFilter | undefined, update: Update): boolean {
  if (!filter) return true;
  if (typeof filter === "function") return filter(update);
  if (filter.types && !filter.types.includes(update.type)) return false;
  if (filter.keys && !filter.keys.includes(update.key)) return false;
  if (filter.minConfidence !== undefined && update.confidence < filter.minConfidence) return false;
  return true;
}

/**
 * A channel subscription (`client.subscribe("route:42")`), or a view over every subscribed
 * channel's updates of some types (`client.subscribe([UpdateType.INCIDENT])`).
 */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** Resolves when the server confirmed the subscription; rejects if it refused it. */
  readonly ready: Promise<SubscribedInfo>;
  private settle!: { resolve: (info: SubscribedInfo) => void; reject: (err: Error) => void };
  private settled = false;
  private closed = false;

  constructor(
    /** The channel, or null for a type subscription. */
    readonly channel: string | null,
    /** The types a type subscription passes on. */
    readonly types: readonly UpdateType[] | null,
    readonly options: SubscribeOptions,
    private readonly release: (subscription: Subscription) => void,
    private readonly locate: () => Position | null,
  ) {
    super();
    this.ready = new Promise((resolve, reject) => (this.settle = { resolve, reject }));
    // A refusal is also emitted as `error`; an unawaited `ready` must not crash Node.
    this.ready.catch(() => {});
  }

  /** The last update's epoch and offset, to save and pass as `since` later. */
  get position(): Position | null {
    return this.locate();
  }

  get active(): boolean {
    return !this.closed;
  }

  unsubscribe(): void {
    if (this.closed) return;
    this.closed = true;
    this.release(this);
  }

  /** @internal */
  deliver(update: Update): void {
    if (this.closed) return;
    if (this.types && !this.types.includes(update.type)) return;
    if (!passes(this.options.filter, update)) return;
    this.emit("update", update);
  }

  /** @internal */
  confirmed(info: SubscribedInfo): void {
    if (!this.settled) {
      this.settled = true;
      this.settle.resolve(info);
    }
    this.emit("subscribed", info);
  }

  /** @internal */
  recovered(recovery: ChannelRecovery): void {
    this.emit("recovered", recovery);
  }

  /** @internal */
  lost(gap: GapEvent): void {
    this.emit("gap", gap);
  }

  /** @internal */
  failed(err: Error): void {
    this.closed = true;
    if (!this.settled) {
      this.settled = true;
      this.settle.reject(err);
    }
    if (this.listenerCount("error") > 0) this.emit("error", err);
  }
}
