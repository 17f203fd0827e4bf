import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { decompress } from "fzstd";
import {
  ClientMessageSchema,
  ServerMessageSchema,
  type ClientFrame,
  type ServerFrame,
} from "./gen/realtime_pb.js";

/** One WebSocket binary message holds one `ClientMessage`: a batch of frames. */
export function encodeClientMessage(frames: ClientFrame[]): Uint8Array {
  return toBinary(ClientMessageSchema, create(ClientMessageSchema, { frames }));
}

export interface DecodedServerMessage {
  frames: ServerFrame[];
  /** The message came zstd-compressed. */
  compressed: boolean;
}

/**
 * Decodes one `ServerMessage`: inflates `zstd` when set, and gives every `Update` without a
 * `sub_id` the envelope's (the server encodes a channel's batch once for all subscribers and
 * names each subscription in the envelope).
 */
export function decodeServerMessage(data: Uint8Array): DecodedServerMessage {
  const outer = fromBinary(ServerMessageSchema, data);
  let frames = outer.frames;
  let subId = outer.subId;
  const compressed = outer.zstd.length > 0;
  if (compressed) {
    // This client names no dictionaries in Connect, so the server never uses one for it.
    const inner = fromBinary(ServerMessageSchema, decompress(outer.zstd));
    frames = inner.frames;
    subId = subId || inner.subId;
  }
  if (subId !== 0) {
    for (const frame of frames) {
      if (frame.kind.case === "update" && frame.kind.value.subId === 0) frame.kind.value.subId = subId;
    }
  }
  return { frames, compressed };
}
