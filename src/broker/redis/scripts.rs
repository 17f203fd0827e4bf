//! The Lua scripts that make each Redis step atomic, built (and hashed for EVALSHA) once.

use std::sync::LazyLock;

use redis::Script;

/// Shared by the scripts that may be a channel's first use: its epoch, created when missing
/// (KEYS[1] is the channel's meta hash).
const ENSURE_EPOCH: &str = r#"
local function ensure_epoch(new_epoch)
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'ms', 0)
  end
  return epoch
end
"#;

pub(super) static PUBLISH: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{ENSURE_EPOCH}{PUBLISH_BODY}")));
pub(super) static POSITION: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{ENSURE_EPOCH}{POSITION_BODY}")));
pub(super) static HISTORY: LazyLock<Script> = LazyLock::new(|| Script::new(HISTORY_BODY));
pub(super) static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(ACK_BODY));

/// Every script, for loading them when a connection opens.
pub(super) fn all() -> [&'static Script; 4] {
    [&PUBLISH, &POSITION, &HISTORY, &ACK]
}

/// KEYS: meta, history. ARGV: pubsub channel, update without offset, history size, history
/// ttl ms, epoch for a new channel, meta ttl ms, update type. Returns {epoch, offset}.
const PUBLISH_BODY: &str = r#"
local epoch = ensure_epoch(ARGV[5])
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'ms') or '0')
if ms < last then ms = last end
redis.call('HSET', KEYS[1], 'ms', ms)
local size = tonumber(ARGV[3])
if size > 0 then
  local id = string.format('%d-%d', ms, offset)
  local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', size, id, 'b', ARGV[2])
  if type(ok) == 'table' and ok.err then
    -- History from an older epoch with higher ids: it no longer belongs to this channel.
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', size, id, 'b', ARGV[2])
  end
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', ms - tonumber(ARGV[4])))
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[1], epoch .. ':' .. offset .. ':' .. string.format('%d', ms) .. ':' .. ARGV[7] .. ':' .. ARGV[2])
return {epoch, offset}
"#;

/// KEYS: meta, history, acked. ARGV: epoch for a new channel, since epoch ('' = none), since
/// offset, most entries to return, identity to resume ('' = none), meta ttl ms.
/// Returns {epoch, offset, since epoch, since offset, entries newest first}.
const POSITION_BODY: &str = r#"
local epoch = ensure_epoch(ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local since_epoch = ARGV[2]
local since = tonumber(ARGV[3])
if since_epoch == '' and ARGV[5] ~= '' then
  local acked = redis.call('HGET', KEYS[3], ARGV[5])
  if acked then
    since_epoch = epoch
    since = tonumber(acked)
  end
end
local entries = {}
local missed = offset - since
if since_epoch == epoch and missed > 0 and missed <= tonumber(ARGV[4]) then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', missed)
end
return {epoch, offset, since_epoch, since, entries}
"#;

/// KEYS: meta, history. ARGV: since. Returns {epoch, offset, entries newest first}.
const HISTORY_BODY: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local entries = {}
local wanted = offset - tonumber(ARGV[1])
if wanted > 0 then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', wanted)
end
return {epoch, offset, entries}
"#;

/// KEYS: acked. ARGV: identity, offset, most identities, ttl ms. The highest offset wins.
const ACK_BODY: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  if tonumber(ARGV[2]) > tonumber(current) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
elseif redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 0
"#;
