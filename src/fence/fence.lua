-- cachefence fence script v6
-- v6 (#19) lets a `set` call bound its tickets apart from its lease
-- (`<lease>,<bound>` after a failover): a v5 proxy cannot read that.
-- v5 (#16) adds the previous invalidation's time to a fence (`|<p>`): a
-- proxy of v4 would read such a fence as having no misses. Proxies of
-- different versions must not share one Redis: stop the old ones first.
-- The keys and arguments of the operation being run: the call's own, or,
-- in a batch (at the end), each operation's share of them in turn.
local K, A = KEYS, ARGV
-- Times in a fence have 16 digits: µs since 1970 do from 2001 to 2286, and
-- 0 (never) is written as 16 zeros. Fixed widths let `load` and `scan` cut
-- fields with string.sub, and compare them as strings. In a script this
-- short, turning numbers into strings and back is what costs (string.format
-- about 0.4 µs, tonumber 0.1 µs, a concatenation or string.sub 0.05 µs:
-- bench/lua_costs.py), so both are kept off the paths every miss and fill
-- take.
-- Redis' clock is read once, at the first operation that needs it (`TIME`
-- costs about 0.5 µs): a write or an invalidation of a key with no fence,
-- the most common fenced command, needs none. The script is atomic, so
-- when in it the clock is read changes nothing.
local clock, now, now16
local function time_us()
  if not now then
    clock = redis.call('TIME')
    now = clock[1] * 1000000 + clock[2]
  end
  return now
end
-- The same time as 16 digits, made only where a time is written or
-- compared as a string (a fill that deletes its fence never needs it).
local function stamp()
  if not now16 then
    time_us()
    now16 = clock[1] .. string.sub('00000' .. clock[2], -6)
  end
  return now16
end
local zero = '0000000000000000'

-- The short paths: the three operations nearly every fenced command is,
-- done with Redis' commands and a few string cuts, without the helpers
-- below (`library`). A script call makes every local function it runs
-- past anew, and making those and running through them cost Redis about
-- half of a miss+fill pair (bench/README.md, "The fence script's own
-- cost"). Each short path does exactly what the full operation does in
-- its case, and answers the same; any other case returns false (nothing
-- written yet) and the full operation runs:
-- - a miss of a key with no fence (the first miss of a key at rest);
-- - a plain store of a key with no fence, outside the lag window (a
--   write; a fence lives only while it guards something, see `bump`);
-- - a plain store of a key whose fence holds one live miss in the store's
--   scope and nothing else that needs keeping, outside the lag window:
--   the fill of that miss, which ends the fence.
local function fast(op)
  if op == 'miss' then
    -- As `miss` for a fence that is not there: a new one at this time,
    -- the herd lease this miss's, and the miss outstanding.
    if A[9] == 'get' then
      -- The client's GET itself (see `miss`).
      local value = redis.pcall('GET', K[1])
      if type(value) == 'table' then return true, {3, value.err} end
      if value then return true, {1, value} end
      if redis.pcall('GET', K[2]) then return false end
    else
      local read = redis.call('MGET', K[1], K[2])
      if read[1] then return true, {1, read[1]} end
      if read[2] then return false end
    end
    local v = stamp()
    local s = v .. ' ' .. zero
    local rest = ''
    if A[6] ~= '' then rest = '\n' .. v .. ' ' .. v .. ' ' .. A[6] end
    if A[3] ~= '' then
      s = s .. ' ' .. string.format('%016.0f', time_us() + tonumber(A[4]) * 1000) .. ' ' .. A[3] .. rest
    else
      s = s .. rest
    end
    redis.call('SET', K[2], s, 'PX', A[2])
    return true, {0, v, zero, v, 1}
  end
  -- `set` (see it for the arguments) outside the lag window (A[5]).
  if op ~= 'set' or A[5] ~= '0' then return false end
  local words = 12 + tonumber(A[12])
  local s = redis.pcall('GET', K[2])
  if not s then
    -- A write of a key with no fence (unless one was expected, A[8]): the
    -- command, or its delete.
    if A[8] == '1' then return false end
    if A[9] == 'reject' then return true, 5 end
    if A[9] == 'inval' then
      local deleted = redis.pcall('DEL', K[1])
      if type(deleted) == 'table' and deleted.err then return true, deleted end
      return true, 4
    end
    if #A - words > 7000 then return false end
    return true, redis.pcall(unpack(A, words + 1, #A))
  end
  -- A fill: the fence `<v> <t>[|<p>][ <he> <h>]\n<version> <at> <name>`
  -- with that one miss, live and in scope, at the fence's version, and
  -- the lease alone in A[4] (no failover bound).
  local lease = tonumber(A[4])
  if type(s) ~= 'string' or A[10] ~= '0' or not lease or #s < 33 or string.byte(s, 17) ~= 32 then
    return false
  end
  local o = 34
  if string.byte(s, o) == 124 then o = 51 end
  if string.byte(s, o) == 32 then o = string.find(s, '\n', o + 18, true) end
  if not o or string.byte(s, o) ~= 10 or string.find(s, '\n', o + 1, true) then return false end
  local v, at = string.sub(s, o + 1, o + 16), tonumber(string.sub(s, o + 18, o + 33))
  local prefix = A[3]
  if v ~= string.sub(s, 1, 16) or time_us() - at > lease
    or string.sub(s, o + 35, o + 34 + #prefix) ~= prefix then
    return false
  end
  local value_at = words + 1 + tonumber(A[11])
  local stored
  if A[7] == '1' then
    stored = redis.pcall('SET', K[1], A[value_at], 'NX', unpack(A, 13, words))
    -- Not stored: the full operation gives the herd lease back.
    if not stored then return false end
  else
    stored = redis.pcall('SET', K[1], A[value_at], unpack(A, 13, words))
  end
  if type(stored) == 'table' and stored.err then return true, stored end
  redis.call('DEL', K[2])
  return true, 1
end

-- Every operation in full, with the helpers it takes. Made at the first
-- operation of a call that no short path (`fast`) takes.
local function library()
  local function fixed(n) return string.format('%016.0f', n) end

  -- A fence is one string, read with one GET and written with one SET (as a
  -- hash it took HMGET or HGETALL, HSET, HDEL and PEXPIRE):
  --   `<v> <t>`, then `|<p>` where the lag window needs it, then ` <he> <h>`
  --   while a herd lease is held, then per outstanding miss
  --   `\n<version> <at> <name>`
  -- v: the version; t: the last invalidation (0: never); p: the one before
  -- it (absent: unknown, taken as t; see `store_fill`); he, h: the herd
  -- lease's expiry and holder; a miss's fence version and time. A miss's
  -- name is `m|<client ip>|<proxy instance>:<connection>|<miss>`; a scope is
  -- a prefix of it ('m|' every client, 'm|<ip>|' one client address,
  -- 'm|<ip>|<instance>:<connection>|' one connection). Names and holders
  -- hold no space or newline. A fence lives only while it guards something
  -- (see `bump`): at rest a cached key has none.
  -- `parse` reads a fence's string (nil: there is none). It returns nil for
  -- no fence, or for one of an older format, which goes: tickets against it
  -- cannot be judged, so they are refused as for a lost fence.
  local function parse(s)
    if not s or #s < 33 or string.byte(s, 17) ~= 32 then return nil end
    local f = {v = string.sub(s, 1, 16), t = string.sub(s, 18, 33), he = zero, h = '', rest = ''}
    local o = 34
    local next_byte = string.byte(s, o)
    if next_byte == 124 then
      f.p = string.sub(s, 35, 50)
      o = 51
      next_byte = string.byte(s, o)
    end
    if next_byte == 32 then
      f.he = string.sub(s, o + 1, o + 16)
      local nl = string.find(s, '\n', o + 18, true)
      if nl then
        f.h = string.sub(s, o + 18, nl - 1)
        f.rest = string.sub(s, nl)
      else
        f.h = string.sub(s, o + 18)
      end
    elseif next_byte == 10 then
      f.rest = string.sub(s, o)
    end
    return f
  end

  -- The fence at key `fence`, parsed.
  local function load(fence)
    local s = redis.pcall('GET', fence)
    if type(s) == 'table' then
      redis.call('DEL', fence)
      return nil
    end
    return parse(s)
  end

  -- Writes `f` back; with a TTL of `ttl_ms`, else keeping the one it has.
  local function save(fence, f, ttl_ms)
    local s = f.v .. ' ' .. f.t
    if f.p and f.p ~= f.t then s = s .. '|' .. f.p end
    if f.h ~= '' then
      s = s .. ' ' .. f.he .. ' ' .. f.h .. f.rest
    else
      s = s .. f.rest
    end
    if ttl_ms then
      redis.call('SET', fence, s, 'PX', ttl_ms)
    else
      redis.call('SET', fence, s, 'KEEPTTL')
    end
  end

  -- Writes `f` back keeping its TTL after a ticket went (a refused fill), or
  -- deletes it if it guards nothing now: no miss outstanding, no herd lease,
  -- no invalidation time to `keep` (see `bump`).
  local function settle(fence, f, keep)
    if not keep and f.rest == '' and f.h == '' then
      redis.call('DEL', fence)
    else
      save(fence, f)
    end
  end

  -- Moves the fence past every ticket issued so far: a fresh version, and
  -- with `invalidated` the invalidation time. The herd lease goes. `f` is
  -- the fence as loaded (nil: none yet).
  -- A fence that guards nothing goes instead: no miss outstanding, and no
  -- invalidation time to `keep` (the lag window's). Every ticket is a miss in
  -- the fence or a lease token that names its version; a token finds the
  -- fence gone or made anew by a later miss, with a later version (Redis'
  -- clock), and is refused either way. So a cached key at rest, and a key
  -- only ever written, costs no fence at all.
  local function bump(fence, ttl_ms, invalidated, f, keep)
    if not keep and (not f or f.rest == '') then
      if f then redis.call('DEL', fence) end
      return
    end
    f = f or {v = zero, t = zero, p = zero, rest = ''}
    local stamped = stamp()
    if stamped > f.v then f.v = stamped else f.v = fixed(tonumber(f.v) + 1) end
    if invalidated then
      -- The previous invalidation is kept only for the lag window.
      if keep then f.p = f.t else f.p = nil end
      f.t = stamped
    end
    f.h, f.he = '', zero
    save(fence, f, ttl_ms)
  end

  -- Drops from `f` the misses older than twice `lease_us`: a dead proxy's,
  -- or a client's that never filled.
  local function sweep(f, lease_us)
    local now = time_us()
    f.rest = string.gsub(f.rest, '\n%d+ (%d+) %S+', function(at)
      if now - tonumber(at) > 2 * lease_us then return '' end
    end)
  end

  -- One pass over the outstanding misses of `f` in scope `prefix`, without
  -- a table or a pattern per miss (this is the hot path of every fill).
  -- Misses older than `lease_us` are old: they stop blocking and are not
  -- filled. Returns the
  -- count of live and old ones, the oldest live one's version and time, the
  -- newest live one (else the newest old one) as its name and version, and
  -- whether some miss is older than twice `lease_us` (for `sweep`).
  local function scan(f, prefix, lease_us)
    local rest, plen, now = f.rest, #prefix, time_us()
    local live, old, expired = 0, 0, false
    local oldest_v, oldest_at
    local live_v, live_at, live_from, live_to, old_v, old_at, old_from, old_to
    local at_line, last = 1, #rest
    while at_line < last do
      local next_line = string.find(rest, '\n', at_line + 35, true) or last + 1
      local t = tonumber(string.sub(rest, at_line + 18, at_line + 33))
      local age = now - t
      if age > 2 * lease_us then
        expired = true
      elseif string.sub(rest, at_line + 35, at_line + 34 + plen) == prefix then
        -- Versions stay strings: fixed widths compare as numbers do.
        local v = string.sub(rest, at_line + 1, at_line + 16)
        if age > lease_us then
          old = old + 1
          if old == 1 or v > old_v or (v == old_v and t > old_at) then
            old_v, old_at, old_from, old_to = v, t, at_line + 35, next_line - 1
          end
        else
          live = live + 1
          if live == 1 or v > live_v or (v == live_v and t > live_at) then
            live_v, live_at, live_from, live_to = v, t, at_line + 35, next_line - 1
          end
          if live == 1 or v < oldest_v or (v == oldest_v and t < oldest_at) then
            oldest_v, oldest_at = v, t
          end
        end
      end
      at_line = next_line
    end
    if live > 0 then
      return live, old, oldest_v, oldest_at, string.sub(rest, live_from, live_to), live_v, expired
    elseif old > 0 then
      return live, old, nil, nil, string.sub(rest, old_from, old_to), old_v, expired
    end
    return 0, 0, nil, nil, nil, nil, expired
  end

  -- `f` without miss `name`.
  local function consume(f, name)
    local rest = f.rest
    -- The usual case: it is the only one.
    if not string.find(rest, '\n', 2, true) and string.sub(rest, 36) == name then
      f.rest = ''
      return
    end
    local from, to = string.find(rest, ' ' .. name, 1, true)
    -- A name is whole when a line ends after it (names may share a prefix).
    while from and to < #rest and string.byte(rest, to + 1) ~= 10 do
      from, to = string.find(rest, ' ' .. name, to + 1, true)
    end
    if not from then return end
    -- The line began 34 bytes before the name: `\n<version> <at> `.
    f.rest = string.sub(rest, 1, from - 35) .. string.sub(rest, to + 1)
  end

  -- Runs the client's command, A[from] onwards. Lua's unpack stops near
  -- 8000 values, so a DEL, UNLINK or MSET with more arguments runs in chunks,
  -- still inside this one atomic script; DEL and UNLINK add up their counts.
  local function run_command(from)
    local last = #A
    if last - from < 7000 then return redis.pcall(unpack(A, from, last)) end
    local name = string.upper(A[from])
    if name ~= 'DEL' and name ~= 'UNLINK' and name ~= 'MSET' then
      return redis.pcall(unpack(A, from, last))
    end
    local total, reply = 0, nil
    -- Chunks of 6000 arguments keep MSET's pairs whole.
    for i = from + 1, last, 6000 do
      reply = redis.pcall(name, unpack(A, i, math.min(i + 5999, last)))
      if type(reply) == 'table' and reply.err then return reply end
      if name ~= 'MSET' then total = total + reply end
    end
    if name == 'MSET' then return reply end
    return total
  end

  -- Stores a fill: SET K[1] to A[value_at] with the client's expiry
  -- words A[first..last], unless the lag rule (C2) refuses it. A read from
  -- a replica whose lag is under `lag` may lack every write whose
  -- invalidation came less than `lag` before the miss (at `miss_at`), and
  -- nothing older. With one such invalidation (the last, t) the fill is
  -- stored with a TTL ending `lag` after it (the client's own expiry stands
  -- if it ends sooner): no read returns it `lag` after that write's
  -- invalidation. With two or more (the previous one, p, too; unknown is
  -- taken as t), the first of them is not known, so neither is when the
  -- value is fresh: refused. `lag_mode`: '0' that (short_ttl); '1' every
  -- fill inside the window refused (refuse); '2' the TTL ends `lag` after
  -- t whatever came before (short_ttl_last: a value that lacks an earlier
  -- write is read up to 2 x `lag` after it, the rule before #16).
  -- The stored fill moves the fence `f` (first fill wins). Returns nil when
  -- stored, else why not ('lag_window', 'nx') or Redis' error; and with a
  -- TTL the lag rule shortened, `lag`.
  local function store_fill(value_at, first, last, miss_at, lag, lag_mode, nx, f)
    local pxat, now
    local invalidated = lag > 0 and tonumber(f.t) or 0
    if invalidated > 0 and miss_at - invalidated < lag then
      if lag_mode == '1' or (lag_mode == '0' and miss_at - tonumber(f.p or f.t) < lag) then
        return 'lag_window'
      end
      local lag_end = invalidated + lag
      now = time_us()
      if lag_end <= now then return 'lag_window' end
      local ends = math.huge
      for i = first, last - 1 do
        local w, n = string.upper(A[i]), tonumber(A[i + 1])
        if w == 'EX' then ends = now + n * 1000000
        elseif w == 'PX' then ends = now + n * 1000
        elseif w == 'EXAT' then ends = n * 1000000
        elseif w == 'PXAT' then ends = n * 1000 end
      end
      -- Redis serves a key through the whole millisecond of its PXAT: one
      -- before the window's end, the value is gone by then.
      if lag_end < ends then pxat = string.format('%.0f', math.floor(lag_end / 1000) - 1) end
    end
    -- No argument table: this is every fill's path.
    local stored
    if pxat then
      -- The window's end replaces the client's expiry words.
      if nx then
        stored = redis.pcall('SET', K[1], A[value_at], 'PXAT', pxat, 'NX')
      else
        stored = redis.pcall('SET', K[1], A[value_at], 'PXAT', pxat)
      end
    elseif nx then
      stored = redis.pcall('SET', K[1], A[value_at], 'NX', unpack(A, first, last))
    else
      stored = redis.pcall('SET', K[1], A[value_at], unpack(A, first, last))
    end
    if type(stored) == 'table' and stored.err then return stored end
    if not stored then return 'nx' end
    bump(K[2], A[2], false, f, lag > 0)
    if pxat then return nil, lag end
    return nil
  end

  -- The reply to a fill from `store_fill`'s verdict: 1 stored, the usual
  -- one, as a number (a table costs Redis more to turn into a reply: see
  -- the `set` operation); {1, lag} stored with the TTL the lag rule
  -- shortened, {2} not stored (NX), {0, reason} refused ({0, 'lag_window',
  -- lag}); `refuse` gives the herd lease back.
  local function fill_reply(verdict, refuse, lag, shortened)
    if verdict == nil then
      if shortened then return {1, lag} end
      return 1
    end
    if type(verdict) == 'table' then return verdict end
    if verdict == 'nx' then
      refuse('nx')
      return {2}
    end
    local reply = refuse(verdict)
    if verdict == 'lag_window' then reply[3] = lag end
    return reply
  end

  -- Runs one operation in full, `op` being A[1].
  local function run(op)
    if op == 'miss' then
      -- KEYS: key, fence. ARGV: op, fence_ttl_ms, lease_holder, lease_ms, claim
      -- (wait|alone|force), the miss's name ('' for the lease API, whose token
      -- is the ticket), lease_ttl_us, the connection's holder prefix, and
      -- 'get' where the call is the client's GET itself (a key of a pattern
      -- that mostly misses, whose GET would answer nil: one round trip, not
      -- two). Then the key is read with GET, so that it answers as GET:
      -- its value {1, value}, or its error {3, message} (WRONGTYPE).
      if A[9] == 'get' then
        local value = redis.pcall('GET', K[1])
        if type(value) == 'table' then return {3, value.err} end
        if value then return {1, value} end
      end
      -- The key and its fence in one call (a call costs about 0.9 µs). MGET
      -- reads a value of another type as nil: a key that became a hash since
      -- the client's GET answered nil misses as that GET did, and a fence of
      -- an older format (a hash) is written over by `save` as `load` would
      -- have deleted it.
      local read = redis.call('MGET', K[1], K[2])
      if read[1] then return {1, read[1]} end
      local f = parse(read[2]) or {v = stamp(), t = zero, h = '', he = zero, rest = ''}
      local leader = 0
      local held = f.h ~= ''
      local lapsed = f.he <= stamp()
      local free = not held or lapsed or f.h == A[3]
      -- 'alone': the client has nothing else in flight on this connection, so
      -- if the lease holder is an earlier miss of the same connection its fill
      -- can only come after this reply (a client that sends one request at a
      -- time): waiting would stall the connection for the whole hold.
      local own = A[5] == 'alone' and held and string.sub(f.h, 1, #A[8]) == A[8]
      if free or A[5] == 'force' or own then
        if free then
          f.h = A[3]
          f.he = fixed(time_us() + tonumber(A[4]) * 1000)
        end
        leader = 1
        -- Only a miss that goes to the database is outstanding.
        if A[6] ~= '' then
          -- Misses that were never filled pile up (a row that does not
          -- exist): their leader's herd lease lapsed instead of going with a
          -- fill, so that is when expired ones are swept.
          if held and lapsed then sweep(f, tonumber(A[7])) end
          f.rest = f.rest .. '\n' .. f.v .. ' ' .. stamp() .. ' ' .. A[6]
        end
      end
      save(K[2], f, A[2])
      return {0, f.v, f.t, stamp(), leader}
    elseif op == 'fill' then
      -- KEYS: key, fence. ARGV: op, fence_ttl_ms, version, miss_us, lag_us,
      -- lag_mode, nx, lease_holder, lease_us, value, then the client's
      -- expiry words.
      local f = load(K[2])
      if not f then return {0, 'fence_missing'} end
      -- A refused fill hands the herd lease back, so waiters stop waiting.
      local function refuse(reason)
        if f.h == A[8] then
          f.h, f.he = '', zero
          settle(K[2], f, A[5] ~= '0')
        end
        return {0, reason}
      end
      if f.v ~= A[3] then return refuse('fence_moved') end
      if time_us() - tonumber(A[4]) > tonumber(A[9]) then return refuse('expired') end
      local lag = tonumber(A[5])
      local verdict, shortened = store_fill(10, 11, #A, tonumber(A[4]), lag, A[6], A[7] == '1', f)
      return fill_reply(verdict, refuse, lag, shortened)
    elseif op == 'set' then
      -- A plain store of a fenced key whose miss, if any, the proxy cannot name
      -- (pooled and multiplexed clients): a fill if a miss is outstanding in
      -- the scope, judged by the OLDEST one and consuming the NEWEST; else a
      -- write per on_write.
      -- KEYS: key, fence. ARGV: op, fence_ttl_ms, scope prefix, lease_us
      -- (or `<lease_us>,<bound_us>`), lag_us, lag_mode, nx, expect_fence,
      -- on_write (write|inval|reject), pending_delete, where the value is in the client's command (2: SET,
      -- 3: SETEX, PSETEX), count of expiry words, the expiry words, then the
      -- client's command.
      -- Replies: a fill's verdict (see `fill_reply`: 1 or an array); for a write,
      -- the command's own reply (a status or nil: never an array or a
      -- number), 4 for a write turned into a delete, 5 for one rejected. Not
      -- arrays: a table in a reply costs Redis more to convert than the
      -- write itself (about 0.8 µs of a fenced SET's 5, in a batch).
      local f = load(K[2])
      local words = 12 + tonumber(A[12])
      -- A key with no fence has no miss outstanding: a write need not create
      -- one, unless the lag window (C2) needs its invalidation time.
      local lag = A[5] == '0' and 0 or tonumber(A[5])
      local function write()
        if A[9] == 'reject' then return 5 end
        if A[9] == 'inval' then
          -- As the client's own commands: an error (-READONLY) is the reply.
          local deleted = redis.pcall('DEL', K[1])
          if type(deleted) == 'table' and deleted.err then return deleted end
          bump(K[2], A[2], true, f, lag > 0)
          return 4
        end
        local reply = run_command(words + 1)
        if type(reply) == 'table' and reply.err then return reply end
        bump(K[2], A[2], true, f, lag > 0)
        return reply
      end
      if not f then
        -- A fence lost between a miss here and this SET: nothing proves it fresh.
        if A[8] == '1' then return {0, 'fence_missing'} end
        return write()
      end
      -- A[4]: the lease, or after a failover `<lease>,<bound>`: misses older
      -- than the bound are from before it (failover.rs). They still block for
      -- their lease, as any miss does: a SET in their scope may be their
      -- stale fill, and the fence that would tell is the one a failover may
      -- have set back.
      local lease = tonumber(A[4])
      local bound = lease
      if not lease then
        local comma = string.find(A[4], ',', 1, true)
        lease = tonumber(string.sub(A[4], 1, comma - 1))
        bound = tonumber(string.sub(A[4], comma + 1))
      end
      local live, old, oldest_v, oldest_at, consumed, consumed_v, expired = scan(f, A[3], lease)
      if expired then sweep(f, lease) end
      if live == 0 and old == 0 then return write() end
      consume(f, consumed)
      local function refuse(reason)
        -- The consumed miss goes; its herd lease goes back, so waiters stop waiting.
        local connection, miss = string.match(consumed, '|([^|]*)|([^|]*)$')
        if f.h == connection .. ':' .. miss then f.h, f.he = '', zero end
        settle(K[2], f, lag > 0)
        return {0, reason}
      end
      if A[10] == '1' then return refuse('pending_delete') end
      if live == 0 or time_us() - oldest_at > bound then return refuse('expired') end
      if oldest_v ~= f.v then
        if consumed_v == f.v then return refuse('older_miss_outstanding') end
        return refuse('fence_moved')
      end
      local verdict, shortened = store_fill(words + 1 + tonumber(A[11]), 13, words, oldest_at,
        lag, A[6], A[7] == '1', f)
      return fill_reply(verdict, refuse, lag, shortened)
    elseif op == 'write' or op == 'inval' then
      -- KEYS: the command's keys, then the fences of the fenced ones.
      -- ARGV: op, fence_ttl_ms, fenced_count, create ('1': a missing fence is
      -- created, for the lag window's invalidation time), own (below), the
      -- command and its arguments. A key with no fence has no miss
      -- outstanding, so without a lag window nothing needs one. Without a
      -- command (inside MULTI, right behind the client's own write), only
      -- the fences move.
      -- own: under ticket_scope = "connection" (one connection per thread),
      -- the connection's miss-name prefix: its own misses of these keys are
      -- taken back, as a thread that misses, then writes the key itself,
      -- fills nothing read before its own write (Redis' expire.tcl: GET x,
      -- DEL x, SETEX x 10 foo). Another connection's write still leaves
      -- them, to refuse their stale fills (R1).
      local fenced = tonumber(A[3])
      local own = A[5]
      local reply = 0
      if #A >= 6 then reply = run_command(6) end
      if type(reply) == 'table' and reply.err then return reply end
      for i = #K - fenced + 1, #K do
        local f = load(K[i])
        if f and own ~= '' then
          f.rest = string.gsub(f.rest, '\n%d+ %d+ (%S+)', function(name)
            if string.sub(name, 1, #own) == own then return '' end
          end)
        end
        bump(K[i], A[2], true, f, A[4] == '1')
      end
      return reply
    elseif op == 'randomkey' then
      -- RANDOMKEY without the proxy's own keys. ARGV: op, draws, scan calls.
      -- Random draws first; if they all find fences, a bounded SCAN for any
      -- other key; nil if none was found.
      -- The proxy's own keys (fences): `cachefence:{...` and `cachefence::...`
      -- (script.rs `is_fence_key` says the same).
      local function is_fence(name)
        local prefix = string.sub(name, 1, 12)
        return prefix == 'cachefence:{' or prefix == 'cachefence::'
      end
      for _ = 1, tonumber(A[2]) do
        local name = redis.call('RANDOMKEY')
        if not name then return false end
        if not is_fence(name) then return name end
      end
      local cursor = '0'
      for _ = 1, tonumber(A[3]) do
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
      local f = load(K[1])
      if not f then return {false, false, false, false, stamp(), redis.call('PTTL', K[1]), 0} end
      local _, outstanding = string.gsub(f.rest, '\n', '')
      local h, he = false, false
      if f.h ~= '' then h, he = f.h, f.he end
      return {f.v, f.t, h, he, stamp(), redis.call('PTTL', K[1]), outstanding}
    end
    return redis.error_reply('ERR cachefence: unknown fence op ' .. tostring(op))
  end
  return run
end

-- Runs one operation, `op` being A[1]: by its short path where one
-- applies, else in full.
local full
local function run(op)
  local done, reply = fast(op)
  if done then return reply end
  full = full or library()
  return full(op)
end

if ARGV[1] ~= 'batch' then return run(ARGV[1]) end
-- A batch: the fenced commands a client pipelined, one operation each, run
-- in order in this one call (one script call's fixed cost instead of one
-- per command). ARGV: 'batch', n, then per operation its shape (keys *
-- 10^8 + arguments * 10^4 + how many leading arguments are the previous
-- operation's), then each operation's own arguments in order; KEYS: every
-- operation's keys in order (script.rs `batch`). The reply holds one
-- element per operation, what that operation alone would have returned.
local n = tonumber(ARGV[2])
local replies = {}
local key_at, arg_at, last, last_key = 1, 3 + n, 0, 0
local floor = math.floor
-- A and K are refilled in place for each operation (a table per
-- operation costs more than the loops).
A, K = {}, {}
for i = 1, n do
  local shape = tonumber(ARGV[2 + i])
  local keys = floor(shape / 100000000)
  local args = floor(shape / 10000) % 10000
  for j = 1, keys do K[j] = KEYS[key_at + j - 1] end
  for j = keys + 1, last_key do K[j] = nil end
  key_at, last_key = key_at + keys, keys
  -- A keeps the previous operation's leading arguments that this one
  -- shares; the rest come from ARGV, and what is past its end goes.
  for j = shape % 10000 + 1, args do
    A[j] = ARGV[arg_at]
    arg_at = arg_at + 1
  end
  for j = args + 1, last do A[j] = nil end
  last = args
  -- The client's commands (and the DEL that replaces a SET under
  -- on_write = "invalidate") run with redis.pcall: their errors are
  -- replies (a WRONGTYPE stays in its place). A fence's own write comes
  -- after the client's write succeeded, and a script that wrote may go on
  -- writing (no -OOM or -READONLY then), so nothing is expected to raise;
  -- should something, it fails this operation only (a pcall costs about
  -- 0.06 µs, bench/lua_costs.py).
  local ok, reply = pcall(run, A[1])
  if not ok then
    if type(reply) ~= 'table' or not reply.err then reply = redis.error_reply(tostring(reply)) end
  elseif reply == nil then
    reply = false
  end
  replies[i] = reply
end
return replies
