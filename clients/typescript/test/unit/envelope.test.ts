import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { decodeServerMessage, encodeClientMessage } from "../../src/envelope.js";
import { ClientFrameSchema, ClientMessageSchema, ServerMessageSchema } from "../../src/gen/realtime_pb.js";

// A ServerMessage of three ROUTE updates (offsets 1–3, keys leg-1…leg-3, no sub_id),
// compressed with the zstd command-line tool (`zstd -q -c --no-check`).
const ZSTD_BATCH = "KLUv/QBY/QEAdAIKOxI5EAEYASIFbGVnLTE6LHsiZXRhIjoxMDB9CjsSORACMjIDMzMKAMACgAc0AyTgAmABwAPNgEBAPJY8";

test("a zstd envelope is inflated and its updates get the envelope's sub_id", () => {
  const inner = Uint8Array.from(Buffer.from(ZSTD_BATCH, "base64"));
  const outer = toBinary(ServerMessageSchema, create(ServerMessageSchema, { zstd: inner, subId: 9 }));
  const decoded = decodeServerMessage(outer);
  assert.equal(decoded.compressed, true);
  const updates = decoded.frames.map((frame) => (frame.kind.case === "update" ? frame.kind.value : null));
  assert.deepEqual(updates.map((u) => [u?.subId, Number(u?.offset), u?.key]), [[9, 1, "leg-1"], [9, 2, "leg-2"], [9, 3, "leg-3"]]);
  assert.equal(new TextDecoder().decode(updates[0]!.payload), '{"eta":100}'.repeat(4));
});

test("a plain envelope keeps an update's own sub_id and fills in missing ones", () => {
  const bytes = toBinary(ServerMessageSchema, create(ServerMessageSchema, {
    subId: 4,
    frames: [
      { kind: { case: "update", value: { subId: 2, offset: 1n } } },
      { kind: { case: "update", value: { offset: 2n } } },
      { kind: { case: "pong", value: { timestampUs: 5n } } },
    ],
  }));
  const decoded = decodeServerMessage(bytes);
  assert.equal(decoded.compressed, false);
  const subIds = decoded.frames.flatMap((frame) => (frame.kind.case === "update" ? [frame.kind.value.subId] : []));
  assert.deepEqual(subIds, [2, 4]);
  assert.equal(decoded.frames[2]!.kind.case, "pong");
});

test("client frames travel as one ClientMessage batch", () => {
  const frames = [
    create(ClientFrameSchema, { id: 1, command: { case: "ping", value: { timestampUs: 1n } } }),
    create(ClientFrameSchema, { id: 2, command: { case: "subscribe", value: { channel: "route:42" } } }),
  ];
  const decoded = fromBinary(ClientMessageSchema, encodeClientMessage(frames));
  assert.deepEqual(decoded.frames.map((f) => [f.id, f.command.case]), [[1, "ping"], [2, "subscribe"]]);
});

test("garbage is an error, not a crash later", () => {
  assert.throws(() => decodeServerMessage(Uint8Array.of(0xff, 0xff, 0xff)));
  const badZstd = toBinary(ServerMessageSchema, create(ServerMessageSchema, { zstd: Uint8Array.of(1, 2, 3, 4, 5) }));
  assert.throws(() => decodeServerMessage(badZstd));
});
