import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { RealTimeClient, type ClientEvents, type RealTimeClientOptions } from "../../src/client.js";
import { DisconnectedError } from "../../src/errors.js";
import { RecoveryFailure, UpdateType, type ClientFrame } from "../../src/gen/realtime_pb.js";
import type { Update } from "../../src/update.js";
import { FakeServer, update, type FakeSocket } from "../support/fake-socket.js";
import { nextEvent, sleep, until, within } from "../support/wait.js";

const quiet = { debug() {}, info() {}, warn() {}, error() {} };

/** A fake server that answers Subscribe for every channel with sub_id 1, epoch "e", offset `at`. */
function serverAt(at: number): FakeServer {
  const server = new FakeServer();
  const connect = server.handler;
  server.handler = (frame, socket) => {
    if (frame.command.case === "subscribe") {
      socket.reply(frame.id, { case: "subscribe", value: { subId: 1, epoch: "e", offset: BigInt(at) } });
    } else connect(frame, socket);
  };
  return server;
}

const opened: RealTimeClient[] = [];
// A failed assertion must not leave a client's timers keeping the test process alive.
afterEach(() => {
  for (const c of opened.splice(0)) c.close();
});

function client(server: FakeServer, extra: Partial<RealTimeClientOptions> = {}): RealTimeClient {
  return track(new RealTimeClient({ url: "ws://fake/ws", token: "t", WebSocket: server.WebSocket, logger: quiet, backoff: { initial: 5, max: 20, factor: 2 }, ...extra }));
}

function track(c: RealTimeClient): RealTimeClient {
  opened.push(c);
  return c;
}

function offsetsOf(updates: Update[]): number[] {
  return updates.map((u) => u.offset);
}

test("updates arrive in order; duplicates are dropped", async () => {
  const server = serverAt(0);
  const c = client(server);
  const sub = c.subscribe("route:1");
  const got: Update[] = [];
  sub.on("update", (u) => got.push(u));
  await within(2000, "connect", c.connect());
  await within(2000, "subscribed", sub.ready);
  server.last.push([update(1), update(2), update(2), update(1), update(3)], 1);
  assert.deepEqual(offsetsOf(got), [1, 2, 3]);
  assert.equal(c.stats.duplicates, 2);
  c.close();
});

test("updates in the same message as the subscribe reply are not lost", async () => {
  const server = new FakeServer();
  const connect = server.handler;
  server.handler = (frame, socket) => {
    if (frame.command.case !== "subscribe") return connect(frame, socket);
    socket.push([
      { kind: { case: "reply", value: { id: frame.id, result: { case: "subscribe", value: { subId: 3, epoch: "e", offset: 5n } } } } } as never,
      update(6, { subId: 3 }),
    ]);
  };
  const c = client(server);
  const got: Update[] = [];
  c.subscribe("route:1").on("update", (u) => got.push(u));
  await within(2000, "connect", c.connect());
  await until(2000, "the update", () => got.length === 1);
  assert.equal(got[0]!.offset, 6);
  c.close();
});

test("a gap is filled from History, in order, before later live updates", async () => {
  const server = serverAt(0);
  const base = server.handler;
  server.handler = (frame, socket) => {
    if (frame.command.case === "history") {
      const since = Number(frame.command.value.since);
      assert.equal(since, 1);
      // Answer later, so live updates arrive while the gap is being filled.
      setTimeout(() => {
        socket.push([update(5, { subId: 1 })]);
        socket.reply(frame.id, { case: "history", value: { epoch: "e", offset: 5n, publications: [2, 3].map((n) => ({ offset: BigInt(n), type: 1, key: `k${n}` })) } });
      }, 20);
    } else base(frame, socket);
  };
  const c = client(server);
  const got: Update[] = [];
  c.subscribe("route:1").on("update", (u) => got.push(u));
  await within(2000, "connect", c.connect());
  await until(2000, "subscribed", () => server.received.some((f) => f.command.case === "subscribe"));
  await sleep(0);
  server.last.push([update(1), update(4)], 1);
  await until(2000, "all five updates", () => got.length === 5);
  assert.deepEqual(offsetsOf(got), [1, 2, 3, 4, 5]);
  assert.deepEqual(got.map((u) => u.fromHistory), [false, true, true, false, false]);
  assert.equal(c.stats.gaps, 1);
  c.close();
});

