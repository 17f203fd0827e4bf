// The client against the real routopia-realtime binary (target/debug, or $ROUTOPIA_BIN).
import assert from "node:assert/strict";
import { after, afterEach, test } from "node:test";
import { WebSocket as NodeWebSocket } from "ws";
import {
  DisconnectedError,
  RealTimeClient,
  UpdateType,
  type ClientEvents,
  type DisconnectedEvent,
  type RateLimitEvent,
  type RealTimeClientOptions,
  type Subscription,
  type Update,
  type WebSocketConstructor,
} from "../../src/index.js";
import { RealtimeServer, RedisServer, token } from "../support/server.js";
import { nextEvent, sleep, until, within } from "../support/wait.js";

const quiet = { debug() {}, info() {}, warn() {}, error() {} };
const clients: RealTimeClient[] = [];
const processes: { stop(): Promise<void> }[] = [];

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});
after(async () => {
  for (const p of processes.splice(0)) await p.stop();
});

function client(url: string, user: string, extra: Partial<RealTimeClientOptions> = {}): RealTimeClient {
  const c = new RealTimeClient({ url, token: token(user), name: user, logger: quiet, backoff: { initial: 100, max: 500, factor: 2 }, ...extra });
  clients.push(c);
  return c;
}

async function server(options: Parameters<typeof RealtimeServer.start>[0] = {}): Promise<RealtimeServer> {
  const started = await RealtimeServer.start(options);
  processes.push(started);
  return started;
}

function collect(subscription: Subscription): Update[] {
  const got: Update[] = [];
  subscription.on("update", (u) => got.push(u));
  return got;
}

const offsets = (updates: Update[]) => updates.map((u) => u.offset);
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test("subscribe and publish: typed updates in offset order, and history", async () => {
  const srv = await server();
  const subscriber = client(srv.url, "alice");
  const publisher = client(srv.url, "backend");
  const route = subscriber.subscribe("route:42");
  const got = collect(route);
  await within(10_000, "connect", Promise.all([subscriber.connect(), publisher.connect()]));
  const info = await within(10_000, "subscribed", route.ready);
  assert.equal(info.offset, 0);
  for (const n of range(1, 5)) {
    const result = await publisher.publish("route:42", { type: UpdateType.ROUTE, key: `leg-${n}`, confidence: 0.5, payload: { eta: n * 60 } });
    assert.equal(result.offset, n);
  }
  await until(10_000, "five updates", () => got.length === 5);
  assert.deepEqual(offsets(got), range(1, 5));
  assert.deepEqual(got.map((u) => [u.typeName, u.key, u.json<{ eta: number }>().eta]), range(1, 5).map((n) => ["ROUTE", `leg-${n}`, n * 60]));
  assert.equal(got[0]!.confidence, 0.5);
  assert.ok(Math.abs(got[0]!.timestamp.getTime() - Date.now()) < 60_000);
  const page = await within(10_000, "history", subscriber.history("route:42", { since: 2 }));
  assert.deepEqual(offsets(page.updates), [3, 4, 5]);
  assert.equal(page.truncated, false);
  assert.deepEqual(route.position, { epoch: info.epoch, offset: 5 });
});

test("zstd batches from the server are decoded, every update in order", async () => {
  const srv = await server({ env: { ROUTOPIA_DELIVERY__COMPRESSION_THRESHOLD: "64" } });
  const subscriber = client(srv.url, "alice");
  const publisher = client(srv.url, "backend");
  const got = collect(subscriber.subscribe("poi:u09tv"));
  await within(10_000, "connect", Promise.all([subscriber.connect(), publisher.connect()]));
  await until(10_000, "subscribed", () => subscriber.stats.messages > 1);
  const payload = { name: "café", tags: ["coffee", "wifi", "terrace"], text: "x".repeat(200) };
  // Published without waiting for each reply, so the server batches several per message.
  const results = await within(20_000, "publishes", Promise.all(range(1, 200).map((n) => publisher.publish("poi:u09tv", { type: UpdateType.POI, key: `p${n}`, payload: { n, ...payload } }))));
  assert.deepEqual(results.map((r) => r.offset), range(1, 200));
  await until(20_000, "200 updates", () => got.length === 200);
  assert.deepEqual(offsets(got), range(1, 200));
  assert.deepEqual(got.map((u) => u.json<{ n: number }>().n), range(1, 200));
  assert.ok(subscriber.stats.compressedMessages > 0, `compressed messages seen: ${subscriber.stats.compressedMessages} of ${subscriber.stats.messages}`);
});

