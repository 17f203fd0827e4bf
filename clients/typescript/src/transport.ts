/** The part of the WebSocket API the client uses; browsers' WebSocket and Node's `ws` both fit. */
export interface SocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => SocketLike;

export const OPEN = 1;

/** The given constructor, else the platform's (browsers, Node 22+), else the `ws` package (Node 20). */
export async function resolveWebSocket(given?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (given) return given;
  const native = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (typeof native === "function") return native as WebSocketConstructor;
  const ws = await import("ws");
  return (ws.WebSocket ?? ws.default) as unknown as WebSocketConstructor;
}

export function toBytes(data: unknown): Uint8Array | null {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return null;
}
