export { RealTimeClient } from "./client.js";
export type {
  ClientEvents,
  ClientState,
  ClientStats,
  ConnectedEvent,
  DisconnectedEvent,
  HistoryPage,
  Logger,
  PublishOptions,
  RateLimitEvent,
  RealTimeClientOptions,
  ReconnectedEvent,
} from "./client.js";
export { Subscription } from "./subscription.js";
export type { ChannelRecovery, GapEvent, Position, SubscribeOptions, SubscribedInfo, UpdateFilter } from "./subscription.js";
export { Update } from "./update.js";
export { CLOSE_CODES, ERROR_CODES, describeCloseCode, describeErrorCode, type CloseCodeInfo } from "./codes.js";
export { ConnectionLostError, DisconnectedError, ServerError } from "./errors.js";
export { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff.js";
export { classifyOffset, type Sequence } from "./sequence.js";
export { decodeServerMessage, encodeClientMessage } from "./envelope.js";
export { RecoveryFailure, UpdateType } from "./gen/realtime_pb.js";
export type { WebSocketConstructor, SocketLike } from "./transport.js";
