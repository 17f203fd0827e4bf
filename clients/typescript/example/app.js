// The example page: one channel's updates as a live list, and the connection's events.
// Query string: ?server=ws://HOST:PORT/ws&token=JWT&channel=route:42
// (A real app gets its token from its own auth backend, through `getToken`.)
import { RealTimeClient } from "../dist/browser/realtime.js";

const params = new URLSearchParams(location.search);
const channel = params.get("channel") ?? "route:42";
const $ = (id) => document.getElementById(id);
$("channel").textContent = channel;

const client = new RealTimeClient({
  url: params.get("server") ?? `ws://${location.hostname}:3000/ws`,
  getToken: async () => params.get("token") ?? "",
  backoff: { initial: 250, max: 2000, factor: 2 },
});

function showState() {
  $("status").textContent = client.state;
  $("status").dataset.state = client.state;
}

function logEvent(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").prepend(item);
}

client.on("connected", (e) => { showState(); logEvent(`connected as ${e.clientId}`); });
client.on("disconnected", (e) => { showState(); logEvent(`disconnected: ${e.code} ${e.name} (${e.meaning})`); });
client.on("reconnected", (e) => {
  showState();
  const channels = e.channels.map((c) => `${c.channel} ${c.recovered ? "recovered" : `not recovered: ${c.failure}`}`);
  logEvent(`reconnected after ${e.attempts} attempt(s): ${channels.join(", ")}`);
});
client.on("rateLimit", (e) => logEvent(`rate limited: retry in ${e.retryAfterMs} ms`));
client.on("error", (e) => { showState(); logEvent(`error: ${e.message}`); });

const subscription = client.subscribe(channel);
subscription.on("update", (update) => {
  const item = document.createElement("li");
  item.dataset.offset = String(update.offset);
  for (const [name, text] of [["offset", `#${update.offset}`], ["type", update.typeName], ["key", update.key], ["payload", update.text()]]) {
    const cell = document.createElement("span");
    cell.className = name;
    cell.textContent = text;
    item.append(cell);
  }
  $("updates").append(item);
  $("count").textContent = String($("updates").children.length);
});

showState();
client.connect().catch((err) => logEvent(`could not connect: ${err.message}`));
// A handle for the browser's console.
window.realtime = client;
