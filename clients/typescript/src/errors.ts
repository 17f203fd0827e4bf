import { describeCloseCode, describeErrorCode } from "./codes.js";

/** An `Error` reply from the server (the connection stays open). */
export class ServerError extends Error {
  override readonly name = "ServerError";
  constructor(
    readonly code: number,
    readonly serverMessage: string,
    readonly retryAfterMs = 0,
    readonly command = "",
  ) {
    super(`${command ? command + ": " : ""}${code} ${describeErrorCode(code)}${serverMessage ? ` (${serverMessage})` : ""}`);
  }
}

/** The server closed the connection with a code that says not to reconnect, or the client gave up. */
export class DisconnectedError extends Error {
  override readonly name = "DisconnectedError";
  constructor(
    readonly code: number,
    readonly reason: string,
  ) {
    super(`disconnected: ${code} ${describeCloseCode(code).meaning}${reason ? ` (${reason})` : ""}`);
  }
}

/** A request could not be completed because the connection went away (or the client was closed). */
export class ConnectionLostError extends Error {
  override readonly name = "ConnectionLostError";
}
