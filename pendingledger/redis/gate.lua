#!lua name=pendingledger_@VERSION@
-- pendingledger: the Redis gate's server code, one Redis Functions library.
--
-- Loaded once per server (FUNCTION LOAD; the client reloads it when FCALL finds it missing), so
-- a call runs only its own operation: the helpers below are defined at load, not per call. The
-- library and its functions carry the code's version (@VERSION@, a digest of this file), so
-- clients of different versions sharing a server never run each other's code. Every operation is
-- one function, called with FCALL and the namespace's 8 keys; each runs atomically in the
-- server: a decision reads the book and the reservations and, when it admits, reserves in the
-- same step, in one round trip.
--
-- Keys (all under one hash tag {ns}, so Redis Cluster keeps them in one slot):
--   KEYS[1] meta    hash  gen (restore generation: the marker), layout (of the keys: '2'),
--                         restored_at, halted, testing; the mark
--                         (epoch, hw: see Fencing); the totals npos (open positions),
--                         pos_gross, res_gross (units), res_syms (symbols reserved), res_open
--                         (of those, open), nres (reservations), kinds (amount kinds reserved);
--                         clock_us, clock_frozen_us (the test clock: see Time)
--   KEYS[2] pos     hash  symbol -> signed position exposure in units, then its kind letter
--   KEYS[3] rsym    hash  symbol -> units reserved on it (present iff > 0)
--   KEYS[4] orders  hash  order_id -> "units|token|reserved_at_us|symbol"
--   KEYS[5] exp     zset  order_id scored by expiry (microseconds, on the clock of Time below)
--   KEYS[6] stats   hash  admitted, denied:<reason>, released, filled, expired, restored, corrupt
--   KEYS[7] calls   hash  call token -> the answer that call got (see Retries)
--   KEYS[8] callexp zset  call token scored by when its answer is forgotten (microseconds)
--
-- Eviction: every key but stats holds a sentinel (field or member '', which no symbol, order id
-- or token can be; in the zsets scored +inf, after every expiry), written by restore. A key that
-- is missing was evicted (or deleted): every call checks all of them with one EXISTS, and a
-- missing one withdraws the marker, so the namespace denies with book_not_restored until
-- restore. Nothing writes a book key before that check, so no key is recreated without its
-- sentinel. stats carries none: losing it loses counts, never a limit.
--
-- Fencing: meta's mark (epoch, hw) only grows along one replication history. hw counts the calls
-- that changed the book; restore starts a new epoch (the server's clock in microseconds, and
-- always above the old epoch and the caller's), with hw 0. Every reply carries the mark, and
-- every client keeps the highest it has seen and sends it with each call (ARGV[1], ARGV[2]). A
-- server whose mark is behind a client's has lost writes that client saw (a failover to a
-- replica that had not received them, a resync from another primary, a restart from an old
-- snapshot): the call withdraws the marker, and every process is denied until restore.
--
-- Amounts: exact non-negative integers of units (1 unit = 10^-9 of the account currency) kept as
-- decimal strings. Lua numbers are doubles, exact only up to 2^53, so a value is handled as two
-- limbs (w, f) = (value div 10^9, value mod 10^9); w must stay below 2^53. The client refuses
-- single amounts of 10^15 or more; a total that would pass 2^53 raises an error before the
-- operation writes anything of its own. No float is ever summed here.
--
-- Time comes from the server (TIME), never from a client: "now" is TIME in microseconds plus the
-- namespace's test clock, two fields of `meta` that only pendingledger.redis.testing writes
-- (refused unless that module has set meta's `testing` field) and that are absent in production:
--   clock_us          microseconds added to TIME; only grows (a client sends steps, not times)
--   clock_frozen_us   if present, the TIME reading the clock was frozen at
-- A reservation expires through its score in `exp`, swept at the start of every operation that
-- writes, at a cost of O(expired). It is expired from the instant now >= reserved_at + ttl, as in
-- the in-process ledger. No key gets a TTL.
--
-- Retries: a client that loses a reply (a timeout) may send the same call again. 'enter' carries
-- a token stored with the reservation it makes and answers a repeat from it. Every other call that
-- writes carries a random per-call token: its answer is kept under that token in `calls` for
-- CALL_MEMO_US, and a repeat gets that answer without running again. 'restore' is recognised by
-- its generation (new for each call) in the marker.
--
-- Replies: every function returns {epoch, hw, ...} (the mark after the call, then its answer).

local B = 1000000000
local MAXW = 9007199254740991 -- 2^53 - 1
local SWEEP_MAX = 1000 -- expired reservations dropped per call (the rest at the next calls)
local CALL_MEMO_US = 300000000 -- 5 minutes: how long a call's answer is kept for its retries
local CALLS_SWEEP_EVERY = 16 -- kept answers are swept by one write in 16 (each keeps at most one)
local CLOCK_MAX = 4503599627370496 -- 2^52 us (year 2112): the test clock stops short of it

local K_META, K_POS, K_RSYM, K_ORD, K_EXP, K_STATS, K_CALLS, K_CALLEXP

local function bind(keys)
  K_META, K_POS, K_RSYM, K_ORD = keys[1], keys[2], keys[3], keys[4]
  K_EXP, K_STATS, K_CALLS, K_CALLEXP = keys[5], keys[6], keys[7], keys[8]
end

-- ------------------------------------------------------------------ amounts as two limbs

-- "units" (optionally signed, optionally followed by a kind letter) -> w, f of its magnitude
local function split(s)
  if not s or s == '' then return 0, 0 end
  local a, n = 1, #s
  if string.byte(s, 1) == 45 then a = 2 end -- '-'
  if string.byte(s, n) > 57 then n = n - 1 end -- a kind letter
  if n - a < 9 then return 0, tonumber(string.sub(s, a, n)) end
  return tonumber(string.sub(s, a, n - 9)), tonumber(string.sub(s, n - 8, n))
end

local function fmt(w, f)
  if w == 0 then return string.format('%d', f) end
  return string.format('%.0f%09d', w, f)
end

local function add(aw, af, bw, bf)
  local w, f = aw + bw, af + bf
  if f >= B then f = f - B; w = w + 1 end
  if w > MAXW then return error('pendingledger: amount overflow (total >= 2^53 units)') end
  return w, f
end

-- a - b, clamped at 0; the third result is true if it had to clamp (a bookkeeping error)
local function sub(aw, af, bw, bf)
  local w, f = aw - bw, af - bf
  if f < 0 then f = f + B; w = w - 1 end
  if w < 0 then return 0, 0, true end
  return w, f, false
end

local function gt(aw, af, bw, bf)
  if aw ~= bw then return aw > bw end
  return af > bf
end

-- an integral double as a decimal string (tostring() would print only 14 digits)
local function int(x)
  return string.format('%.0f', x)
end

local function time_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- "units|token|reserved_at_us|symbol" -> units, token, reserved_at, symbol
local function parse_rec(rec)
  local a = string.find(rec, '|', 1, true)
  local b = string.find(rec, '|', a + 1, true)
  local c = string.find(rec, '|', b + 1, true)
  return string.sub(rec, 1, a - 1), string.sub(rec, a + 1, b - 1),
    string.sub(rec, b + 1, c - 1), string.sub(rec, c + 1)
end

-- ------------------------------------------------------------------ the namespace's state

-- S: meta as read at the start of a call, changed in place by the helpers, written back once by
-- finish() (one HSET) if the book changed. One call runs at a time, so one table serves all.
local S = {}
local FIELDS = {'gen', 'epoch', 'hw', 'halted', 'testing', 'clock_us', 'clock_frozen_us',
  'npos', 'pos_gross', 'res_gross', 'res_syms', 'res_open', 'nres', 'kinds', 'restored_at',
  'layout'}
local LAYOUT = '2' -- meta's `layout`: a book written by an older layout is not restored

local function load()
  local m = redis.call('HMGET', K_META, unpack(FIELDS))
  S.gen, S.epoch, S.hw, S.halted, S.testing = m[1], tonumber(m[2]) or 0, tonumber(m[3]) or 0,
    m[4] == '1', m[5] == '1'
  S.off, S.frozen = tonumber(m[6]) or 0, tonumber(m[7])
  S.npos = tonumber(m[8]) or 0
  S.pw, S.pf = split(m[9])
  S.rw, S.rf = split(m[10])
  S.rsyms, S.ropen, S.nres = tonumber(m[11]) or 0, tonumber(m[12]) or 0, tonumber(m[13]) or 0
  S.kinds, S.restored_at = tonumber(m[14]) or 0, m[15]
  if m[16] ~= LAYOUT then S.gen = false end
  S.dirty = false
end

local function now_us()
  return (S.frozen or time_us()) + S.off
end

local function corrupt()
  redis.call('HINCRBY', K_STATS, 'corrupt', 1)
end

-- The answer of a call: the mark first, after writing meta back if the book changed.
local function finish(...)
  if S.dirty then
    S.hw = S.hw + 1
    redis.call('HSET', K_META, 'hw', int(S.hw), 'npos', S.npos, 'pos_gross', fmt(S.pw, S.pf),
      'res_gross', fmt(S.rw, S.rf), 'res_syms', S.rsyms, 'res_open', S.ropen, 'nres', S.nres,
      'kinds', S.kinds)
  end
  return {int(S.epoch), int(S.hw), ...}
end

-- Withdraw the marker: every process is denied with book_not_restored until restore.
local function withdraw()
  redis.call('HDEL', K_META, 'gen')
  S.gen = false
end

-- True if the book can be trusted for this call: restored, every key present (nothing evicted),
-- and the mark not behind the caller's (ARGV[1], ARGV[2]). Else the marker is withdrawn.
local function usable(args)
  if not S.gen then return false end
  local ce, ch = tonumber(args[1]) or 0, tonumber(args[2]) or 0
  if S.epoch < ce or (S.epoch == ce and S.hw < ch) then
    withdraw()
    return false
  end
  if redis.call('EXISTS', K_POS, K_RSYM, K_ORD, K_EXP, K_CALLS, K_CALLEXP) ~= 6 then
    withdraw()
    return false
  end
  return true
end

-- ------------------------------------------------------------------ book keeping

-- Add a reservation. `rs` is the symbol's reserved units as read by the caller in this call.
-- The sums are formed (and may raise on overflow) before anything is written.
local function insert(id, sym, units, token, at, expiry, sym_open, rs, kind)
  local uw, uf = split(units)
  local sw, sf = split(rs)
  sw, sf = add(sw, sf, uw, uf)
  S.rw, S.rf = add(S.rw, S.rf, uw, uf)
  redis.call('HSET', K_ORD, id, units .. '|' .. token .. '|' .. at .. '|' .. sym)
  redis.call('ZADD', K_EXP, expiry, id)
  redis.call('HSET', K_RSYM, sym, fmt(sw, sf))
  if not rs then
    S.rsyms = S.rsyms + 1
    if sym_open then S.ropen = S.ropen + 1 end
  end
  S.nres = S.nres + 1
  S.kinds = bit.bor(S.kinds, kind)
  S.dirty = true
end

-- Take `dw, df` units off the reservation of `sym` (its record already rewritten or deleted).
local function unreserve(sym, dw, df)
  local rw, rf = split(redis.call('HGET', K_RSYM, sym))
  local sw, sf, bad = sub(rw, rf, dw, df)
  local bad2
  S.rw, S.rf, bad2 = sub(S.rw, S.rf, dw, df)
  if sw == 0 and sf == 0 then
    redis.call('HDEL', K_RSYM, sym)
    S.rsyms = S.rsyms - 1
    if redis.call('HEXISTS', K_POS, sym) == 1 then S.ropen = S.ropen - 1 end
  else
    redis.call('HSET', K_RSYM, sym, fmt(sw, sf))
  end
  if bad or bad2 then corrupt() end
  S.dirty = true
end

-- End a reservation; `counter` is the stats field that counts how it ended.
local function drop(id, rec, counter)
  local units, _, _, sym = parse_rec(rec)
  redis.call('HDEL', K_ORD, id)
  redis.call('ZREM', K_EXP, id)
  local uw, uf = split(units)
  unreserve(sym, uw, uf)
  S.nres = S.nres - 1
  redis.call('HINCRBY', K_STATS, counter, 1)
end

local function sweep(now)
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', now, 'LIMIT', 0, SWEEP_MAX)
  for i = 1, #due do
    local rec = redis.call('HGET', K_ORD, due[i])
    if rec then
      drop(due[i], rec, 'expired')
    else
      redis.call('ZREM', K_EXP, due[i])
      corrupt()
    end
  end
  return #due
end

-- Set a position ("signed units" and a kind letter); raises (overflow) before writing anything.
local function set_pos(sym, value)
  local old = redis.call('HGET', K_POS, sym)
  local ow, of = split(old)
  local nw, nf = split(value)
  local bad
  local pw, pf = add(S.pw, S.pf, nw, nf)
  S.pw, S.pf, bad = sub(pw, pf, ow, of)
  redis.call('HSET', K_POS, sym, value)
  if not old then
    S.npos = S.npos + 1
    if redis.call('HEXISTS', K_RSYM, sym) == 1 then S.ropen = S.ropen + 1 end
  end
  if bad then corrupt() end
  S.dirty = true
  return old ~= false
end

local function close_pos(sym)
  local old = redis.call('HGET', K_POS, sym)
  if not old then return false end
  local ow, of = split(old)
  local bad
  S.pw, S.pf, bad = sub(S.pw, S.pf, ow, of)
  redis.call('HDEL', K_POS, sym)
  S.npos = S.npos - 1
  if redis.call('HEXISTS', K_RSYM, sym) == 1 then S.ropen = S.ropen - 1 end
  if bad then corrupt() end
  S.dirty = true
  return true
end

-- What stays of `units` reserved after a fill of `down` to `up` units (_units.after_fill):
-- nothing once the fill rounded up covers it, else the fill rounded down is taken off.
local function after_fill(units, down, up)
  local rw, rf = split(units)
  local uw, uf = split(up)
  if not gt(rw, rf, uw, uf) then return 0, 0 end
  local dw, df = split(down)
  return sub(rw, rf, dw, df)
end

-- Reduce the reservation `id` (record `rec`) by a fill of `down` to `up` units; returns 'E'
-- (ended, as filled) or 'R' and the units that stay.
local function reduce_rec(id, rec, down, up)
  local units, t, at, sym = parse_rec(rec)
  local nw, nf = after_fill(units, down, up)
  if nw == 0 and nf == 0 then
    drop(id, rec, 'filled')
    return 'E'
  end
  local want = fmt(nw, nf)
  local uw, uf = split(units)
  local dw, df = sub(uw, uf, nw, nf)
  redis.call('HSET', K_ORD, id, want .. '|' .. t .. '|' .. at .. '|' .. sym)
  unreserve(sym, dw, df)
  return 'R', want
end

-- ------------------------------------------------------------------ answers kept for retries

-- The answer kept for call token `tk`, or nil. Answers are encoded as their items joined by '|'
-- (every item is a letter, a number or a symbol; a symbol is always the last item).
local function replayed(tk)
  if tk == '' then return nil end
  local enc = redis.call('HGET', K_CALLS, tk)
  if not enc then return nil end
  local bar = string.find(enc, '|', 1, true)
  if not bar then return {enc} end
  return {string.sub(enc, 1, bar - 1), string.sub(enc, bar + 1)}
end

-- Keep `a` (and `b`) as the answer of call token `tk`.
local function remember(tk, now, a, b)
  if tk ~= '' then
    local enc = a
    if b ~= nil then enc = a .. '|' .. b end
    redis.call('HSET', K_CALLS, tk, enc)
    redis.call('ZADD', K_CALLEXP, int(now + CALL_MEMO_US), tk)
  end
end

local function sweep_calls(now)
  local due = redis.call('ZRANGEBYSCORE', K_CALLEXP, '-inf', now, 'LIMIT', 0, SWEEP_MAX)
  if #due > 0 then
    redis.call('HDEL', K_CALLS, unpack(due))
    redis.call('ZREM', K_CALLEXP, unpack(due))
  end
end

-- The start of a writing operation with call token `tk`: nil and now if it may run (the book
-- is usable; expired reservations swept), else the reply to give: the kept answer of a retry,
-- or {'D'} (book not restored).
local function begin(keys, args, tk)
  bind(keys)
  load()
  local again = replayed(tk)
  if again then return finish(unpack(again)) end
  if not usable(args) then return finish('D') end
  local now = now_us()
  sweep(now)
  if S.hw % CALLS_SWEEP_EVERY == 0 then sweep_calls(now) end
  return nil, now
end

-- Run `op` as a writing operation with call token args[3]: its one or two results are the
-- answer, kept for a retry of the same call.
local function kept(op)
  return function(keys, args)
    local tk = args[3]
    local reply, now = begin(keys, args, tk)
    if reply then return reply end
    local a, b = op(args)
    a = tostring(a) -- as a retry gets it back
    remember(tk, now, a, b)
    return finish(a, b)
  end
end

-- ------------------------------------------------------------------ operations

local function refused()
  return redis.error_reply('pendingledger: test operations are off in this namespace ' ..
    '(only pendingledger.redis.testing turns them on, for tests)')
end

-- enter epoch hw symbol units order_id token config kind [mode]
--   config: "ttl_us|max_pos|max_gross|max_sym" (a limit '' when none); kind: the amount's kind
--   bit. mode: '' (check and reserve), 'check' (check only: the first half of the deliberately
--   broken gates of the stress suite and the race demo) or 'force' (reserve unchecked: the
--   second half); both test operations, refused unless meta's `testing` field is '1'.
-- -> {'A', reserved_at_us, expiry_us} | {'D', reason} | {'X'} (order_id held by another call)
--    | {'C'} (mode 'check' passed)
local function enter(keys, args)
  bind(keys)
  load()
  local sym, units, id, token = args[3], args[4], args[5], args[6]
  local ttl, max_pos, max_gross, max_sym = string.match(args[7], '^(%d+)|(%d*)|(%d*)|(%d*)$')
  local mode = args[9] or ''
  if mode ~= '' and not (S.testing and (mode == 'check' or mode == 'force')) then
    return refused()
  end
  local function deny(reason)
    if mode ~= 'check' then redis.call('HINCRBY', K_STATS, 'denied:' .. reason, 1) end
    return finish('D', reason)
  end
  if not usable(args) then return deny('book_not_restored') end
  local now = now_us()
  sweep(now)
  local rec = redis.call('HGET', K_ORD, id)
  if rec then
    local _, t, at = parse_rec(rec)
    if t == token then -- the same call, sent again by a client retry after a lost reply
      return finish('A', at, redis.call('ZSCORE', K_EXP, id))
    end
    return finish('X')
  end
  local pos = redis.call('HGET', K_POS, sym)
  local rs = redis.call('HGET', K_RSYM, sym)
  if S.halted then return deny('halted') end
  if mode ~= 'force' then
    local uw, uf = split(units)
    if max_pos ~= '' and not pos and not rs
        and S.npos + S.rsyms - S.ropen >= tonumber(max_pos) then
      return deny('max_concurrent_positions')
    end
    if max_gross ~= '' then
      local gw, gf = add(S.pw, S.pf, S.rw, S.rf)
      gw, gf = add(gw, gf, uw, uf)
      local lw, lf = split(max_gross)
      if gt(gw, gf, lw, lf) then return deny('max_gross_exposure') end
    end
    if max_sym ~= '' then
      local pw, pf = split(pos)
      local sw, sf = split(rs)
      pw, pf = add(pw, pf, sw, sf)
      pw, pf = add(pw, pf, uw, uf)
      local lw, lf = split(max_sym)
      if gt(pw, pf, lw, lf) then return deny('max_symbol_exposure') end
    end
  end
  if mode == 'check' then return finish('C') end
  local at, expiry = int(now), int(now + tonumber(ttl))
  insert(id, sym, units, token, at, expiry, pos ~= false, rs, tonumber(args[8]) or 0)
  redis.call('HINCRBY', K_STATS, 'admitted', 1)
  return finish('A', at, expiry)
end

-- release_order epoch hw call_token order_id token -> {1} | {0}
--   token: the reservation's ('' = whichever reservation has that id).
local function release_order(args)
  local id, token = args[4], args[5]
  local rec = redis.call('HGET', K_ORD, id)
  if not rec then return 0 end
  if token ~= '' then
    local _, t = parse_rec(rec)
    if t ~= token then return 0 end
  end
  drop(id, rec, 'released')
  return 1
end

-- release_symbol epoch hw call_token symbol -> {number of reservations dropped}
--   A walk of every reservation: dropping all of a symbol's is rare, and an index by symbol
--   would cost every reservation two more writes.
local function release_symbol(args)
  local sym = args[4]
  local all = redis.call('HGETALL', K_ORD)
  local n = 0
  for i = 1, #all, 2 do
    local id, rec = all[i], all[i + 1]
    if id ~= '' then
      local _, _, _, rsym = parse_rec(rec)
      if rsym == sym then
        drop(id, rec, 'released')
        n = n + 1
      end
    end
  end
  return n
end

-- reduce epoch hw call_token order_id token down up
--   A partial fill of `down` to `up` units (_units.reduction_units); token '' = whichever
--   reservation has that id. -> {'R', remaining} | {'E'} (ended now, as filled) | {'G'} (gone)
local function reduce(args)
  local id, token = args[4], args[5]
  local rec = redis.call('HGET', K_ORD, id)
  if not rec then return 'G' end
  if token ~= '' then
    local _, t = parse_rec(rec)
    if t ~= token then return 'G' end
  end
  return reduce_rec(id, rec, args[6], args[7])
end

-- set_position epoch hw call_token symbol value -> {1} if it was open before, else {0}
local function set_position(args)
  if set_pos(args[4], args[5]) then return 1 end
  return 0
end

-- close_position epoch hw call_token symbol -> {1} if it was open, else {0}
local function close_position(args)
  if close_pos(args[4]) then return 1 end
  return 0
end

-- fill epoch hw call_token order_id value symbol down up
--   Sets the position to `value` and, for the reservation with that id, ends it (down and up
--   '') or reduces it by a fill of `down` to `up` units, in one step.
-- -> {'F', symbol} (reservation ended) | {'R', symbol} (reduced) | {'P', symbol} (no
--    reservation; position set from the given symbol) | {'N'} (no reservation and no symbol:
--    nothing written) | {'M', actual_symbol} (a different symbol: nothing written)
local function fill(args)
  local id, value, sym, down, up = args[4], args[5], args[6], args[7], args[8]
  local rec = redis.call('HGET', K_ORD, id)
  if not rec then
    if sym == '' then return 'N' end
    set_pos(sym, value)
    return 'P', sym
  end
  local _, _, _, rsym = parse_rec(rec)
  if sym ~= '' and sym ~= rsym then return 'M', rsym end
  set_pos(rsym, value)
  if up == '' then
    drop(id, rec, 'filled')
    return 'F', rsym
  end
  if reduce_rec(id, rec, down, up) == 'E' then return 'F', rsym end
  return 'R', rsym
end

-- status epoch hw order_id token -> {'A', units} | {'G'}  (read-only: an overdue one is gone)
local function status(keys, args)
  bind(keys)
  load()
  local rec = redis.call('HGET', K_ORD, args[3])
  if not rec then return finish('G') end
  local units, t = parse_rec(rec)
  if args[4] ~= '' and t ~= args[4] then return finish('G') end
  local score = tonumber(redis.call('ZSCORE', K_EXP, args[3]))
  if score and score <= now_us() then return finish('G') end
  return finish('A', units)
end

-- restore epoch hw only_if_missing gen ttl_us n_pos [symbol value]*n_pos
--   [order_id symbol units token kind]*
--   Replaces the book and the reservations (keeps `halted`, the test clock and the stats),
--   writes every sentinel and the marker, and starts a new epoch of the mark. Every total is
--   formed (and an overflow raised) before the first write; the first write then withdraws the
--   marker, so a restore that still fails part-way leaves the namespace unrestored, never a
--   partial book that the old marker vouches for. A retry of a restore that already ran finds
--   its generation in the marker and gets the first answer.
-- -> {'R', now_us} | {'S'} (only_if_missing and the book is in place: nothing written)
local function restore(keys, args)
  bind(keys)
  load()
  if S.gen and S.gen == args[4] then return finish('R', S.restored_at) end
  if args[3] == '1' and usable(args) then return finish('S') end
  local now = now_us()
  local at, expiry = int(now), int(now + tonumber(args[5]))
  local npos = tonumber(args[6])
  local pw, pf = 0, 0
  local open = {}
  local i = 7
  for _ = 1, npos do
    local w, f = split(args[i + 1])
    pw, pf = add(pw, pf, w, f)
    open[args[i]] = true
    i = i + 2
  end
  local first_order = i
  local per, syms, ids = {}, {}, {}
  local gw, gf, kinds, norders = 0, 0, 0, 0
  while i <= #args do
    local id, sym = args[i], args[i + 1]
    if ids[id] then return redis.error_reply('pendingledger: order_id twice in restore') end
    ids[id] = true
    local w, f = split(args[i + 2])
    local t = per[sym]
    if not t then
      t = {0, 0}
      per[sym] = t
      syms[#syms + 1] = sym
    end
    t[1], t[2] = add(t[1], t[2], w, f)
    gw, gf = add(gw, gf, w, f)
    kinds = bit.bor(kinds, tonumber(args[i + 4]))
    norders = norders + 1
    i = i + 5
  end
  local res_open = 0
  for _, sym in ipairs(syms) do
    if open[sym] then res_open = res_open + 1 end
  end
  -- The first write withdraws the marker.
  redis.call('HDEL', K_META, 'gen', 'restored_at')
  redis.call('DEL', K_POS, K_RSYM, K_ORD, K_EXP, K_CALLS, K_CALLEXP)
  redis.call('HSET', K_POS, '', '')
  redis.call('HSET', K_RSYM, '', '')
  redis.call('HSET', K_ORD, '', '')
  redis.call('ZADD', K_EXP, '+inf', '')
  redis.call('HSET', K_CALLS, '', '')
  redis.call('ZADD', K_CALLEXP, '+inf', '')
  i = 7
  for _ = 1, npos do
    redis.call('HSET', K_POS, args[i], args[i + 1])
    i = i + 2
  end
  i = first_order
  while i <= #args do
    local id, sym = args[i], args[i + 1]
    redis.call('HSET', K_ORD, id, args[i + 2] .. '|' .. args[i + 3] .. '|' .. at .. '|' .. sym)
    redis.call('ZADD', K_EXP, expiry, id)
    i = i + 5
  end
  for _, sym in ipairs(syms) do
    local t = per[sym]
    redis.call('HSET', K_RSYM, sym, fmt(t[1], t[2]))
  end
  if norders > 0 then redis.call('HINCRBY', K_STATS, 'restored', norders) end
  S.epoch = math.max(S.epoch + 1, (tonumber(args[1]) or 0) + 1, time_us())
  S.hw = 0
  S.npos, S.pw, S.pf, S.rw, S.rf = npos, pw, pf, gw, gf
  S.rsyms, S.ropen, S.nres, S.kinds = #syms, res_open, norders, kinds
  redis.call('HSET', K_META, 'gen', args[4], 'layout', LAYOUT, 'restored_at', at,
    'epoch', int(S.epoch), 'hw', 0,
    'npos', npos, 'pos_gross', fmt(pw, pf), 'res_gross', fmt(gw, gf), 'res_syms', #syms,
    'res_open', res_open, 'nres', norders, 'kinds', kinds)
  return finish('R', at)
end

-- marker epoch hw -> {1} if the book is in place (restored, nothing evicted, the mark not
--   behind the caller's), else {0}. Withdraws the marker when it finds the book untrustworthy.
local function marker(keys, args)
  bind(keys)
  load()
  if usable(args) then return finish(1) end
  return finish(0)
end

-- sweep epoch hw -> {number of expired reservations dropped}
local function sweep_op(keys, args)
  bind(keys)
  load()
  if not usable(args) then return finish(0) end
  local now = now_us()
  sweep_calls(now)
  return finish(sweep(now))
end

-- stats epoch hw -> {stats hash as a flat list, outstanding reservations, reserved gross units,
--   kinds}. Sweeps first when the book is usable, so a reservation past its expiry counts as
--   expired, never as outstanding (as in the in-process ledger).
local function stats(keys, args)
  bind(keys)
  load()
  if usable(args) then sweep(now_us()) end
  return finish(redis.call('HGETALL', K_STATS), S.nres, fmt(S.rw, S.rf), S.kinds)
end

-- clock epoch hw step_us freeze -> {now_us after the step}
--   The namespace's test clock (pendingledger.redis.testing; nothing else sends this). Moves
--   now forward by step_us (whole microseconds >= 0) for every later call in the namespace; an
--   expiry it passes is swept by the next call. freeze '1' first stops TIME at its current
--   reading. A step that would bring now to 2^52 us is refused with nothing written. Moving or
--   freezing is refused unless meta's `testing` field is '1'; a step of 0 only reads the clock.
local function clock(keys, args)
  bind(keys)
  load()
  local step, freeze = args[3], args[4] == '1'
  if step ~= '0' and not string.match(step, '^[1-9]%d*$') then
    return redis.error_reply('pendingledger: clock step must be whole microseconds >= 0')
  end
  if (step ~= '0' or freeze) and not S.testing then return refused() end
  local frozen = S.frozen
  if freeze and not frozen then frozen = time_us() end
  local now = (frozen or time_us()) + S.off + tonumber(step)
  if now >= CLOCK_MAX then
    return redis.error_reply('pendingledger: clock overflow: the test clock would pass 2^52 us')
  end
  if step ~= '0' then redis.call('HINCRBY', K_META, 'clock_us', step) end
  if frozen ~= S.frozen then redis.call('HSET', K_META, 'clock_frozen_us', int(frozen)) end
  return finish(int(now))
end

-- snapshot epoch hw -> {now_us, meta, pos, rsym, orders, exp, stats} (flat lists), read-only,
--   in one consistent view (for audits and tests); the sentinels are left in.
local function snapshot(keys, args)
  bind(keys)
  load()
  return finish(
    int(now_us()),
    redis.call('HGETALL', K_META),
    redis.call('HGETALL', K_POS),
    redis.call('HGETALL', K_RSYM),
    redis.call('HGETALL', K_ORD),
    redis.call('ZRANGE', K_EXP, 0, -1, 'WITHSCORES'),
    redis.call('HGETALL', K_STATS),
    redis.call('EXISTS', K_CALLS, K_CALLEXP))
end

-- ------------------------------------------------------------------ registration

local function register(name, fn, read_only)
  local flags = {}
  if read_only then flags = {'no-writes'} end
  redis.register_function{function_name = 'pl@VERSION@_' .. name, callback = fn, flags = flags}
end

register('enter', enter)
register('release_order', kept(release_order))
register('release_symbol', kept(release_symbol))
register('reduce', kept(reduce))
register('set_position', kept(set_position))
register('close_position', kept(close_position))
register('fill', kept(fill))
register('status', status, true)
register('restore', restore)
register('marker', marker)
register('sweep', sweep_op)
register('stats', stats)
register('clock', clock)
register('snapshot', snapshot, true)
