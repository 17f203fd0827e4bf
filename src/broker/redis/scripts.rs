//! The Lua scripts that make each Redis step atomic, built (and hashed for EVALSHA) once.
//!
//! Every script that hands out or reads a position first checks that the channel's history
//! can still be trusted (`current_epoch`): an offset is never handed out twice in one epoch,
//! even when Redis comes back older than what was acknowledged.

use std::sync::LazyLock;

use redis::Script;

/// Shared by the scripts that may hand out a position (KEYS[1] meta, KEYS[2] history,
/// KEYS[3] acked; `pubsub` is where other nodes hear of a new epoch). The channel's epoch,
/// started anew (offset 0, history and acked positions dropped) when:
/// - the channel has none (first use, or Redis lost it);
/// - a node knows a later offset of this epoch than Redis holds (`known_epoch`,
///   `known_offset`): Redis came back from an older snapshot or a replica that was behind;
/// - Redis restarted (or failed over) since the channel was last written (`run`, the
///   incarnation the node connected to) and restarts are not trusted (`trust` = '0'): what
///   it reloaded may be older than what it acknowledged, and no node may know.
///
/// A new epoch of an existing channel is announced on `pubsub` with offset 0, so every node
/// closes its subscribers of the old one (4003) at once.
const CURRENT_EPOCH: &str = r#"
local function new_epoch_of(epoch, run, ms)
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'ms', ms, 'run', run)
  redis.call('DEL', KEYS[2], KEYS[3])
end
-- Returns the epoch and the channel's last publication time (ms).
local function current_epoch(new_epoch, run, trust, known_epoch, known_offset, pubsub)
  local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'run', 'ms')
  local epoch, offset, last_run, ms = meta[1], tonumber(meta[2] or '0'), meta[3], meta[4] or '0'
  if not epoch then
    new_epoch_of(new_epoch, run, 0)
    return new_epoch, 0
  end
  local behind = known_epoch == epoch and offset < tonumber(known_offset)
  local restarted = last_run ~= run and trust ~= '1'
  if behind or restarted then
    new_epoch_of(new_epoch, run, ms)
    redis.call('PUBLISH', pubsub, new_epoch .. ':0:0:0:')
    return new_epoch, tonumber(ms)
  end
  if last_run ~= run then redis.call('HSET', KEYS[1], 'run', run) end
  return epoch, tonumber(ms)
end
"#;

pub(super) static PUBLISH: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CURRENT_EPOCH}{PUBLISH_BODY}")));
pub(super) static POSITION: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{CURRENT_EPOCH}{POSITION_BODY}")));
pub(super) static HISTORY: LazyLock<Script> = LazyLock::new(|| Script::new(HISTORY_BODY));
pub(super) static ACK: LazyLock<Script> = LazyLock::new(|| Script::new(ACK_BODY));

/// Every script, for loading them when a connection opens.
pub(super) fn all() -> [&'static Script; 4] {
    [&PUBLISH, &POSITION, &HISTORY, &ACK]
}

/// KEYS: meta, history, acked. ARGV: pubsub channel, update without offset, history size,
/// history ttl ms, epoch if a new one starts, meta ttl ms, update type, then the trust
/// arguments of `current_epoch` (run, trust, known epoch, known offset). Returns {epoch, offset}.
const PUBLISH_BODY: &str = r#"
local epoch, last = current_epoch(ARGV[5], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[1])
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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

/// KEYS: meta, history, acked. ARGV: epoch if a new one starts, since epoch ('' = none),
/// since offset, most entries to return, identity to resume ('' = none), meta ttl ms, pubsub
/// channel, then the trust arguments of `current_epoch`.
/// Returns {epoch, offset, since epoch, since offset, entries newest first}.
const POSITION_BODY: &str = r#"
local epoch = current_epoch(ARGV[1], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local since_epoch = ARGV[2]
local since = tonumber(ARGV[3])
if since_epoch == '' and ARGV[5] ~= '' then
  local acked = redis.call('HGET', KEYS[3], ARGV[5])
  if acked then
    local at = string.find(acked, ':', 1, true)
    if at and string.sub(acked, 1, at - 1) == epoch then
      since_epoch = epoch
      since = tonumber(string.sub(acked, at + 1))
    end
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

/// KEYS: meta, acked. ARGV: identity, epoch, offset, most identities, ttl ms. Kept as
/// `epoch:offset`, only for the channel's current epoch and never beyond its offset; within
/// an epoch the highest offset wins.
const ACK_BODY: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if meta[1] ~= ARGV[2] then return 0 end
local offset = math.min(tonumber(ARGV[3]), tonumber(meta[2]))
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current then
  local at = string.find(current, ':', 1, true)
  if at and string.sub(current, 1, at - 1) == ARGV[2] and tonumber(string.sub(current, at + 1)) >= offset then
    return 0
  end
elseif redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. offset)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 0
"#;
