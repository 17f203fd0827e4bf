import { UpdateType, type Publication, type Update as WireUpdate } from "./gen/realtime_pb.js";

const decoder = new TextDecoder();

/** One publication on a channel, as the application sees it. */
export class Update {
  constructor(
    readonly channel: string,
    /** The channel's epoch this offset belongs to. */
    readonly epoch: string,
    /** Position in the channel: 1, 2, 3, … within an epoch. */
    readonly offset: number,
    readonly type: UpdateType,
    readonly key: string,
    readonly confidence: number,
    /** When the server accepted the publication, microseconds since the Unix epoch. */
    readonly timestampUs: bigint,
    readonly payload: Uint8Array,
    /** Lower-priority updates before this one the server did not send a slow connection. */
    readonly skipped: number,
    /** Delivered from `History` to fill a gap, not live. */
    readonly fromHistory: boolean,
  ) {}

  static fromWire(channel: string, epoch: string, update: WireUpdate): Update {
    return new Update(channel, epoch, Number(update.offset), update.type, update.key, update.confidence, update.timestampUs, update.payload, update.skipped, false);
  }

  static fromPublication(channel: string, epoch: string, publication: Publication): Update {
    return new Update(channel, epoch, Number(publication.offset), publication.type, publication.key, publication.confidence, publication.timestampUs, publication.payload, 0, true);
  }

  /** The type's name: "ROUTE", "WEATHER", … */
  get typeName(): string {
    return UpdateType[this.type] ?? String(this.type);
  }

  get timestamp(): Date {
    return new Date(Number(this.timestampUs / 1000n));
  }

  text(): string {
    return decoder.decode(this.payload);
  }

  json<T = unknown>(): T {
    return JSON.parse(this.text()) as T;
  }
}