test("a reconnect resubscribes from the last offset and reports each channel", async () => {
  const server = new FakeServer();
  const base = server.handler;
  const subscribes: ClientFrame[] = [];
  server.handler = (frame, socket) => {
    if (frame.command.case !== "subscribe") return base(frame, socket);
    subscribes.push(frame);
    const value = frame.command.value;
    const recovered = value.recover && value.channel === "route:1";
    socket.reply(frame.id, {
      case: "subscribe",
      value: {
        subId: value.channel === "route:1" ? 1 : 2, epoch: value.channel === "route:1" ? "e" : "new", offset: 2n, recovered,
        recoveryFailure: value.recover && !recovered ? RecoveryFailure.EPOCH_CHANGED : RecoveryFailure.RECOVERY_FAILURE_NONE,
      },
    });
    if (recovered) socket.push([update(3), update(4)], 1);
  };
  const c = client(server);
  const one: Update[] = [];
  c.subscribe("route:1").on("update", (u) => one.push(u));
  c.subscribe("weather:oslo");
  await within(2000, "connect", c.connect());
  await until(2000, "both subscribed", () => subscribes.length === 2);
  server.last.push([update(3)], 1);
  const reconnected = nextEvent<ClientEvents, "reconnected">(c, "reconnected", 3000);
  const disconnected = nextEvent(c, "disconnected", 3000);
  server.last.disconnect(4001, "slow consumer", true);
  const gone = await disconnected;
  assert.equal(gone.code, 4001);
  assert.equal(gone.name, "slow_consumer");
  assert.equal(gone.willReconnect, true);
  const back = await reconnected;
  const resent = subscribes.slice(2).map((f) => f.command.value as { channel: string; recover: boolean; epoch: string; offset: bigint });
  const positions = resent.map((s) => `${s.channel} recover=${s.recover} ${s.epoch}/${Number(s.offset)}`).sort();
  assert.deepEqual(positions, ["route:1 recover=true e/3", "weather:oslo recover=true new/2"]);
  const byChannel = Object.fromEntries(back.channels.map((r) => [r.channel, r]));
  assert.equal(byChannel["route:1"]!.recovered, true);
  assert.equal(byChannel["weather:oslo"]!.recovered, false);
  assert.equal(byChannel["weather:oslo"]!.failure, "EPOCH_CHANGED");
  await until(2000, "recovered update", () => one.length === 2);
  assert.deepEqual(offsetsOf(one), [3, 4], "offset 3 once, then the recovered 4");
  c.close();
});

test("a 429 is surfaced as rateLimit, waited out and retried in order", async () => {
  const server = serverAt(0);
  const base = server.handler;
  let refused = 0;
  const sentAt: number[] = [];
  server.handler = (frame, socket) => {
    if (frame.command.case !== "publish") return base(frame, socket);
    sentAt.push(Date.now());
    if (refused < 2) {
      refused++;
      socket.reply(frame.id, { case: "error", value: { code: 429, message: "rate limited", retryAfterMs: 150n } });
    } else {
      socket.reply(frame.id, { case: "publish", value: { epoch: "e", offset: BigInt(sentAt.length) } });
    }
  };
  const c = client(server);
  const limits: { retryAfterMs: number; command: string }[] = [];
  c.on("rateLimit", (e) => limits.push(e));
  await within(2000, "connect", c.connect());
  const start = Date.now();
  const first = c.publish("route:1", { type: UpdateType.ROUTE, payload: "a" });
  const second = c.publish("route:1", { type: UpdateType.ROUTE, payload: "b" });
  const results: { offset: number }[] = await within(3000, "publishes", Promise.all([first, second]));
  assert.deepEqual(limits.map((l) => [l.retryAfterMs, l.command]), [[150, "publish"], [150, "publish"]]);
  assert.ok(Date.now() - start >= 140, "waited retry_after_ms");
  assert.ok(sentAt[2]! - sentAt[0]! >= 140, "nothing resent before retry_after_ms");
  assert.deepEqual(results.map((r) => r.offset), [3, 4]);
  c.close();
});

test("a close code that forbids reconnecting is surfaced with its meaning, and no retry follows", async () => {
  const server = new FakeServer();
  server.handler = (frame, socket) => {
    if (frame.command.case === "connect") socket.disconnect(4503, "bad_signature", false);
  };
  const c = client(server);
  const errors: Error[] = [];
  c.on("error", (e) => errors.push(e));
  await assert.rejects(within(2000, "connect", c.connect()), (err: Error) => err instanceof DisconnectedError && err.code === 4503 && /token was refused/.test(err.message));
  await sleep(50);
  assert.equal(server.sockets.length, 1, "no second attempt");
  assert.equal(c.state, "closed");
  assert.ok(errors.some((e) => e instanceof DisconnectedError && e.code === 4503));
});