test("after the server is killed and restarted (Redis broker), every missed update is recovered in order", async () => {
  const redis = await RedisServer.start();
  processes.push(redis);
  let node = await server({ broker: redis.url });
  const other = await server({ broker: redis.url });
  const subscriber = client(node.url, "alice");
  const publisher = client(other.url, "backend");
  const got = collect(subscriber.subscribe("route:7"));
  const disconnects: DisconnectedEvent[] = [];
  subscriber.on("disconnected", (e) => disconnects.push(e));
  await within(10_000, "connect", Promise.all([subscriber.connect(), publisher.connect()]));
  await until(10_000, "subscribed", () => subscriber.stats.messages > 1);
  for (const n of range(1, 3)) await publisher.publish("route:7", { type: UpdateType.ROUTE, key: "k", payload: `u${n}` });
  await until(10_000, "first three", () => got.length === 3);

  const reconnected = nextEvent<ClientEvents, "reconnected">(subscriber, "reconnected", 30_000);
  await node.stop("SIGKILL");
  await until(10_000, "the loss noticed", () => disconnects.length === 1);
  for (const n of range(4, 10)) await publisher.publish("route:7", { type: UpdateType.ROUTE, key: "k", payload: `u${n}` });
  node = await server({ broker: redis.url, listen: node.addr });
  const back = await reconnected;
  assert.equal(disconnects[0]!.willReconnect, true);
  assert.deepEqual(back.channels.map((c) => [c.channel, c.recovered, c.failure]), [["route:7", true, "NONE"]]);
  await publisher.publish("route:7", { type: UpdateType.ROUTE, key: "k", payload: "u11" });
  await until(15_000, "all eleven", () => got.length >= 11);
  await sleep(100);
  assert.deepEqual(offsets(got), range(1, 11));
  assert.deepEqual(got.map((u) => u.text()), range(1, 11).map((n) => `u${n}`));
  assert.ok(subscriber.stats.recoveriesSucceeded >= 1);
});

test("a server-side close (4005 heartbeat timeout) is surfaced, and missed updates are recovered", async () => {
  const srv = await server({ env: { ROUTOPIA_HEARTBEAT__INTERVAL: "200ms", ROUTOPIA_HEARTBEAT__TIMEOUT: "800ms" } });
  // The first connection never answers the server's pings, as a frozen app would not.
  let opened = 0;
  class FirstOneSilent extends NodeWebSocket {
    constructor(url: string) {
      super(url, { autoPong: opened++ > 0 });
    }
  }
  const subscriber = client(srv.url, "alice", { WebSocket: FirstOneSilent as unknown as WebSocketConstructor, heartbeatInterval: 60_000 });
  const publisher = client(srv.url, "backend");
  const got = collect(subscriber.subscribe("traffic:oslo"));
  await within(10_000, "connect", Promise.all([subscriber.connect(), publisher.connect()]));
  await until(10_000, "subscribed", () => subscriber.stats.messages > 1);
  await publisher.publish("traffic:oslo", { type: UpdateType.TRAFFIC, payload: "1" });
  await until(10_000, "first update", () => got.length === 1);
  const gone = await nextEvent<ClientEvents, "disconnected">(subscriber, "disconnected", 10_000);
  assert.equal(gone.code, 4005);
  assert.equal(gone.name, "heartbeat_timeout");
  assert.match(gone.meaning, /heartbeat timeout/);
  assert.equal(gone.willReconnect, true);
  for (const n of range(2, 6)) await publisher.publish("traffic:oslo", { type: UpdateType.TRAFFIC, payload: String(n) });
  const back = await nextEvent<ClientEvents, "reconnected">(subscriber, "reconnected", 10_000);
  assert.equal(back.channels[0]!.recovered, true);
  await until(10_000, "six updates", () => got.length >= 6);
  await sleep(100);
  assert.deepEqual(offsets(got), range(1, 6));
});

