-- cachefence fence script v1
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
