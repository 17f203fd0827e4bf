// End to end in a real browser: Debian's chromium, headless, driven by playwright-core. The
// example page connects to the real server, shows live updates, and survives the server
// being killed and restarted (Redis broker, so the channel's history survives).
import assert from "node:assert/strict";
import { mkdirSync, statSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { after, test } from "node:test";
import { chromium, type Browser, type Page } from "playwright-core";
import { RealTimeClient, UpdateType } from "../../src/index.js";
import { RealtimeServer, RedisServer, token } from "../support/server.js";
import { serveDirectory } from "../support/static-server.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const packageDir = fileURLToPath(new URL("../../..", import.meta.url)).replace(/\/$/, "");
const resultsDir = `${packageDir}/test-results`;
const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

async function listedOffsets(page: Page): Promise<number[]> {
  return page.$$eval("#updates li", (items) => items.map((item) => Number((item as HTMLElement).dataset.offset)));
}

test("the example page shows live updates and survives a server-side disconnect", async () => {
  const redis = await RedisServer.start();
  cleanups.push(() => redis.stop());
  let node = await RealtimeServer.start({ broker: redis.url });
  cleanups.push(() => node.stop());
  const other = await RealtimeServer.start({ broker: redis.url });
  cleanups.push(() => other.stop());
  const site = await serveDirectory(packageDir);
  cleanups.push(() => site.close());

  const publisher = new RealTimeClient({ url: other.url, token: token("backend"), logger: { debug() {}, info() {}, warn() {}, error() {} } });
  cleanups.push(() => publisher.close());
  await publisher.connect();
  const publish = (n: number) => publisher.publish("route:e2e", { type: UpdateType.ROUTE, key: `leg-${n}`, payload: JSON.stringify({ eta: n * 60 }) });

  const browser: Browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"], timeout: 60_000 });
  cleanups.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const consoleErrors: string[] = [];
  page.on("pageerror", (err) => consoleErrors.push(String(err)));
  const query = new URLSearchParams({ server: node.url, token: token("alice"), channel: "route:e2e" });
  await page.goto(`${site.url}/example/index.html?${query}`, { timeout: 30_000 });
  await page.waitForSelector('#status[data-state="connected"]', { timeout: 15_000 });
  // The subscription is confirmed before anything is published, so nothing is missed.
  await page.waitForFunction(() => (window as unknown as { realtime: { stats: { messages: number } } }).realtime.stats.messages >= 2, undefined, { timeout: 15_000 });

  for (const n of [1, 2, 3]) await publish(n);
  await page.waitForFunction(() => document.querySelectorAll("#updates li").length === 3, undefined, { timeout: 15_000 });

  await node.stop("SIGKILL");
  await page.waitForSelector('#status[data-state="reconnecting"]', { timeout: 15_000 });
  for (const n of [4, 5, 6]) await publish(n);
  node = await RealtimeServer.start({ broker: redis.url, listen: node.addr });
  await page.waitForSelector('#status[data-state="connected"]', { timeout: 30_000 });
  await publish(7);
  try {
    await page.waitForFunction(() => document.querySelectorAll("#updates li").length >= 7, undefined, { timeout: 15_000 });
  } catch (err) {
    // What the page and the restarted server saw, so that a failure here can be told apart.
    const events = await page.$$eval("#events li", (items) => items.map((item) => item.textContent ?? ""));
    throw new Error(
      `${err}\nlisted offsets: ${JSON.stringify(await listedOffsets(page))}\npage events:\n${events.join("\n")}\n` +
        `restarted server's log (tail):\n${node.log().slice(-4000)}`,
    );
  }

  assert.deepEqual(await listedOffsets(page), [1, 2, 3, 4, 5, 6, 7]);
  assert.equal(await page.textContent("#updates li:last-child .payload"), '{"eta":420}');
  const events = await page.$$eval("#events li", (items) => items.map((item) => item.textContent ?? ""));
  assert.ok(events.some((e) => /disconnected: 1006/.test(e)), events.join("\n"));
  assert.ok(events.some((e) => /reconnected after \d+ attempt\(s\): route:e2e recovered/.test(e)), events.join("\n"));
  assert.deepEqual(consoleErrors, []);

  mkdirSync(resultsDir, { recursive: true });
  const screenshot = `${resultsDir}/example-page.png`;
  await page.screenshot({ path: screenshot, fullPage: true });
  assert.ok(statSync(screenshot).size > 1000, "a screenshot was written");
});
