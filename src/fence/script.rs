//! The fence script: every fence operation is one atomic call of this Lua
//! script, loaded once per upstream connection and called with `EVALSHA`.
//!
//! A fence is a hash next to its key (same hash slot) with fields
//! - `v`: the version, Redis `TIME` in µs or the previous version + 1,
//!   whichever is larger, so it never repeats (C5);
//! - `t`: when the key was last invalidated (Redis `TIME`, µs; `0` never);
//! - `h`, `he`: the herd lease holder and its expiry (µs).
//!
//! Numbers stay below 2^53 so Lua's doubles hold them exactly; they are
//! written with `%.0f` and versions are compared as strings.

use bytes::Bytes;

use crate::resp::encode::command;

pub const SOURCE: &str = r#"-- cachefence fence script v1
local op = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local function fmt(n) return string.format('%.0f', n) end

-- A fresh version; `invalidated` also records the invalidation time.
local function bump(fence, ttl_ms, invalidated)
  local v = tonumber(redis.call('HGET', fence, 'v') or '0')
  local nv = fmt(math.max(now, v + 1))
  if invalidated then
    redis.call('HSET', fence, 'v', nv, 't', fmt(now))
  else
    redis.call('HSET', fence, 'v', nv)
  end
  redis.call('HDEL', fence, 'h', 'he')
  redis.call('PEXPIRE', fence, ttl_ms)
  return nv
end

if op == 'miss' then
  -- KEYS: key, fence. ARGV: op, fence_ttl_ms, lease_holder, lease_ms, claim
  local value = redis.call('GET', KEYS[1])
  if value then return {1, value} end
  local f = redis.call('HMGET', KEYS[2], 'v', 't', 'h', 'he')
  local v, t = f[1], f[2] or '0'
  if not v then
    v = fmt(now)
    t = '0'
    redis.call('HSET', KEYS[2], 'v', v, 't', t)
  end
  local leader = 0
  local free = (not f[3]) or tonumber(f[4] or '0') <= now or f[3] == ARGV[3]
  if free or ARGV[5] == 'force' then
    if free then
      redis.call('HSET', KEYS[2], 'h', ARGV[3], 'he', fmt(now + tonumber(ARGV[4]) * 1000))
    end
    leader = 1
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {0, v, t, fmt(now), leader}
elseif op == 'fill' then
  -- KEYS: key, fence. ARGV: op, fence_ttl_ms, version, miss_us, lag_us,
  -- lag_refuse, nx, lease_holder, lease_us, value, then the client's
  -- expiry words.
  local f = redis.call('HMGET', KEYS[2], 'v', 't', 'h')
  if not f[1] then return {0, 'fence_missing'} end
  -- A refused fill hands the herd lease back, so waiters stop waiting.
  local function refuse(reason)
    if f[3] == ARGV[8] then redis.call('HDEL', KEYS[2], 'h', 'he') end
    return {0, reason}
  end
  local function refuse_nx()
    refuse('nx')
    return {2}
  end
  if f[1] ~= ARGV[3] then return refuse('fence_moved') end
  if now - tonumber(ARGV[4]) > tonumber(ARGV[9]) then return refuse('expired') end
  local args = {'SET', KEYS[1], ARGV[10]}
  for i = 11, #ARGV do args[#args + 1] = ARGV[i] end
  local lag = tonumber(ARGV[5])
  local invalidated = tonumber(f[2] or '0')
  if lag > 0 and invalidated > 0 and tonumber(ARGV[4]) - invalidated < lag then
    if ARGV[6] == '1' then return refuse('lag_window') end
    local lag_end = invalidated + lag
    if lag_end <= now then return refuse('lag_window') end
    -- The client's own expiry, if it ends sooner, stands.
    local ends = math.huge
    for i = 11, #ARGV - 1 do
      local w, n = string.upper(ARGV[i]), tonumber(ARGV[i + 1])
      if w == 'EX' then ends = now + n * 1000000
      elseif w == 'PX' then ends = now + n * 1000
      elseif w == 'EXAT' then ends = n * 1000000
      elseif w == 'PXAT' then ends = n * 1000 end
    end
    if lag_end < ends then
      args = {'SET', KEYS[1], ARGV[10], 'PXAT', fmt(math.ceil(lag_end / 1000))}
    end
  end
  if ARGV[7] == '1' then args[#args + 1] = 'NX' end
  local stored = redis.pcall(unpack(args))
  if type(stored) == 'table' and stored.err then return stored end
  if not stored then return refuse_nx() end
  bump(KEYS[2], ARGV[2], false)
  return {1}
elseif op == 'write' or op == 'inval' then
  -- KEYS: the command's keys, then the fences of the fenced ones.
  -- ARGV: op, fence_ttl_ms, fenced_count, the command and its arguments.
  local fenced = tonumber(ARGV[3])
  local reply = redis.pcall(unpack(ARGV, 4))
  if type(reply) == 'table' and reply.err then return reply end
  for i = #KEYS - fenced + 1, #KEYS do bump(KEYS[i], ARGV[2], true) end
  return reply
elseif op == 'peek' then
  -- KEYS: fence. For CACHE.FENCE.
  local f = redis.call('HMGET', KEYS[1], 'v', 't', 'h', 'he')
  return {f[1] or false, f[2] or false, f[3] or false, f[4] or false, fmt(now), redis.call('PTTL', KEYS[1])}
end
return redis.error_reply('ERR cachefence: unknown fence op ' .. tostring(op))
"#;

/// The script's SHA-1, as `EVALSHA` wants it.
pub fn sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| sha1_smol::Sha1::from(SOURCE).digest().to_string())
}

