// An in-process stand-in for the server's WebSocket, so the client's logic (ordering, gaps,
// rate limits, close codes) is tested without the network. Integration tests use the real server.
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  ClientMessageSchema,
  ServerMessageSchema,
  type ClientFrame,
  type ServerFrame,
} from "../../src/gen/realtime_pb.js";
import type { SocketLike } from "../../src/transport.js";

type FrameInit = Parameters<typeof create<typeof ServerMessageSchema>>[1] extends infer I
  ? I extends { frames?: (infer F)[] } ? F : never
  : never;

export class FakeServer {
  readonly sockets: FakeSocket[] = [];
  /** Every frame any client sent, in order. */
  readonly received: ClientFrame[] = [];
  /** Answers each frame; by default Connect gets a ConnectResult. */
  handler: (frame: ClientFrame, socket: FakeSocket) => void = (frame, socket) => {
    if (frame.command.case === "connect") socket.reply(frame.id, { case: "connect", value: { clientId: `c${this.sockets.length}` } });
  };

  readonly WebSocket = (() => {
    const server = this;
    return class extends FakeSocket {
      constructor(url: string) {
        super(url, server);
        server.sockets.push(this);
        queueMicrotask(() => this.open());
      }
    };
  })();

  get last(): FakeSocket {
    return this.sockets[this.sockets.length - 1]!;
  }
}

export class FakeSocket implements SocketLike {
  binaryType = "blob";
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;

  constructor(
    readonly url: string,
    private readonly server: FakeServer,
  ) {}

  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }

  send(data: Uint8Array): void {
    for (const frame of fromBinary(ClientMessageSchema, data).frames) {
      this.server.received.push(frame);
      this.server.handler(frame, this);
    }
  }

  close(code = 1000, reason = ""): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  /** Sends one ServerMessage holding `frames` (and `subId` in the envelope, when given). */
  push(frames: FrameInit[], subId = 0): void {
    this.pushBytes(toBinary(ServerMessageSchema, create(ServerMessageSchema, { frames, subId } as never)));
  }

  pushBytes(bytes: Uint8Array): void {
    const copy = bytes.slice().buffer;
    this.onmessage?.({ data: copy });
  }

  reply(id: number, result: unknown): void {
    this.push([{ kind: { case: "reply", value: { id, result } } } as FrameInit]);
  }

  /** The server's way out: Disconnect, then the close frame with the same code. */
  disconnect(code: number, reason: string, reconnect: boolean): void {
    this.push([{ kind: { case: "disconnect", value: { code, reason, reconnect } } } as FrameInit]);
    this.close(code, reason);
  }
}

export function update(offset: number, extra: Record<string, unknown> = {}): FrameInit {
  return { kind: { case: "update", value: { offset: BigInt(offset), type: 1, key: `k${offset}`, payload: new TextEncoder().encode(`u${offset}`), ...extra } } } as FrameInit;
}

export type { ServerFrame };
