-- cachefence fence script v3
local op = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local function fmt(n) return string.format('%.0f', n) end

-- The proxy's own keys (fences): `cachefence:{...` and `cachefence::...`.
local function is_fence(name)
  local prefix = string.sub(name, 1, 12)
  return prefix == 'cachefence:{' or prefix == 'cachefence::'
end

-- A fresh version; `invalidated` also records the invalidation time. The
-- herd lease goes, and so does `gone` (a consumed miss) if given. `current`
-- is the version when the caller has read it already (one call less).
local function bump(fence, ttl_ms, invalidated, current, gone)
  local v = tonumber(current or redis.call('HGET', fence, 'v') or '0')
  local nv = fmt(math.max(now, v + 1))
  if invalidated then
    redis.call('HSET', fence, 'v', nv, 't', fmt(now))
  else
    redis.call('HSET', fence, 'v', nv)
  end
  if gone then
    redis.call('HDEL', fence, 'h', 'he', gone)
  else
    redis.call('HDEL', fence, 'h', 'he')
  end
  redis.call('PEXPIRE', fence, ttl_ms)
  return nv
end

-- Outstanding misses are fields of the fence: `m|<client ip>|<proxy
-- instance>:<connection>|<miss>` = `<version>:<miss time µs>`. A scope is a
-- prefix of that name ('m|' every client, 'm|<ip>|' one client address,
-- 'm|<ip>|<instance>:<connection>|' one connection).
local function misses(fence, prefix, lease_us, f)
  local live, old = {}, {}
  for i = 1, #f, 2 do
    local name = f[i]
    if string.sub(name, 1, 2) == 'm|' then
      local version, at = string.match(f[i + 1], '^(%d+):(%d+)$')
      local age = now - tonumber(at or '0')
      if age > 2 * lease_us then
        redis.call('HDEL', fence, name)
      elseif string.sub(name, 1, #prefix) == prefix then
        local miss = {name = name, v = tonumber(version), at = tonumber(at)}
        if age > lease_us then old[#old + 1] = miss else live[#live + 1] = miss end
      end
    end
  end
  return live, old
end

local function newest(list)
  local best = list[1]
  for i = 2, #list do
    local m = list[i]
    if m.v > best.v or (m.v == best.v and m.at > best.at) then best = m end
  end
  return best
end

-- Runs the client's command, ARGV[from] onwards. Lua's unpack stops near
-- 8000 values, so a DEL, UNLINK or MSET with more arguments runs in chunks,
-- still inside this one atomic script; DEL and UNLINK add up their counts.
local function run_command(from)
  local last = #ARGV
  local name = string.upper(ARGV[from])
  if last - from < 7000 or (name ~= 'DEL' and name ~= 'UNLINK' and name ~= 'MSET') then
    return redis.pcall(unpack(ARGV, from, last))
  end
  local total, reply = 0, nil
  -- Chunks of 6000 arguments keep MSET's pairs whole.
  for i = from + 1, last, 6000 do
    reply = redis.pcall(name, unpack(ARGV, i, math.min(i + 5999, last)))
    if type(reply) == 'table' and reply.err then return reply end
    if name ~= 'MSET' then total = total + reply end
  end
  if name == 'MSET' then return reply end
  return total
end

-- Stores a fill: SET KEYS[1] to ARGV[value_at] with the client's expiry
-- words ARGV[first..last], unless the lag rule (C2) refuses it: a miss at
-- `miss_at` less than `lag` after the key's last invalidation is stored with
-- a TTL ending `lag` after that invalidation (the client's own expiry
-- stands if it ends sooner), or refused with `lag_refuse`. The stored fill
-- moves the fence (first fill wins). Returns nil when stored, else why not
-- ('lag_window', 'nx') or Redis' error. `current` and `gone` go to bump.
local function store_fill(value_at, first, last, miss_at, invalidated, lag, lag_refuse, nx, current, gone)
  local args = {'SET', KEYS[1], ARGV[value_at]}
  for i = first, last do args[#args + 1] = ARGV[i] end
  if lag > 0 and invalidated > 0 and miss_at - invalidated < lag then
    if lag_refuse then return 'lag_window' end
    local lag_end = invalidated + lag
    if lag_end <= now then return 'lag_window' end
    local ends = math.huge
    for i = first, last - 1 do
      local w, n = string.upper(ARGV[i]), tonumber(ARGV[i + 1])
      if w == 'EX' then ends = now + n * 1000000
      elseif w == 'PX' then ends = now + n * 1000
      elseif w == 'EXAT' then ends = n * 1000000
      elseif w == 'PXAT' then ends = n * 1000 end
    end
    if lag_end < ends then
      args = {'SET', KEYS[1], ARGV[value_at], 'PXAT', fmt(math.ceil(lag_end / 1000))}
    end
  end
  if nx then args[#args + 1] = 'NX' end
  local stored = redis.pcall(unpack(args))
  if type(stored) == 'table' and stored.err then return stored end
  if not stored then return 'nx' end
  bump(KEYS[2], ARGV[2], false, current, gone)
  return nil
end

-- The reply to a fill from `store_fill`'s verdict; `refuse` gives the herd
-- lease back.
local function fill_reply(verdict, refuse)
  if verdict == nil then return {1} end
  if type(verdict) == 'table' then return verdict end
  if verdict == 'nx' then
    refuse('nx')
    return {2}
  end
  return refuse(verdict)
end

if op == 'miss' then
  -- KEYS: key, fence. ARGV: op, fence_ttl_ms, lease_holder, lease_ms, claim
  -- (wait|alone|force), the miss's field ('' for the lease API, whose token
  -- is the ticket), lease_ttl_us, the connection's holder prefix.
  local value = redis.call('GET', KEYS[1])
  if value then return {1, value} end
  local f = redis.call('HMGET', KEYS[2], 'v', 't', 'h', 'he')
  local v, t = f[1], f[2] or '0'
  -- Every field this miss writes goes in one HSET.
  local writes = {}
  if not v then
    v = fmt(now)
    t = '0'
    writes = {'v', v, 't', t}
  end
  local leader = 0
  local free = (not f[3]) or tonumber(f[4] or '0') <= now or f[3] == ARGV[3]
  -- 'alone': the client has nothing else in flight on this connection, so
  -- if the lease holder is an earlier miss of the same connection its fill
  -- can only come after this reply (a client that sends one request at a
  -- time): waiting would stall the connection for the whole hold.
  local own = ARGV[5] == 'alone' and f[3] ~= nil and f[3] ~= false
    and string.sub(f[3], 1, #ARGV[8]) == ARGV[8]
  if free or ARGV[5] == 'force' or own then
    if free then
      writes[#writes + 1] = 'h'
      writes[#writes + 1] = ARGV[3]
      writes[#writes + 1] = 'he'
      writes[#writes + 1] = fmt(now + tonumber(ARGV[4]) * 1000)
    end
    leader = 1
    -- Only a miss that goes to the database is outstanding.
    if ARGV[6] ~= '' then
      -- Misses that were never filled pile up (a row that does not
      -- exist): their leader's herd lease lapsed instead of going with a
      -- fill, so that is when expired ones are swept.
      if f[3] and tonumber(f[4] or '0') <= now then
        misses(KEYS[2], 'm|', tonumber(ARGV[7]), redis.call('HGETALL', KEYS[2]))
      end
      writes[#writes + 1] = ARGV[6]
      writes[#writes + 1] = v .. ':' .. fmt(now)
    end
  end
  if #writes > 0 then redis.call('HSET', KEYS[2], unpack(writes)) end
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
  if f[1] ~= ARGV[3] then return refuse('fence_moved') end
  if now - tonumber(ARGV[4]) > tonumber(ARGV[9]) then return refuse('expired') end
  local verdict = store_fill(10, 11, #ARGV, tonumber(ARGV[4]), tonumber(f[2] or '0'),
    tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7] == '1', f[1])
  return fill_reply(verdict, refuse)
elseif op == 'set' then
  -- A plain store of a fenced key whose miss, if any, the proxy cannot name
  -- (pooled and multiplexed clients): a fill if a miss is outstanding in
  -- the scope, judged by the OLDEST one and consuming the NEWEST; else a
  -- write per on_write.
  -- KEYS: key, fence. ARGV: op, fence_ttl_ms, scope prefix, lease_us,
  -- lag_us, lag_refuse, nx, expect_fence, on_write (write|inval|reject),
  -- pending_delete, value, count of expiry words, the expiry words, then
  -- the client's command.
  local f = redis.call('HGETALL', KEYS[2])
  local fields = {}
  for i = 1, #f, 2 do fields[f[i]] = f[i + 1] end
  local words = 12 + tonumber(ARGV[12])
  -- A key with no fence has no miss outstanding: a write need not create
  -- one, unless the lag window (C2) needs its invalidation time.
  local keep = fields.v or tonumber(ARGV[5]) > 0
  local function write()
    if ARGV[9] == 'reject' then return {5} end
    if ARGV[9] == 'inval' then
      redis.call('DEL', KEYS[1])
      if keep then bump(KEYS[2], ARGV[2], true, fields.v or '0') end
      return {4}
    end
    local reply = run_command(words + 1)
    if type(reply) == 'table' and reply.err then return reply end
    if keep then bump(KEYS[2], ARGV[2], true, fields.v or '0') end
    return {3, reply}
  end
  if not fields.v then
    -- A fence lost between a miss here and this SET: nothing proves it fresh.
    if ARGV[8] == '1' then return {0, 'fence_missing'} end
    return write()
  end
  local live, old = misses(KEYS[2], ARGV[3], tonumber(ARGV[4]), f)
  if #live == 0 and #old == 0 then return write() end
  local consumed = newest(#live > 0 and live or old)
  local function refuse(reason)
    -- The consumed miss goes; its herd lease goes back, so waiters stop waiting.
    local connection, miss = string.match(consumed.name, '|([^|]*)|([^|]*)$')
    if fields.h and fields.h == connection .. ':' .. miss then
      redis.call('HDEL', KEYS[2], consumed.name, 'h', 'he')
    else
      redis.call('HDEL', KEYS[2], consumed.name)
    end
    return {0, reason}
  end
  if ARGV[10] == '1' then return refuse('pending_delete') end
  if #live == 0 then return refuse('expired') end
  local oldest = live[1]
  for i = 2, #live do
    local m = live[i]
    if m.v < oldest.v or (m.v == oldest.v and m.at < oldest.at) then oldest = m end
  end
  local version = tonumber(fields.v)
  if oldest.v ~= version then
    if consumed.v == version then return refuse('older_miss_outstanding') end
    return refuse('fence_moved')
  end
  local verdict = store_fill(11, 13, words, oldest.at, tonumber(fields.t or '0'),
    tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7] == '1', fields.v, consumed.name)
  return fill_reply(verdict, refuse)
elseif op == 'write' or op == 'inval' then
  -- KEYS: the command's keys, then the fences of the fenced ones.
  -- ARGV: op, fence_ttl_ms, fenced_count, create ('1': a missing fence is
  -- created, for the lag window's invalidation time), the command and its
  -- arguments. A key with no fence has no miss outstanding, so without a
  -- lag window nothing needs one. Without a command (inside MULTI, right
  -- behind the client's own write), only the fences move.
  local fenced = tonumber(ARGV[3])
  local reply = 0
  if #ARGV >= 5 then reply = run_command(5) end
  if type(reply) == 'table' and reply.err then return reply end
  for i = #KEYS - fenced + 1, #KEYS do
    local v = redis.call('HGET', KEYS[i], 'v')
    if v or ARGV[4] == '1' then bump(KEYS[i], ARGV[2], true, v or '0') end
  end
  return reply
elseif op == 'randomkey' then
  -- RANDOMKEY without the proxy's own keys. ARGV: op, draws, scan calls.
  -- Random draws first; if they all find fences, a bounded SCAN for any
  -- other key; nil if none was found.
  for _ = 1, tonumber(ARGV[2]) do
    local name = redis.call('RANDOMKEY')
    if not name then return false end
    if not is_fence(name) then return name end
  end
  local cursor = '0'
  for _ = 1, tonumber(ARGV[3]) do
    local batch = redis.call('SCAN', cursor, 'COUNT', 100)
    for _, name in ipairs(batch[2]) do
      if not is_fence(name) then return name end
    end
    cursor = batch[1]
    if cursor == '0' then return false end
  end
  return false
elseif op == 'peek' then
  -- KEYS: fence. For CACHE.FENCE.
  local f = redis.call('HMGET', KEYS[1], 'v', 't', 'h', 'he')
  local outstanding = 0
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(name, 1, 2) == 'm|' then outstanding = outstanding + 1 end
  end
  return {f[1] or false, f[2] or false, f[3] or false, f[4] or false, fmt(now), redis.call('PTTL', KEYS[1]), outstanding}
end
return redis.error_reply('ERR cachefence: unknown fence op ' .. tostring(op))
