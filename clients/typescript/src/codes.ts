// The server's close codes and error codes (docs/protocol.md, "Close codes" and "Error codes"), so every
// `Disconnect` and `Error` reaches the application with its meaning.

export interface CloseCodeInfo {
  /** Short name, as the server's metrics label it. */
  name: string;
  /** Whether reconnecting (with backoff) may succeed. */
  reconnect: boolean;
  meaning: string;
}

export const CLOSE_CODES: Readonly<Record<number, CloseCodeInfo>> = {
  1000: { name: "normal", reconnect: true, meaning: "normal closure" },
  1002: { name: "protocol_error", reconnect: false, meaning: "WebSocket protocol violation" },
  1003: { name: "text_message", reconnect: false, meaning: "a text message was sent; the protocol is binary protobuf" },
  1006: { name: "abnormal", reconnect: true, meaning: "the connection was lost without a close frame (network or server failure)" },
  1007: { name: "invalid_utf8", reconnect: false, meaning: "text that is not UTF-8: a text message, or the reason of a close frame" },
  1009: { name: "message_too_big", reconnect: false, meaning: "a message over the server's max_message_size" },
  1011: { name: "internal_error", reconnect: true, meaning: "internal server error" },
  4000: { name: "shutdown", reconnect: true, meaning: "the server is shutting down: reconnect, to another node" },
  4001: { name: "slow_consumer", reconnect: true, meaning: "slow consumer: more than the server's outbox limit waited to be sent" },
  4003: { name: "resubscribe", reconnect: true, meaning: "the history of a subscribed channel changed under the server: reconnect and recover" },
  4004: { name: "connect_timeout", reconnect: true, meaning: "no Connect within the server's connect timeout" },
  4005: { name: "heartbeat_timeout", reconnect: true, meaning: "heartbeat timeout: the server heard nothing from this client" },
  4006: { name: "token_expired", reconnect: true, meaning: "the token expired and was not refreshed: reconnect with a fresh token" },
  4500: { name: "bad_message", reconnect: false, meaning: "a message that is not a valid ClientMessage" },
  4501: { name: "bad_lifecycle", reconnect: false, meaning: "the first command was not Connect" },
  4502: { name: "too_many_frames", reconnect: false, meaning: "more frames in one message than the server allows" },
  4503: { name: "unauthorized", reconnect: false, meaning: "the token was refused" },
  4504: { name: "rate_limit_abuse", reconnect: false, meaning: "requests kept coming after too many 429s in a row" },
};

/** What a close code means; unknown codes follow the protocol's ranges (4000–4499 retry, 4500–4999 do not). */
export function describeCloseCode(code: number): CloseCodeInfo {
  const known = CLOSE_CODES[code];
  if (known) return known;
  if (code >= 4000 && code < 4500) return { name: "unknown", reconnect: true, meaning: `close code ${code}: reconnect with backoff may succeed` };
  if (code >= 4500 && code < 5000) return { name: "unknown", reconnect: false, meaning: `close code ${code}: do not reconnect without changing something` };
  return { name: "unknown", reconnect: true, meaning: `close code ${code}` };
}

export const ERROR_CODES: Readonly<Record<number, string>> = {
  400: "malformed command",
  401: "token refused",
  403: "the token does not allow this channel, or a refresh named another subject",
  404: "no such subscription on this connection",
  409: "the channel is already subscribed on this connection",
  413: "a limit: payload too large, or too many subscriptions",
  429: "rate limited: wait retry_after_ms, then retry",
  450: "unknown command",
  500: "internal error; the command may be retried",
  501: "not implemented by this server version",
  503: "overloaded or the broker is unavailable; retry later",
};

export function describeErrorCode(code: number): string {
  return ERROR_CODES[code] ?? `error ${code}`;
}