test("the token is refreshed in-band before it expires, without reconnecting", async () => {
  const srv = await server({ env: { ROUTOPIA_AUTH__EXPIRY_GRACE: "1s", ROUTOPIA_AUTH__LEEWAY: "1s", ROUTOPIA_AUTH__REFRESH_REMINDER: "1s" } });
  let issued = 0;
  // The first token lives 4 s; later ones an hour.
  const getToken = () => token("alice", issued++ === 0 ? 4 : 3600);
  const refreshing = client(srv.url, "alice", { token: undefined, getToken, refreshThreshold: 2000 });
  // The control: the same short token and no refresh must be closed with 4006 in the same time.
  const control = client(srv.url, "bob", { token: token("bob", 4), autoRefresh: false, autoReconnect: false });
  const events: string[] = [];
  refreshing.on("disconnected", (e) => events.push(`disconnected ${e.code}`));
  refreshing.on("tokenRefreshed", () => events.push("refreshed"));
  const first = await within(10_000, "connect", refreshing.connect());
  await within(10_000, "control connect", control.connect());
  const controlGone = await nextEvent<ClientEvents, "disconnected">(control, "disconnected", 15_000);
  assert.equal(controlGone.code, 4006);
  assert.equal(controlGone.name, "token_expired");
  await sleep(500);
  assert.deepEqual(events, ["refreshed"]);
  assert.equal(refreshing.state, "connected");
  assert.equal(refreshing.connection?.clientId, first.clientId, "the same connection");
  assert.ok(Number(refreshing.connection?.expiresAtUnix) > 0);
  const published = await within(10_000, "publish after the first token's expiry", refreshing.publish("route:alice", { type: UpdateType.ROUTE, payload: "still here" }));
  assert.equal(published.offset, 1);
});

test("429 is surfaced as rateLimit with retry-after, waited out, and every publish lands in order", async () => {
  const srv = await server({
    env: {
      ROUTOPIA_RATE_LIMITS__ENABLED: "true",
      ROUTOPIA_RATE_LIMITS__CONNECTION_PUBLISHES__REQUESTS: "120",
      ROUTOPIA_RATE_LIMITS__CONNECTION_PUBLISHES__WINDOW: "1m",
      ROUTOPIA_RATE_LIMITS__CONNECTION_PUBLISHES__BURST: "3",
    },
  });
  const publisher = client(srv.url, "backend", { rateLimitRetries: 10 });
  const limits: RateLimitEvent[] = [];
  publisher.on("rateLimit", (e) => limits.push(e));
  const disconnects: DisconnectedEvent[] = [];
  publisher.on("disconnected", (e) => disconnects.push(e));
  await within(10_000, "connect", publisher.connect());
  const results = await within(30_000, "six publishes", Promise.all(range(1, 6).map((n) => publisher.publish("route:9", { type: UpdateType.ROUTE, payload: String(n) }))));
  assert.deepEqual(results.map((r) => r.offset), range(1, 6));
  assert.ok(limits.length >= 1, "rate limited at least once");
  for (const limit of limits) {
    assert.equal(limit.command, "publish");
    assert.ok(limit.retryAfterMs > 0 && limit.retryAfterMs <= 1000, `retry after ${limit.retryAfterMs} ms`);
  }
  assert.deepEqual(disconnects, []);
  const page = await within(10_000, "history", publisher.history("route:9"));
  assert.deepEqual(page.updates.map((u) => u.text()), range(1, 6).map(String));
});

test("a refused token is surfaced as 4503 with its meaning and not retried", async () => {
  const srv = await server();
  const c = client(srv.url, "mallory", { token: "not-a-jwt" });
  const errors: Error[] = [];
  c.on("error", (e) => errors.push(e));
  await assert.rejects(within(10_000, "connect", c.connect()), (err: Error) => err instanceof DisconnectedError && err.code === 4503 && /token was refused/.test(err.message));
  assert.equal(c.state, "closed");
  assert.equal(errors.length, 1);
});
