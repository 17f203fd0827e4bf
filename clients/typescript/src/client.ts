import { create } from "@bufbuild/protobuf";
import { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff.js";
import { describeCloseCode } from "./codes.js";
import { decodeServerMessage, encodeClientMessage } from "./envelope.js";
import { Emitter } from "./emitter.js";
import { ConnectionLostError, DisconnectedError, ServerError } from "./errors.js";
import {
  ClientFrameSchema,
  RecoveryFailure,
  UpdateType,
  type ClientFrame,
  type ConnectResult,
  type HistoryResult,
  type Reply,
  type ServerFrame,
  type SubscribeResult,
  type Update as WireUpdate,
} from "./gen/realtime_pb.js";
import { classifyOffset } from "./sequence.js";
import {
  Subscription,
  type ChannelRecovery,
  type Position,
  type SubscribeOptions,
} from "./subscription.js";
import { OPEN, resolveWebSocket, toBytes, type SocketLike, type WebSocketConstructor } from "./transport.js";
import { Update } from "./update.js";

export interface Logger {
  debug(...args: unknown[]): void;
  info(...args: unknown[]): void;
  warn(...args: unknown[]): void;
  error(...args: unknown[]): void;
}

export interface RealTimeClientOptions {
  /** The server's WebSocket endpoint, e.g. `wss://realtime.example.com/ws`. */
  url: string;
  /** A fixed token. Prefer `getToken`: it allows refreshing and reconnecting after expiry. */
  token?: string;
  /** Fetches a fresh token: before every connect, and to refresh in-band before expiry. */
  getToken?: () => string | Promise<string>;
  /** Reconnect after a connection is lost (not after a code that says not to). Default true. */
  autoReconnect?: boolean;
  /** Failed connection attempts in a row before giving up. Default Infinity. */
  maxRetries?: number;
  /** Reconnect waits, ms, with 50–100 % jitter. Default 1000, ×2, at most 30000. */
  backoff?: Partial<BackoffOptions>;
  /** After this long without hearing from the server the client sends a Ping, ms. Default 15000. */
  heartbeatInterval?: number;
  /** A Ping unanswered (nothing heard) this long means the connection is dead, ms. Default 10000. */
  heartbeatTimeout?: number;
  /** Refresh the token in-band before it expires (needs `getToken`). Default true. */
  autoRefresh?: boolean;
  /** Refresh this long before expiry, ms (or at half the remaining life if that is later). Default 300000. */
  refreshThreshold?: number;
  /** Resubscribe from the last offset seen after a reconnect, so missed updates arrive. Default true. */
  messageRecovery?: boolean;
  /** Away longer than this (ms), the client does not ask for recovery (the server's window is 5 min by default). Default 300000. */
  recoveryWindow?: number;
  /** While disconnected, keep `publish` and `history` calls and send them on reconnect. Default true. */
  offlineSupport?: boolean;
  /** Most calls kept while disconnected; beyond it they fail at once. Default 1000. */
  offlineQueueLimit?: number;
  /** When the server refuses recovery but its history still holds the missed updates (TOO_MANY, WINDOW_EXCEEDED), and on a gap, fetch them with `History`. Default true. */
  syncOnReconnect?: boolean;
  /** Times a request refused with 429 is sent again after `retry_after_ms`. Default 3. */
  rateLimitRetries?: number;
  /** A request without a reply this long fails, ms. Default 30000. */
  requestTimeout?: number;
  /** Ask for zstd-compressed batches. Default true. */
  acceptZstd?: boolean;
  /** Client name for the server's logs. */
  name?: string;
  /** Log every frame sent and received (to `logger.debug`). Default false. */
  debug?: boolean;
  /** Where logs go. Default `console`. */
  logger?: Logger;
  /** The WebSocket implementation; default the platform's, or the `ws` package on Node 20. */
  WebSocket?: WebSocketConstructor;
}

export interface ConnectedEvent {
  clientId: string;
  serverVersion: string;
  /** When the token expires (Unix seconds; 0: never). */
  expiresAtUnix: number;
  maxMessageSize: number;
  maxSubscriptions: number;
  pingIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** Not the first connection of this client. */
  reconnect: boolean;
}

export interface DisconnectedEvent {
  code: number;
  reason: string;
  /** The code's name and meaning (docs/protocol.md, "Close codes"). */
  name: string;
  meaning: string;
  /** Whether the server (or the code) says reconnecting may succeed. */
  reconnect: boolean;
  /** Whether this client will reconnect by itself. */
  willReconnect: boolean;
}

export interface ReconnectedEvent {
  /** Connection attempts it took. */
  attempts: number;
  /** How each subscribed channel fared. */
  channels: ChannelRecovery[];
}

export interface RateLimitEvent {
  retryAfterMs: number;
  command: string;
  channel?: string;
  /** The client sends the request again after `retryAfterMs`. */
  willRetry: boolean;
}

export interface ClientEvents {
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  reconnected: ReconnectedEvent;
  rateLimit: RateLimitEvent;
  tokenRefreshed: { expiresAtUnix: number };
  /** The server's reminder that the token expires soon (refreshed by itself with `autoRefresh` and `getToken`). */
  tokenExpiring: { expiresAtUnix: number };
  error: Error;
  /** Every update of every channel, after recovery and ordering. */
  update: Update;
}

export interface PublishOptions {
  type: UpdateType;
  key?: string;
  confidence?: number;
  /** Bytes as given; a string as UTF-8; anything else as JSON. */
  payload?: Uint8Array | string | unknown;
}

export interface HistoryPage {
  /** Empty: the channel does not exist. */
  epoch: string;
  offset: number;
  updates: Update[];
  /** Some publications after `since` are no longer held. */
  truncated: boolean;
}

export interface ClientStats {
  connects: number;
  reconnects: number;
  messages: number;
  compressedMessages: number;
  updates: number;
  duplicates: number;
  gaps: number;
  recoveriesSucceeded: number;
  recoveriesFailed: number;
  synced: number;
  refreshes: number;
  rateLimited: number;
}

export type ClientState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

type Command = NonNullable<ClientFrame["command"]>;
type ReplyResult = Reply["result"];

interface Request {
  id: number;
  command: Command;
  channel?: string;
  /** Tied to one connection (Connect, Subscribe, Refresh, …): dropped, not kept, when it ends. */
  scoped: boolean;
  onResult: (result: ReplyResult) => void;
  onError: (err: Error) => void;
  rateLimitRetries: number;
  timer?: ReturnType<typeof setTimeout>;
}

/** One channel the client is subscribed to, shared by its `Subscription`s. */
interface Channel {
  name: string;
  ack: boolean;
  handles: Set<Subscription>;
  /** The last update's epoch and offset; `known` once the server or `since` gave one. */
  epoch: string;
  offset: number;
  known: boolean;
  /** Recover from the position even on the first subscribe (`since`). */
  recoverFirst: boolean;
  subId: number;
  confirmed: boolean;
  /** A `History` fill is running: live updates wait in `held`. */
  filling: boolean;
  held: WireUpdate[];
  /** Highest offset acknowledged while no subscription was live, sent once there is one. */
  ackWanted: number;
}

const NOOP = () => {};

/**
 * A routopia-realtime connection that survives the network: reconnects with backoff,
 * resubscribes from the last offset seen, fills gaps, refreshes its token in-band and honours
 * rate limits.
 */
export class RealTimeClient extends Emitter<ClientEvents> {
  readonly stats: ClientStats = {
    connects: 0, reconnects: 0, messages: 0, compressedMessages: 0, updates: 0, duplicates: 0,
    gaps: 0, recoveriesSucceeded: 0, recoveriesFailed: 0, synced: 0, refreshes: 0, rateLimited: 0,
  };
  private readonly opts: Required<Omit<RealTimeClientOptions, "token" | "getToken" | "WebSocket" | "logger" | "backoff">> & {
    backoff: BackoffOptions;
  };
  private readonly logger: Logger;
  private currentState: ClientState = "idle";
  private socket: SocketLike | null = null;
  /** Bumped per socket, so events of a replaced socket are ignored. */
  private generation = 0;
  private nextId = 1;
  private queue: Request[] = [];
  private inflight = new Map<number, Request>();
  private channels = new Map<string, Channel>();
  private bySubId = new Map<number, Channel>();
  private typeSubscriptions = new Set<Subscription>();
  private info: ConnectResult | null = null;
  private everConnected = false;
  private attempts = 0;
  private lostAt = 0;
  private lastDisconnect: { code: number; reason: string; reconnect: boolean } | null = null;
  private lastHeard = 0;
  private pingSentAt = 0;
  private pausedUntil = 0;
  private refreshing = false;
  private expiresAtUnix = 0;
  private timers = { reconnect: undefined as ReturnType<typeof setTimeout> | undefined, heartbeat: undefined as ReturnType<typeof setInterval> | undefined, refresh: undefined as ReturnType<typeof setTimeout> | undefined, flush: undefined as ReturnType<typeof setTimeout> | undefined };
  private connectWaiters: { resolve: (info: ConnectedEvent) => void; reject: (err: Error) => void }[] = [];
  private readonly onOnline = () => this.reconnectNow();

  constructor(private readonly options: RealTimeClientOptions) {
    super();
    if (!options.url) throw new TypeError("RealTimeClient: `url` is required");
    this.opts = {
      url: options.url,
      autoReconnect: options.autoReconnect ?? true,
      maxRetries: options.maxRetries ?? Infinity,
      backoff: { ...DEFAULT_BACKOFF, ...options.backoff },
      heartbeatInterval: options.heartbeatInterval ?? 15_000,
      heartbeatTimeout: options.heartbeatTimeout ?? 10_000,
      autoRefresh: options.autoRefresh ?? true,
      refreshThreshold: options.refreshThreshold ?? 300_000,
      messageRecovery: options.messageRecovery ?? true,
      recoveryWindow: options.recoveryWindow ?? 300_000,
      offlineSupport: options.offlineSupport ?? true,
      offlineQueueLimit: options.offlineQueueLimit ?? 1000,
      syncOnReconnect: options.syncOnReconnect ?? true,
      rateLimitRetries: options.rateLimitRetries ?? 3,
      requestTimeout: options.requestTimeout ?? 30_000,
      acceptZstd: options.acceptZstd ?? true,
      name: options.name ?? "routopia-realtime-ts",
      debug: options.debug ?? false,
    };
    this.logger = options.logger ?? console;
  }

  get state(): ClientState {
    return this.currentState;
  }

  /** The current connection's `ConnectResult`, or null while disconnected. */
  get connection(): ConnectResult | null {
    return this.currentState === "connected" ? this.info : null;
  }

  /** Opens the connection (retrying per `backoff`); resolves once the server accepted it. */
  connect(): Promise<ConnectedEvent> {
    const waiting = new Promise<ConnectedEvent>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this.currentState === "idle" || this.currentState === "closed") {
      this.currentState = "connecting";
      this.attempts = 0;
      const target = globalThis as { addEventListener?: (name: string, fn: () => void) => void };
      target.addEventListener?.("online", this.onOnline);
      void this.open();
    } else if (this.currentState === "connected" && this.info) {
      this.resolveConnect(this.connectedEvent(this.info));
    }
    return waiting;
  }

  /** Closes the connection for good (until `connect` is called again). */
  close(): void {
    if (this.currentState === "closed" || this.currentState === "idle") return;
    const wasConnected = this.currentState === "connected";
    this.currentState = "closed";
    const target = globalThis as { removeEventListener?: (name: string, fn: () => void) => void };
    target.removeEventListener?.("online", this.onOnline);
    this.stopTimers();
    const socket = this.socket;
    this.socket = null;
    this.generation++;
    socket?.close(1000, "client closed");
    this.dropRequests(new ConnectionLostError("the client was closed"), true);
    this.rejectConnect(new ConnectionLostError("the client was closed"));
    for (const channel of this.channels.values()) channel.confirmed = false;
    this.bySubId.clear();
    if (wasConnected) {
      const code = describeCloseCode(1000);
      this.emit("disconnected", { code: 1000, reason: "client closed", name: code.name, meaning: code.meaning, reconnect: false, willReconnect: false });
    }
  }

  /**
   * Subscribes to a channel, or with an array of update types, to those types on every channel
   * this client subscribes to (the server has no subscription by type: this filters here).
   */
  subscribe(target: string | UpdateType[], options: SubscribeOptions = {}): Subscription {
    if (Array.isArray(target)) {
      const view = new Subscription(null, [...target], options, (s) => this.typeSubscriptions.delete(s), () => null);
      this.typeSubscriptions.add(view);
      queueMicrotask(() => view.confirmed({ channel: "", epoch: "", offset: 0 }));
      return view;
    }
    const name = target;
    let channel = this.channels.get(name);
    const subscription: Subscription = new Subscription(name, null, options, (s) => this.release(s), () => {
      const c = this.channels.get(name);
      return c && c.known ? { epoch: c.epoch, offset: c.offset } : null;
    });
    if (channel) {
      if (options.ack && !channel.ack) throw new Error(`${name} is already subscribed without ack`);
      channel.handles.add(subscription);
      if (channel.confirmed) {
        const info = { channel: name, epoch: channel.epoch, offset: channel.offset };
        queueMicrotask(() => subscription.confirmed(info));
      }
      return subscription;
    }
    channel = {
      name, ack: options.ack ?? false, handles: new Set([subscription]),
      epoch: options.since?.epoch ?? "", offset: options.since?.offset ?? 0, known: options.since !== undefined,
      recoverFirst: options.since !== undefined, subId: 0, confirmed: false, filling: false, held: [], ackWanted: 0,
    };
    this.channels.set(name, channel);
    if (this.currentState === "connected") this.subscribeChannel(channel, false, NOOP);
    return subscription;
  }

  /** Publishes one update; resolves with the offset it got. */
  publish(channel: string, update: PublishOptions): Promise<{ epoch: string; offset: number }> {
    const command: Command = {
      case: "publish",
      value: {
        $typeName: "routopia.realtime.v1.Publish",
        channel, type: update.type, key: update.key ?? "", confidence: update.confidence ?? 0,
        payload: encodePayload(update.payload),
      },
    };
    return this.call(command, channel).then((result) => {
      if (result.case !== "publish") throw new Error(`unexpected reply to publish: ${result.case}`);
      return { epoch: result.value.epoch, offset: Number(result.value.offset) };
    });
  }

  /** A channel's stored publications after `since`, oldest first (at most `limit`, server default 100, max 1000). */
  history(channel: string, options: { since?: number; limit?: number } = {}): Promise<HistoryPage> {
    return this.call(historyCommand(channel, options.since ?? 0, options.limit ?? 0), channel).then((result) => {
      if (result.case !== "history") throw new Error(`unexpected reply to history: ${result.case}`);
      return historyPage(channel, result.value);
    });
  }

  /** Confirms `update` and everything before it on its channel (subscriptions with `ack: true`). */
  acknowledge(update: Update): void {
    const channel = this.channels.get(update.channel);
    if (!channel) throw new Error(`not subscribed to ${update.channel}`);
    if (!channel.ack) throw new Error(`${update.channel} was not subscribed with ack: true`);
    if (!(this.currentState === "connected" && channel.confirmed)) {
      channel.ackWanted = Math.max(channel.ackWanted, update.offset);
      return;
    }
    this.sendAck(channel, update.offset);
  }

  // ------------------------------------------------------------------ connection

  private async open(): Promise<void> {
    const generation = ++this.generation;
    let token = this.options.token ?? "";
    let WebSocketImpl: WebSocketConstructor;
    try {
      if (this.options.getToken) token = await this.options.getToken();
      WebSocketImpl = await resolveWebSocket(this.options.WebSocket);
    } catch (err) {
      if (generation !== this.generation) return;
      this.log("warn", "could not prepare a connection:", err);
      this.connectionEnded(generation, 1006, `could not prepare a connection: ${String(err)}`, null);
      return;
    }
    if (generation !== this.generation || this.currentState === "closed") return;
    let socket: SocketLike;
    try {
      socket = new WebSocketImpl(this.opts.url);
    } catch (err) {
      this.connectionEnded(generation, 1006, `could not open ${this.opts.url}: ${String(err)}`, null);
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.lastDisconnect = null;
    socket.onopen = () => {
      if (generation !== this.generation) return;
      this.lastHeard = Date.now();
      const connect: Command = {
        case: "connect",
        value: {
          $typeName: "routopia.realtime.v1.Connect",
          token, name: this.opts.name, version: "0.1.0", acceptZstd: this.opts.acceptZstd, zstdDictionaries: [],
        },
      };
      // Connect must be the first frame: it bypasses the queue.
      const request = this.request(connect, undefined, true, (result) => {
        if (result.case === "connect") this.onConnected(result.value);
      }, (err) => {
        // A refused Connect arrives as Disconnect and close; this is the connection ending.
        this.log("info", "connect not answered:", err.message);
      });
      this.transmit(request);
    };
    socket.onmessage = (event) => {
      if (generation !== this.generation) return;
      const bytes = toBytes(event.data);
      if (!bytes) {
        this.log("warn", "ignored a non-binary message");
        return;
      }
      this.onMessage(bytes);
    };
    socket.onerror = () => {
      // The close event follows with the code; nothing to do here.
    };
    socket.onclose = (event) => {
      this.connectionEnded(generation, event.code, event.reason, socket);
    };
  }

  private onConnected(info: ConnectResult): void {
    const reconnect = this.everConnected;
    const attempts = this.attempts + 1; // the failed ones and this one
    this.info = info;
    this.currentState = "connected";
    this.everConnected = true;
    this.attempts = 0;
    this.stats.connects++;
    this.expiresAtUnix = Number(info.expiresAtUnix);
    this.lastHeard = Date.now();
    this.pingSentAt = 0;
    this.startHeartbeat();
    this.scheduleRefresh();
    const event = this.connectedEvent(info, reconnect);
    this.log("info", `connected as ${info.clientId} (server ${info.serverVersion})`);

    // Resubscribe every channel from its position before anything queued offline is sent.
    const away = this.lostAt ? Date.now() - this.lostAt : 0;
    const pending = [...this.channels.values()];
    const outcomes: ChannelRecovery[] = [];
    let waiting = pending.length;
    const settled = () => {
      if (--waiting === 0 && reconnect) this.emit("reconnected", { attempts, channels: outcomes });
    };
    for (const channel of pending) {
      this.subscribeChannel(channel, reconnect && away > this.opts.recoveryWindow, (outcome) => {
        if (outcome) outcomes.push(outcome);
        settled();
      });
    }
    if (reconnect) this.stats.reconnects++;
    this.emit("connected", event);
    this.resolveConnect(event);
    if (pending.length === 0 && reconnect) this.emit("reconnected", { attempts, channels: [] });
    this.flush();
  }

  private connectedEvent(info: ConnectResult, reconnect = this.stats.connects > 1): ConnectedEvent {
    return {
      clientId: info.clientId, serverVersion: info.serverVersion, expiresAtUnix: Number(info.expiresAtUnix),
      maxMessageSize: info.maxMessageSize, maxSubscriptions: info.maxSubscriptions,
      pingIntervalMs: info.pingIntervalMs, heartbeatTimeoutMs: info.heartbeatTimeoutMs, reconnect,
    };
  }

  /** A socket ended (closed by either side, or found dead). */
  private connectionEnded(generation: number, closeCode: number, closeReason: string, socket: SocketLike | null): void {
    if (generation !== this.generation) return;
    const ended = ++this.generation;
    if (socket && this.socket === socket) this.socket = null;
    const wasConnected = this.currentState === "connected";
    this.stopTimers();
    const told = this.lastDisconnect;
    const code = told?.code ?? closeCode;
    const reason = told?.reason ?? closeReason;
    const meaning = describeCloseCode(code);
    const reconnect = told ? told.reconnect : meaning.reconnect;
    if (wasConnected) this.lostAt = Date.now();
    this.info = null;
    for (const channel of this.channels.values()) {
      channel.confirmed = false;
      channel.filling = false;
      channel.held = [];
    }
    this.bySubId.clear();
    this.dropRequests(new ConnectionLostError(`connection lost (${code} ${meaning.name}); the request may or may not have been applied`), !this.opts.offlineSupport);
    if (this.currentState === "closed") return;

    if (!wasConnected) this.attempts++;
    const willReconnect = this.opts.autoReconnect && reconnect && this.attempts < this.opts.maxRetries;
    // The state is settled before listeners hear of the loss.
    this.currentState = willReconnect ? "reconnecting" : "closed";
    if (wasConnected) {
      this.emit("disconnected", { code, reason, name: meaning.name, meaning: meaning.meaning, reconnect, willReconnect });
    } else {
      this.log("warn", `connection attempt failed: ${code} ${meaning.name}${reason ? ` (${reason})` : ""}`);
    }
    // A listener may have called close() or connect().
    if (this.generation !== ended || this.currentState !== (willReconnect ? "reconnecting" : "closed")) return;
    if (willReconnect) {
      const delay = backoffDelay(this.opts.backoff, this.attempts);
      this.log("info", `reconnecting in ${Math.round(delay)} ms`);
      this.timers.reconnect = setTimeout(() => {
        this.timers.reconnect = undefined;
        void this.open();
      }, delay);
      return;
    }
    const err = reconnect
      ? new DisconnectedError(code, `${reason ? reason + "; " : ""}gave up after ${this.attempts} failed attempts`)
      : new DisconnectedError(code, reason);
    this.dropRequests(err, true);
    this.rejectConnect(err);
    this.emit("error", err);
  }

  /** Reconnects at once if waiting to (the browser says the network is back). */
  private reconnectNow(): void {
    if (this.currentState !== "reconnecting" || this.timers.reconnect === undefined) return;
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = undefined;
    void this.open();
  }

  private stopTimers(): void {
    clearTimeout(this.timers.reconnect);
    clearInterval(this.timers.heartbeat);
    clearTimeout(this.timers.refresh);
    clearTimeout(this.timers.flush);
    this.timers = { reconnect: undefined, heartbeat: undefined, refresh: undefined, flush: undefined };
  }

  private resolveConnect(event: ConnectedEvent): void {
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const waiter of waiters) waiter.resolve(event);
  }

  private rejectConnect(err: Error): void {
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const waiter of waiters) waiter.reject(err);
  }

  // ------------------------------------------------------------------ heartbeat and refresh

  private startHeartbeat(): void {
    const { heartbeatInterval, heartbeatTimeout } = this.opts;
    const generation = this.generation;
    this.timers.heartbeat = setInterval(() => {
      if (generation !== this.generation) return;
      const now = Date.now();
      if (this.pingSentAt && this.lastHeard < this.pingSentAt && now - this.pingSentAt >= heartbeatTimeout) {
        // A dead network may never finish a close handshake: end the connection now.
        this.log("warn", `nothing heard for ${now - this.lastHeard} ms; reconnecting`);
        const socket = this.socket;
        this.connectionEnded(generation, 1006, `no answer to a ping within ${heartbeatTimeout} ms`, socket);
        socket?.close(4000, "heartbeat timeout");
        return;
      }
      if (now - this.lastHeard >= heartbeatInterval && !(this.pingSentAt > this.lastHeard)) {
        this.pingSentAt = now;
        this.sendFrame(create(ClientFrameSchema, { id: 0, command: { case: "ping", value: { timestampUs: BigInt(now) * 1000n } } }));
      }
    }, Math.max(50, Math.min(heartbeatInterval, heartbeatTimeout) / 4));
  }

  private scheduleRefresh(): void {
    clearTimeout(this.timers.refresh);
    this.timers.refresh = undefined;
    if (!this.opts.autoRefresh || !this.options.getToken || this.expiresAtUnix === 0) return;
    const remaining = this.expiresAtUnix * 1000 - Date.now();
    // Tokens that live less than the threshold are refreshed at half their life, not in a loop.
    const delay = Math.max(remaining - this.opts.refreshThreshold, remaining / 2, 0);
    this.timers.refresh = setTimeout(() => this.refresh(), delay);
  }

  /** Replaces the connection's token in-band (without reconnecting). */
  async refresh(): Promise<void> {
    if (this.refreshing || !this.options.getToken || this.currentState !== "connected") return;
    this.refreshing = true;
    const generation = this.generation;
    try {
      const token = await this.options.getToken();
      if (generation !== this.generation) return;
      const result = await new Promise<ReplyResult>((resolve, reject) => {
        const command: Command = { case: "refresh", value: { $typeName: "routopia.realtime.v1.Refresh", token } };
        this.enqueue(this.request(command, undefined, true, resolve, reject));
      });
      if (result.case !== "refresh") throw new Error(`unexpected reply to refresh: ${result.case}`);
      this.expiresAtUnix = Number(result.value.expiresAtUnix);
      this.stats.refreshes++;
      this.log("info", `token refreshed; expires at ${this.expiresAtUnix}`);
      this.emit("tokenRefreshed", { expiresAtUnix: this.expiresAtUnix });
      this.scheduleRefresh();
    } catch (err) {
      if (generation !== this.generation) return;
      this.emit("error", err instanceof Error ? err : new Error(String(err)));
      // Try again shortly; the server's grace period covers a little lateness.
      clearTimeout(this.timers.refresh);
      this.timers.refresh = setTimeout(() => this.refresh(), 5000);
    } finally {
      this.refreshing = false;
    }
  }

  // ------------------------------------------------------------------ requests

  private request(command: Command, channel: string | undefined, scoped: boolean, onResult: (result: ReplyResult) => void, onError: (err: Error) => void): Request {
    const id = this.nextId;
    // Ids are uint32 and 0 means "no reply wanted".
    this.nextId = (this.nextId % 0xffff_ffff) + 1;
    return { id, command, channel, scoped, onResult, onError, rateLimitRetries: 0 };
  }

  /** A request from the application: kept while offline (with `offlineSupport`). */
  private call(command: Command, channel: string): Promise<ReplyResult> {
    return new Promise((resolve, reject) => {
      const request = this.request(command, channel, false, resolve, reject);
      if (this.currentState !== "connected" && !this.opts.offlineSupport) {
        reject(new ConnectionLostError(`not connected (${this.currentState})`));
        return;
      }
      if (this.currentState !== "connected" && this.queue.length >= this.opts.offlineQueueLimit) {
        reject(new ConnectionLostError(`offline queue full (${this.opts.offlineQueueLimit})`));
        return;
      }
      if (this.currentState === "idle" || this.currentState === "closed") {
        reject(new ConnectionLostError(`not connected (${this.currentState}); call connect() first`));
        return;
      }
      this.enqueue(request);
    });
  }

  private enqueue(request: Request): void {
    this.queue.push(request);
    this.flush();
  }

  /** Sends what is queued, unless offline or waiting out a rate limit. */
  private flush(): void {
    if (this.currentState !== "connected") return;
    while (this.queue.length > 0 && this.currentState === "connected") {
      // A 429 to something just sent pauses what follows it too.
      const wait = this.pausedUntil - Date.now();
      if (wait > 0) {
        if (this.timers.flush === undefined) {
          this.timers.flush = setTimeout(() => {
            this.timers.flush = undefined;
            this.flush();
          }, wait);
        }
        return;
      }
      this.transmit(this.queue.shift()!);
    }
  }

  private transmit(request: Request): void {
    this.inflight.set(request.id, request);
    request.timer = setTimeout(() => {
      if (this.inflight.get(request.id) !== request) return;
      this.inflight.delete(request.id);
      request.onError(new Error(`${request.command.case}: no reply within ${this.opts.requestTimeout} ms`));
    }, this.opts.requestTimeout);
    this.sendFrame(create(ClientFrameSchema, { id: request.id, command: request.command }));
  }

  private sendFrame(frame: ClientFrame): void {
    const socket = this.socket;
    if (!socket || socket.readyState !== OPEN) return;
    if (this.opts.debug) this.logger.debug("routopia realtime →", frame.command.case, frame.id, frame.command.value);
    socket.send(encodeClientMessage([frame]));
  }

  /** Fails requests that were sent on the lost connection; keeps unsent ones unless `all`. */
  private dropRequests(err: Error, all: boolean): void {
    for (const request of this.inflight.values()) {
      clearTimeout(request.timer);
      request.onError(err);
    }
    this.inflight.clear();
    const kept: Request[] = [];
    for (const request of this.queue) {
      if (all || request.scoped) request.onError(err);
      else kept.push(request);
    }
    this.queue = kept;
  }

  // ------------------------------------------------------------------ receiving

  private onMessage(bytes: Uint8Array): void {
    this.lastHeard = Date.now();
    let frames: ServerFrame[];
    try {
      const decoded = decodeServerMessage(bytes);
      frames = decoded.frames;
      this.stats.messages++;
      if (decoded.compressed) this.stats.compressedMessages++;
    } catch (err) {
      this.emit("error", new Error(`undecodable message from the server: ${String(err)}`));
      return;
    }
    const generation = this.generation;
    for (const frame of frames) {
      // A frame's handler may end the connection; frames after that belong to no one.
      if (generation !== this.generation) return;
      if (this.opts.debug) this.logger.debug("routopia realtime ←", frame.kind.case, frame.kind.value);
      switch (frame.kind.case) {
        case "reply":
          this.onReply(frame.kind.value);
          break;
        case "update":
          this.onUpdate(frame.kind.value);
          break;
        case "tokenExpiring": {
          const expiresAtUnix = Number(frame.kind.value.expiresAtUnix);
          this.log("info", `the server says the token expires at ${expiresAtUnix}`);
          this.emit("tokenExpiring", { expiresAtUnix });
          if (this.opts.autoRefresh) void this.refresh();
          break;
        }
        case "disconnect": {
          const { code, reason, reconnect } = frame.kind.value;
          this.lastDisconnect = { code, reason, reconnect };
          break;
        }
        case "pong":
          break;
      }
    }
  }

  private onReply(reply: Reply): void {
    const request = this.inflight.get(reply.id);
    if (reply.result.case === "error") {
      const { code, message, retryAfterMs } = reply.result.value;
      const err = new ServerError(code, message, Number(retryAfterMs), request?.command.case ?? "");
      if (!request) {
        // Errors of fire-and-forget frames (Ping, Ack) come with id 0.
        if (code === 429) this.rateLimited(Number(retryAfterMs), "", undefined, false);
        this.emit("error", err);
        return;
      }
      this.inflight.delete(reply.id);
      clearTimeout(request.timer);
      if (code === 429) {
        const retry = request.rateLimitRetries < this.opts.rateLimitRetries;
        this.rateLimited(Number(retryAfterMs), request.command.case ?? "", request.channel, retry);
        if (retry) {
          request.rateLimitRetries++;
          // Back in line by id, so retried requests keep their order.
          const at = this.queue.findIndex((queued) => queued.id > request.id);
          this.queue.splice(at < 0 ? this.queue.length : at, 0, request);
          this.flush();
          return;
        }
      }
      request.onError(err);
      return;
    }
    if (!request) return;
    this.inflight.delete(reply.id);
    clearTimeout(request.timer);
    request.onResult(reply.result);
  }

  private rateLimited(retryAfterMs: number, command: string, channel: string | undefined, willRetry: boolean): void {
    this.stats.rateLimited++;
    // Nothing more is sent until the server has a token again (`retry_after_ms`).
    this.pausedUntil = Math.max(this.pausedUntil, Date.now() + retryAfterMs);
    this.emit("rateLimit", { retryAfterMs, command, channel, willRetry });
  }

  // ------------------------------------------------------------------ subscriptions

  /**
   * Sends `Subscribe` for `channel`, from its position when it has one (and recovery is
   * wanted), and reports how it went once settled (null: refused or connection lost).
   */
  private subscribeChannel(channel: Channel, tooLongAway: boolean, done: (outcome: ChannelRecovery | null) => void): void {
    const recover = channel.known && (channel.recoverFirst || (this.opts.messageRecovery && !tooLongAway));
    const command: Command = {
      case: "subscribe",
      value: {
        $typeName: "routopia.realtime.v1.Subscribe",
        channel: channel.name, recover, epoch: recover ? channel.epoch : "", offset: BigInt(recover ? channel.offset : 0), ack: channel.ack,
      },
    };
    const request = this.request(command, channel.name, true, (result) => {
      if (result.case !== "subscribe" || this.channels.get(channel.name) !== channel) return done(null);
      this.onSubscribed(channel, result.value, recover, done);
    }, (err) => {
      if (err instanceof ServerError && this.channels.get(channel.name) === channel) {
        // Refused (403, 409, 413, …): the subscription ends.
        this.channels.delete(channel.name);
        for (const handle of channel.handles) handle.failed(err);
        this.emit("error", err);
      }
      done(null);
    });
    // Subscriptions go ahead of application calls kept while offline.
    const at = this.queue.findIndex((queued) => !queued.scoped);
    this.queue.splice(at < 0 ? this.queue.length : at, 0, request);
    this.flush();
  }

  private onSubscribed(channel: Channel, result: SubscribeResult, askedRecovery: boolean, done: (outcome: ChannelRecovery | null) => void): void {
    channel.subId = result.subId;
    channel.confirmed = true;
    this.bySubId.set(result.subId, channel);
    const serverOffset = Number(result.offset);
    const wasKnown = channel.known;
    channel.recoverFirst = false;
    let failure = "NONE";
    let syncTarget = 0;
    if (askedRecovery && result.recovered) {
      // Every missed update follows this reply, in order.
      channel.epoch = result.epoch;
      this.stats.recoveriesSucceeded++;
    } else {
      if (askedRecovery) {
        failure = RecoveryFailure[result.recoveryFailure] ?? String(result.recoveryFailure);
      } else if (wasKnown) {
        failure = "NOT_ATTEMPTED";
      }
      const fillable = result.recoveryFailure === RecoveryFailure.TOO_MANY || result.recoveryFailure === RecoveryFailure.WINDOW_EXCEEDED;
      if (askedRecovery && this.opts.syncOnReconnect && fillable && result.epoch === channel.epoch && serverOffset > channel.offset) {
        syncTarget = serverOffset;
      } else {
        if (wasKnown) this.stats.recoveriesFailed++;
        channel.epoch = result.epoch;
        channel.offset = serverOffset;
      }
      channel.known = true;
    }
    const info = { channel: channel.name, epoch: result.epoch, offset: serverOffset };
    const outcome = (synced: number, complete: boolean): ChannelRecovery => ({
      channel: channel.name, recovered: failure === "NONE" || complete, failure, synced, epoch: result.epoch, offset: serverOffset,
    });
    if (channel.ackWanted > 0) {
      this.sendAck(channel, channel.ackWanted);
      channel.ackWanted = 0;
    }
    if (syncTarget > 0) {
      this.fill(channel, syncTarget, (synced, complete) => {
        if (complete) this.stats.recoveriesSucceeded++;
        else this.stats.recoveriesFailed++;
        const recovery = outcome(synced, complete);
        for (const handle of channel.handles) handle.confirmed({ ...info, recovery });
        for (const handle of channel.handles) handle.recovered(recovery);
        done(recovery);
      });
      return;
    }
    const recovery = wasKnown ? outcome(0, false) : undefined;
    for (const handle of channel.handles) handle.confirmed({ ...info, recovery });
    if (recovery) for (const handle of channel.handles) handle.recovered(recovery);
    done(recovery ?? null);
  }

  private onUpdate(wire: WireUpdate): void {
    const channel = this.bySubId.get(wire.subId);
    if (!channel) return;
    if (channel.filling) {
      channel.held.push(wire);
      return;
    }
    const offset = Number(wire.offset);
    switch (classifyOffset(channel.offset, offset, wire.skipped)) {
      case "next":
        channel.offset = offset;
        this.deliver(channel, Update.fromWire(channel.name, channel.epoch, wire));
        break;
      case "duplicate":
        this.stats.duplicates++;
        break;
      case "gap":
        this.stats.gaps++;
        channel.held.push(wire);
        if (this.opts.syncOnReconnect) {
          this.fill(channel, offset - 1 - wire.skipped, NOOP);
        } else {
          this.lose(channel, offset - 1 - wire.skipped);
          this.releaseHeld(channel);
        }
        break;
    }
  }

  /** Fetches a channel's publications up to `target` with `History`, holding live updates meanwhile. */
  private fill(channel: Channel, target: number, done: (synced: number, complete: boolean) => void): void {
    channel.filling = true;
    const generation = this.generation;
    let synced = 0;
    const finish = (complete: boolean) => {
      if (!complete) this.lose(channel, target);
      channel.filling = false;
      done(synced, complete);
      this.releaseHeld(channel);
    };
    const page = () => {
      const want = Math.min(1000, target - channel.offset);
      const request = this.request(historyCommand(channel.name, channel.offset, want), channel.name, true, (result) => {
        if (generation !== this.generation || this.channels.get(channel.name) !== channel) return;
        if (result.case !== "history" || result.value.epoch !== channel.epoch) return finish(false);
        const before = channel.offset;
        for (const publication of result.value.publications) {
          const offset = Number(publication.offset);
          if (offset !== channel.offset + 1 || offset > target) break;
          channel.offset = offset;
          synced++;
          this.stats.synced++;
          this.deliver(channel, Update.fromPublication(channel.name, channel.epoch, publication));
        }
        if (channel.offset >= target) return finish(true);
        if (result.value.truncated || channel.offset === before) return finish(false);
        page();
      }, () => {
        // The connection ended; the next one recovers from the position reached.
      });
      this.enqueue(request);
    };
    page();
  }

  /** Gives up on the updates up to `target` and says so. */
  private lose(channel: Channel, target: number): void {
    if (target <= channel.offset) return;
    const gap = { channel: channel.name, from: channel.offset + 1, to: target };
    this.log("warn", `updates ${gap.from}..${gap.to} of ${gap.channel} are lost`);
    channel.offset = target;
    for (const handle of channel.handles) handle.lost(gap);
  }

  private releaseHeld(channel: Channel): void {
    const held = channel.held;
    channel.held = [];
    for (const wire of held) {
      if (this.bySubId.get(wire.subId) !== channel) continue;
      this.onUpdate(wire);
    }
  }

  private deliver(channel: Channel, update: Update): void {
    this.stats.updates++;
    for (const handle of channel.handles) handle.deliver(update);
    for (const view of this.typeSubscriptions) view.deliver(update);
    this.emit("update", update);
  }

  private sendAck(channel: Channel, offset: number): void {
    this.sendFrame(create(ClientFrameSchema, { id: 0, command: { case: "ack", value: { subId: channel.subId, offset: BigInt(offset) } } }));
  }

  private release(subscription: Subscription): void {
    const channel = this.channels.get(subscription.channel ?? "");
    if (!channel) return;
    channel.handles.delete(subscription);
    if (channel.handles.size > 0) return;
    this.channels.delete(channel.name);
    if (channel.confirmed) {
      this.bySubId.delete(channel.subId);
      const command: Command = { case: "unsubscribe", value: { $typeName: "routopia.realtime.v1.Unsubscribe", subId: channel.subId } };
      this.enqueue(this.request(command, channel.name, true, NOOP, NOOP));
    }
  }

  private log(level: "info" | "warn", ...args: unknown[]): void {
    if (level === "info" && !this.opts.debug) return;
    this.logger[level]("routopia realtime:", ...args);
  }

  protected override listenerFailed(err: unknown): void {
    this.logger.error("routopia realtime: an event listener threw", err);
  }
}

function historyCommand(channel: string, since: number, limit: number): Command {
  return { case: "history", value: { $typeName: "routopia.realtime.v1.History", channel, since: BigInt(since), limit } };
}

function historyPage(channel: string, result: HistoryResult): HistoryPage {
  return {
    epoch: result.epoch,
    offset: Number(result.offset),
    truncated: result.truncated,
    updates: result.publications.map((p) => Update.fromPublication(channel, result.epoch, p)),
  };
}

const encoder = new TextEncoder();

export function encodePayload(payload: unknown): Uint8Array {
  if (payload === undefined) return new Uint8Array();
  if (payload instanceof Uint8Array) return payload;
  if (typeof payload === "string") return encoder.encode(payload);
  return encoder.encode(JSON.stringify(payload));
}

export type { Position };