/// `EVALSHA <sha> <numkeys> keys… args…`.
pub fn call(keys: &[&[u8]], args: &[&[u8]]) -> Bytes {
    let numkeys = keys.len().to_string();
    let mut words: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    words.extend([b"EVALSHA".as_slice(), sha().as_bytes(), numkeys.as_bytes()]);
    words.extend(keys);
    words.extend(args);
    command(&words)
}

/// The same call with the script's source (`EVAL`), after a `NOSCRIPT`.
pub fn call_with_source(keys: &[&[u8]], args: &[&[u8]]) -> Bytes {
    let numkeys = keys.len().to_string();
    let mut words: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    words.extend([b"EVAL".as_slice(), SOURCE.as_bytes(), numkeys.as_bytes()]);
    words.extend(keys);
    words.extend(args);
    command(&words)
}

/// Keys and arguments of an invalidation: `DEL keys` and every key's fence
/// moved (its invalidation time recorded), atomically.
pub fn invalidation(keys: &[Bytes], fence_ttl: std::time::Duration) -> (Vec<Bytes>, Vec<Bytes>) {
    let mut all = keys.to_vec();
    all.extend(keys.iter().map(|k| Bytes::from(fence_key(k))));
    let mut args = vec![
        Bytes::from_static(b"inval"),
        super::millis(fence_ttl).into(),
        keys.len().to_string().into(),
        Bytes::from_static(b"DEL"),
    ];
    args.extend(keys.iter().cloned());
    (all, args)
}

/// The fence key of `key`: in the key's hash slot (its `{tag}` if it has
/// one, else the whole key as the tag), under a prefix of its own.
pub fn fence_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 16);
    match hash_tag(key) {
        Some(tag) => {
            out.extend_from_slice(b"cachefence:{");
            out.extend_from_slice(tag);
            out.extend_from_slice(b"}:");
            out.extend_from_slice(key);
        }
        // A key with a `}` but no tag cannot be wrapped into a tag; outside
        // Redis Cluster the slot does not matter.
        None if key.contains(&b'}') => {
            out.extend_from_slice(b"cachefence::");
            out.extend_from_slice(key);
        }
        None => {
            out.extend_from_slice(b"cachefence:{");
            out.extend_from_slice(key);
            out.extend_from_slice(b"}");
        }
    }
    out
}

/// Redis Cluster's hash tag: the bytes between the first `{` and the next
/// `}`, if not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_share_the_keys_hash_slot() {
        assert_eq!(fence_key(b"user:42"), b"cachefence:{user:42}".to_vec());
        assert_eq!(
            fence_key(b"user:{42}:name"),
            b"cachefence:{42}:user:{42}:name".to_vec()
        );
        assert_eq!(fence_key(b"odd{}key"), b"cachefence::odd{}key".to_vec());
        let crc = |k: &[u8]| redis_protocol::redis_keyslot(k);
        for key in [&b"user:42"[..], b"user:{42}:name", b"a{b}c{d}"] {
            assert_eq!(crc(&fence_key(key)), crc(key), "{key:?}");
        }
    }

    #[test]
    fn calls_name_the_script_by_sha() {
        assert_eq!(sha().len(), 40);
        let c = call(&[b"k", b"f"], &[b"miss"]);
        assert!(c.starts_with(b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n"));
    }
}
