import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { backoffDelay, DEFAULT_BACKOFF } from "../../src/backoff.js";
import { CLOSE_CODES, describeCloseCode, ERROR_CODES } from "../../src/codes.js";
import { classifyOffset } from "../../src/sequence.js";
import { passes } from "../../src/subscription.js";
import { Update } from "../../src/update.js";
import { UpdateType } from "../../src/gen/realtime_pb.js";

const readme = readFileSync(new URL("../../../../../docs/protocol.md", import.meta.url), "utf8");

/** Rows of the protocol reference's table under `heading`: first cells, with the rest. */
function tableRows(heading: string): string[][] {
  const start = readme.indexOf(heading);
  assert.ok(start >= 0, `docs/protocol.md has "${heading}"`);
  const rows: string[][] = [];
  for (const line of readme.slice(start).split("\n").slice(1)) {
    if (!line.startsWith("|")) {
      if (rows.length > 0) break;
      continue;
    }
    const cells = line.split("|").slice(1, -1).map((cell) => cell.trim());
    if (/^\d+$/.test(cells[0]!)) rows.push(cells);
  }
  return rows;
}

test("every close code of docs/protocol.md is known, with the same reconnect advice", () => {
  const rows = tableRows("### Close codes");
  assert.ok(rows.length >= 15, `found ${rows.length} close codes`);
  for (const [code, reconnect] of rows) {
    const known = CLOSE_CODES[Number(code)];
    assert.ok(known, `close code ${code} is in CLOSE_CODES`);
    assert.equal(known.reconnect, reconnect === "yes", `reconnect advice of ${code}`);
  }
});

test("every error code of docs/protocol.md has a meaning", () => {
  for (const [code] of tableRows("### Error codes")) assert.ok(ERROR_CODES[Number(code)], `error code ${code}`);
});

test("unknown close codes follow the protocol's ranges", () => {
  assert.equal(describeCloseCode(4321).reconnect, true);
  assert.equal(describeCloseCode(4777).reconnect, false);
});

test("backoff grows by its factor, stops at max and jitters within the upper half", () => {
  assert.equal(backoffDelay(DEFAULT_BACKOFF, 0, 1), 1000);
  assert.equal(backoffDelay(DEFAULT_BACKOFF, 3, 1), 8000);
  assert.equal(backoffDelay(DEFAULT_BACKOFF, 10, 1), 30_000);
  assert.equal(backoffDelay(DEFAULT_BACKOFF, 3, 0), 4000);
  const jittered = backoffDelay({ initial: 100, max: 1000, factor: 3 }, 1, 0.5);
  assert.equal(jittered, 225);
});

test("offsets classify as next, duplicate or gap, and skipped updates are no gap", () => {
  assert.equal(classifyOffset(10, 11, 0), "next");
  assert.equal(classifyOffset(10, 10, 0), "duplicate");
  assert.equal(classifyOffset(10, 3, 0), "duplicate");
  assert.equal(classifyOffset(10, 12, 0), "gap");
  assert.equal(classifyOffset(0, 1, 0), "next");
  assert.equal(classifyOffset(10, 14, 3), "next");
  assert.equal(classifyOffset(10, 14, 2), "gap");
});

test("filters pass by type, key, confidence or a function", () => {
  const update = new Update("route:1", "e", 1, UpdateType.TRAFFIC, "a", 0.5, 0n, new Uint8Array(), 0, false);
  assert.equal(passes(undefined, update), true);
  assert.equal(passes({ types: [UpdateType.TRAFFIC] }, update), true);
  assert.equal(passes({ types: [UpdateType.ROUTE] }, update), false);
  assert.equal(passes({ keys: ["b"] }, update), false);
  assert.equal(passes({ minConfidence: 0.6 }, update), false);
  assert.equal(passes((u) => u.key === "a", update), true);
});

test("updates decode their payload as text or JSON and name their type", () => {
  const payload = new TextEncoder().encode('{"eta":300}');
  const update = new Update("route:1", "e", 7, UpdateType.ROUTE, "leg", 1, 1_700_000_000_000_000n, payload, 0, false);
  assert.deepEqual(update.json(), { eta: 300 });
  assert.equal(update.typeName, "ROUTE");
  assert.equal(update.timestamp.getTime(), 1_700_000_000_000);
});