test("maxRetries ends reconnecting with an error", async () => {
  const server = new FakeServer();
  server.handler = (_frame, socket) => socket.close(1011, "down");
  const c = client(server, { maxRetries: 3 });
  await assert.rejects(within(3000, "connect", c.connect()), /gave up after 3 failed attempts/);
  assert.equal(server.sockets.length, 3);
});

test("a silent server is detected by the heartbeat and the client reconnects", async () => {
  const server = serverAt(0);
  const c = client(server, { heartbeatInterval: 40, heartbeatTimeout: 80 });
  await within(2000, "connect", c.connect());
  // The fake answers no Ping: after heartbeatInterval + heartbeatTimeout the connection is dead.
  const gone = await nextEvent(c, "disconnected", 2000);
  assert.equal(gone.code, 1006);
  assert.match(gone.reason, /no answer to a ping/);
  await nextEvent(c, "connected", 2000);
  assert.ok(server.received.some((f) => f.command.case === "ping"));
  c.close();
});

test("type subscriptions and filters select updates on the client", async () => {
  const server = serverAt(0);
  const c = client(server);
  const incidents: Update[] = [];
  const filtered: Update[] = [];
  c.subscribe([UpdateType.INCIDENT]).on("update", (u) => incidents.push(u));
  c.subscribe("route:1", { filter: { keys: ["k2", "k3"] } }).on("update", (u) => filtered.push(u));
  await within(2000, "connect", c.connect());
  await until(2000, "subscribed", () => server.received.some((f) => f.command.case === "subscribe"));
  await sleep(0);
  server.last.push([update(1, { type: UpdateType.INCIDENT }), update(2), update(3, { type: UpdateType.INCIDENT })], 1);
  assert.deepEqual(offsetsOf(incidents), [1, 3]);
  assert.deepEqual(offsetsOf(filtered), [2, 3]);
  c.close();
});

test("publishes made while offline are sent after the reconnect", async () => {
  const server = serverAt(0);
  const base = server.handler;
  let down = false;
  server.handler = (frame, socket) => {
    if (frame.command.case === "connect" && down) return socket.close(1006, "");
    if (frame.command.case === "publish") return socket.reply(frame.id, { case: "publish", value: { epoch: "e", offset: 1n } });
    base(frame, socket);
  };
  const c = client(server, { backoff: { initial: 30, max: 30, factor: 1 } });
  await within(2000, "connect", c.connect());
  down = true;
  const disconnected = nextEvent(c, "disconnected", 2000);
  server.last.close(1006, "");
  await disconnected;
  const published = c.publish("route:1", { type: UpdateType.ROUTE, payload: { eta: 1 } });
  await sleep(80);
  assert.equal(server.received.filter((f) => f.command.case === "publish").length, 0, "nothing sent while offline");
  down = false;
  const result = await within(2000, "publish after reconnect", published);
  assert.equal(result.offset, 1);
  c.close();
});

test("the token is refreshed in-band before it expires", async () => {
  const server = new FakeServer();
  const refreshes: string[] = [];
  server.handler = (frame, socket: FakeSocket) => {
    const now = Math.floor(Date.now() / 1000);
    if (frame.command.case === "connect") socket.reply(frame.id, { case: "connect", value: { clientId: "c", expiresAtUnix: BigInt(now + 1) } });
    if (frame.command.case === "refresh") {
      refreshes.push(frame.command.value.token);
      socket.reply(frame.id, { case: "refresh", value: { expiresAtUnix: BigInt(now + 3600) } });
    }
  };
  let n = 0;
  const c = client(server, { token: undefined, getToken: () => `token-${++n}`, refreshThreshold: 60_000 });
  await within(2000, "connect", c.connect());
  const refreshed = await nextEvent(c, "tokenRefreshed", 2000);
  assert.ok(refreshed.expiresAtUnix > Date.now() / 1000 + 3000);
  assert.deepEqual(refreshes, ["token-2"]);
  assert.equal(server.sockets.length, 1, "no reconnect");
  c.close();
});
