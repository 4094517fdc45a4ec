-- pendingledger: the Redis gate's one server-side script.
--
-- Every operation of RedisGate is one EVALSHA of this script, so each runs atomically in the
-- server: a decision reads the book and the reservations and, when it admits, reserves in the
-- same step. ARGV[1] names the operation; the other arguments depend on it (see each op below).
--
-- Keys (all under one hash tag {ns}, so Redis Cluster keeps them in one slot):
--   KEYS[1] meta    hash   gen (restore generation), run (server run_id at restore), restored_at,
--                          halted; clock_us, clock_frozen_us (the test clock: see Time);
--                          testing ('1': the test operations are on, see 'clock' and 'enter')
--   KEYS[2] pos     hash   symbol -> signed position exposure in units (see Amounts)
--   KEYS[3] tot     hash   pos_gross, res_gross (units); res_syms, res_open (counts)
--   KEYS[4] rsym    hash   symbol -> units reserved on it (present iff it has a reservation)
--   KEYS[5] rcnt    hash   symbol -> number of outstanding reservations on it
--   KEYS[6] orders  hash   order_id -> "units|token|reserved_at_us|symbol"
--   KEYS[7] exp     zset   order_id scored by expiry (microseconds, on the clock of Time below)
--   KEYS[8] bysym   zset   member(symbol, order_id), score 0 (lexicographic index: see member)
--   KEYS[9] stats   hash   admitted, denied:<reason>, released, filled, expired, restored, corrupt
--   KEYS[10] calls  hash   call token -> the answer that call got (see Retries)
--   KEYS[11] callexp zset  call token scored by when its answer is forgotten (microseconds)
--
-- Amounts: exact non-negative integers of units (1 unit = 10^-9 of the account currency) kept as
-- decimal strings. Lua numbers are doubles, exact only up to 2^53, so a value is handled as two
-- limbs (w, f) = (value div 10^9, value mod 10^9); w must stay below 2^53. The client refuses
-- single amounts of 10^15 or more; a total that would pass 2^53 raises an error before the
-- operation writes anything of its own (only the sweep of expired reservations that starts most
-- operations may have run, which is right whatever follows). `restore` forms all its totals
-- before its first write. No float is ever summed here.
--
-- Time comes from the server (TIME), never from a client: "now" is TIME in microseconds plus the
-- namespace's test clock, two fields of `meta` that only pendingledger.redis.testing writes (op
-- 'clock', refused unless that module has set meta's `testing` field) and that are absent in
-- production, where now is TIME itself:
--   clock_us          microseconds added to TIME; only grows (a client sends steps, not times)
--   clock_frozen_us   if present, the TIME reading the clock was frozen at: TIME is not read
--                     and now moves only when clock_us does (like trio's MockClock at rate 0)
-- They are read inside the same script call, never by a separate command from the client: a
-- decision ('enter') gets them from the HMGET of meta it makes anyway, so the test clock adds no
-- round trip to any operation and no command at all to a decision.
--
-- Retries: a client that loses a reply (a timeout) may send the same call again. 'enter' carries
-- a token stored with the reservation it makes and answers a repeat from it. Every other call that
-- writes the book or ends reservations (fill, release_order, release_symbol, reduce,
-- set_position, close_position) carries a random per-call token: its answer is kept under that
-- token in `calls` for CALL_MEMO_US, and a repeat gets that answer without running again.
-- 'restore' is recognised by its generation (new for each call) in the marker.
--
-- No key gets a TTL (no PEXPIRE): a reservation expires through its score in `exp` (its expiry on
-- this same clock), swept at the start of every operation that decides or writes, and by 'sweep'
-- and 'stats', at a cost of O(expired). It is expired from the instant now >= expiry =
-- reserved_at + ttl, as in the in-process ledger. Kept answers are swept the same way through
-- `callexp` by the operations that keep them and by 'sweep' and 'stats' (not by decisions).

if redis.replicate_commands then pcall(redis.replicate_commands) end

local K_META, K_POS, K_TOT, K_RSYM = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_RCNT, K_ORD, K_EXP, K_BYSYM, K_STATS = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_CALLS, K_CALLEXP = KEYS[10], KEYS[11]

local B = 1000000000
local MAXW = 9007199254740991 -- 2^53 - 1
local SWEEP_MAX = 1000 -- expired reservations dropped per call (the rest at the next calls)
local CALL_MEMO_US = 300000000 -- 5 minutes: how long a call's answer is kept for its retries
local CLOCK_MAX = 4503599627370496 -- 2^52 us (year 2112): the test clock stops short of it, so
                                   -- now + ttl stays an exact integer in a double

-- ------------------------------------------------------------------ amounts as two limbs

-- "units" (optionally signed) -> w, f of its absolute value
local function split(s)
  if not s or s == '' then return 0, 0 end
  if string.byte(s, 1) == 45 then s = string.sub(s, 2) end -- '-'
  local n = #s
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
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

-- a - b, clamped at 0; the second result is true if it had to clamp (a bookkeeping error)
local function sub(aw, af, bw, bf)
  local w, f = aw - bw, af - bf
  if f < 0 then f = f + B; w = w - 1 end
  if w < 0 then return 0, 0, true end
  return w, f, false
end

-- a > b
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

-- now in microseconds: TIME (or the frozen reading) plus the test clock's offset. `off` and
-- `frozen` are meta's clock_us and clock_frozen_us as read by the caller in this same call
-- (false: absent); called without them, it reads them here.
local function now_us(off, frozen)
  if off == nil then
    local m = redis.call('HMGET', K_META, 'clock_us', 'clock_frozen_us')
    off, frozen = m[1], m[2]
  end
  return (tonumber(frozen) or time_us()) + (tonumber(off) or 0)
end

-- "units|token|reserved_at_us|symbol" -> units, token, reserved_at, symbol
local function parse_rec(rec)
  local a = string.find(rec, '|', 1, true)
  local b = string.find(rec, '|', a + 1, true)
  local c = string.find(rec, '|', b + 1, true)
  return string.sub(rec, 1, a - 1), string.sub(rec, a + 1, b - 1),
    string.sub(rec, b + 1, c - 1), string.sub(rec, c + 1)
end

-- ------------------------------------------------------------------ book keeping

-- The symbol index's member of one reservation: the symbol escaped to hold no NUL byte (byte 1
-- becomes 1 1, byte 0 becomes 1 2), a NUL, the order id. The first NUL of a member ends its
-- symbol, so one symbol's members never fall in another's range (see release_symbol), whatever
-- bytes symbols and order ids hold. A symbol without bytes 0 and 1 is its own escape.
local ESCAPES = {['\0'] = '\1\2', ['\1'] = '\1\1'}
local function escaped(sym)
  if not string.find(sym, '[%z\1]') then return sym end
  return (string.gsub(sym, '[%z\1]', ESCAPES))
end

local function member(sym, id)
  return escaped(sym) .. '\0' .. id
end

local function corrupt()
  redis.call('HINCRBY', K_STATS, 'corrupt', 1)
end

-- Add a reservation. `rs` and `rg` are the symbol's reserved units and the reserved gross as
-- read by the caller in this same call (false/nil: read them here). The sums are formed (and may
-- raise on overflow) before anything is written.
local function insert(id, sym, units, token, at, expiry, sym_open, rs, rg)
  if rs == nil then rs = redis.call('HGET', K_RSYM, sym) end
  if rg == nil then rg = redis.call('HGET', K_TOT, 'res_gross') end
  local uw, uf = split(units)
  local sw, sf = split(rs)
  local gw, gf = split(rg)
  sw, sf = add(sw, sf, uw, uf)
  gw, gf = add(gw, gf, uw, uf)
  redis.call('HSET', K_ORD, id, units .. '|' .. token .. '|' .. at .. '|' .. sym)
  redis.call('ZADD', K_EXP, expiry, id)
  redis.call('ZADD', K_BYSYM, 0, member(sym, id))
  redis.call('HSET', K_RSYM, sym, fmt(sw, sf))
  if redis.call('HINCRBY', K_RCNT, sym, 1) == 1 then
    redis.call('HINCRBY', K_TOT, 'res_syms', 1)
    if sym_open then redis.call('HINCRBY', K_TOT, 'res_open', 1) end
  end
  redis.call('HSET', K_TOT, 'res_gross', fmt(gw, gf))
end

-- End a reservation; `counter` is the stats field that counts how it ended.
local function drop(id, rec, counter)
  local units, _, _, sym = parse_rec(rec)
  local uw, uf = split(units)
  local rw, rf = split(redis.call('HGET', K_RSYM, sym))
  local sw, sf, bad1 = sub(rw, rf, uw, uf)
  local tw, tf = split(redis.call('HGET', K_TOT, 'res_gross'))
  local gw, gf, bad2 = sub(tw, tf, uw, uf)
  redis.call('HDEL', K_ORD, id)
  redis.call('ZREM', K_EXP, id)
  redis.call('ZREM', K_BYSYM, member(sym, id))
  if redis.call('HINCRBY', K_RCNT, sym, -1) <= 0 then
    if sw ~= 0 or sf ~= 0 then bad1 = true end
    redis.call('HDEL', K_RSYM, sym)
    redis.call('HDEL', K_RCNT, sym)
    redis.call('HINCRBY', K_TOT, 'res_syms', -1)
    if redis.call('HEXISTS', K_POS, sym) == 1 then
      redis.call('HINCRBY', K_TOT, 'res_open', -1)
    end
  else
    redis.call('HSET', K_RSYM, sym, fmt(sw, sf))
  end
  redis.call('HSET', K_TOT, 'res_gross', fmt(gw, gf))
  if bad1 or bad2 then corrupt() end
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

-- Set a position (signed units string); returns true if the symbol was open before.
-- Raises (overflow) before writing anything.
local function set_pos(sym, units)
  local old = redis.call('HGET', K_POS, sym)
  local ow, of = split(old)
  local nw, nf = split(units)
  local pw, pf = split(redis.call('HGET', K_TOT, 'pos_gross'))
  local bad
  pw, pf = add(pw, pf, nw, nf)
  pw, pf, bad = sub(pw, pf, ow, of)
  redis.call('HSET', K_POS, sym, units)
  redis.call('HSET', K_TOT, 'pos_gross', fmt(pw, pf))
  if not old and redis.call('HEXISTS', K_RSYM, sym) == 1 then
    redis.call('HINCRBY', K_TOT, 'res_open', 1)
  end
  if bad then corrupt() end
  return old ~= false
end

local function close_pos(sym)
  local old = redis.call('HGET', K_POS, sym)
  if not old then return false end
  local ow, of = split(old)
  local tw, tf = split(redis.call('HGET', K_TOT, 'pos_gross'))
  local pw, pf, bad = sub(tw, tf, ow, of)
  redis.call('HDEL', K_POS, sym)
  redis.call('HSET', K_TOT, 'pos_gross', fmt(pw, pf))
  if redis.call('HEXISTS', K_RSYM, sym) == 1 then
    redis.call('HINCRBY', K_TOT, 'res_open', -1)
  end
  if bad then corrupt() end
  return true
end

-- ------------------------------------------------------------------ answers kept for retries

-- The answer kept for call token `tk`, or nil. Answers are encoded as: '#' .. n for a number n,
-- k for {k} and k .. '=' .. s for {k, s} (k is one letter; s any string).
local function replayed(tk)
  if tk == '' then return nil end
  local enc = redis.call('HGET', K_CALLS, tk)
  if not enc then return nil end
  if string.byte(enc, 1) == 35 then return tonumber(string.sub(enc, 2)) end -- '#'
  if #enc == 1 then return {enc} end
  return {string.sub(enc, 1, 1), string.sub(enc, 3)}
end

-- Keep `reply` (a number, {k} or {k, s}) as the answer of call token `tk`; return it.
local function remember(tk, now, reply)
  if tk ~= '' then
    local enc
    if type(reply) == 'number' then
      enc = '#' .. int(reply)
    elseif reply[2] == nil then
      enc = reply[1]
    else
      enc = reply[1] .. '=' .. reply[2]
    end
    redis.call('HSET', K_CALLS, tk, enc)
    redis.call('ZADD', K_CALLEXP, int(now + CALL_MEMO_US), tk)
  end
  return reply
end

-- Forget the answers whose time is up (at most SWEEP_MAX per call).
local function sweep_calls(now)
  local due = redis.call('ZRANGEBYSCORE', K_CALLEXP, '-inf', now, 'LIMIT', 0, SWEEP_MAX)
  if #due > 0 then
    redis.call('HDEL', K_CALLS, unpack(due))
    redis.call('ZREM', K_CALLEXP, unpack(due))
  end
end

-- The start of an operation with call token `tk`: returns the kept answer if the call already
-- ran (a retry), else nil and now, after sweeping expired reservations and answers.
local function begin(tk)
  local again = replayed(tk)
  if again ~= nil then return again, nil end
  local now = now_us()
  sweep(now)
  sweep_calls(now)
  return nil, now
end

-- The generation marker: present, and (unless the client trusts persistence) written while the
-- server ran with the run_id it has now. A restart reloading an old snapshot, a failover to a
-- replica or a wiped namespace all fail this check.
local function run_id()
  local info = redis.call('INFO', 'server')
  return string.match(info, 'run_id:(%x+)') or ''
end

local function book_ok(meta_gen, meta_run, trust)
  if not meta_gen then return false end
  if trust == '1' then return true end
  return meta_run == run_id()
end

-- ------------------------------------------------------------------ operations

local op = ARGV[1]

-- enter symbol units order_id token ttl_us max_pos max_gross max_sym trust mode
--   max_* are '' for no limit; mode is '' (check and reserve), 'check' (check only, reserve
--   nothing: the first half of the deliberately broken gates of the stress suite and the race
--   demo) or 'force' (reserve without checking: the second half). 'check' and 'force' are test
--   operations: refused (nothing written) unless meta's `testing` field is '1', read in the
--   HMGET of meta the decision makes anyway.
-- -> {'A', reserved_at_us, expiry_us} | {'D', reason} | {'X'} (order_id held by another call)
--    | {'C'} (mode 'check' passed)
if op == 'enter' then
  local sym, units, id, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
  local ttl = tonumber(ARGV[6])
  local mode = ARGV[11] or ''
  local meta = redis.call('HMGET', K_META, 'gen', 'run', 'halted', 'clock_us', 'clock_frozen_us',
    'testing')
  if mode ~= '' and (meta[6] ~= '1' or (mode ~= 'check' and mode ~= 'force')) then
    return redis.error_reply('pendingledger: enter mode ' .. mode .. ' refused: test ' ..
      'operations are off in this namespace (only pendingledger.redis.testing turns them on)')
  end
  if not book_ok(meta[1], meta[2], ARGV[10]) then
    if mode ~= 'check' then redis.call('HINCRBY', K_STATS, 'denied:book_not_restored', 1) end
    return {'D', 'book_not_restored'}
  end
  local now = now_us(meta[4], meta[5])
  sweep(now)
  local rec = redis.call('HGET', K_ORD, id)
  if rec then
    local _, t, at = parse_rec(rec)
    if t == token then
      -- the same call, sent again by a client retry after a lost reply: answer as before
      return {'A', at, redis.call('ZSCORE', K_EXP, id)}
    end
    return {'X'}
  end
  local reason = nil
  local pos = redis.call('HGET', K_POS, sym)
  local rs = redis.call('HGET', K_RSYM, sym)
  local tot = redis.call('HMGET', K_TOT, 'pos_gross', 'res_gross', 'res_syms', 'res_open')
  local uw, uf = split(units)
  if meta[3] == '1' then
    reason = 'halted'
  elseif mode ~= 'force' then
    if ARGV[7] ~= '' and not pos and not rs then
      local slots = (tonumber(tot[3]) or 0) - (tonumber(tot[4]) or 0)
      if redis.call('HLEN', K_POS) + slots >= tonumber(ARGV[7]) then
        reason = 'max_concurrent_positions'
      end
    end
    if not reason and ARGV[8] ~= '' then
      local pw, pf = split(tot[1])
      local gw, gf = split(tot[2])
      local lw, lf = split(ARGV[8])
      pw, pf = add(pw, pf, gw, gf)
      pw, pf = add(pw, pf, uw, uf)
      if gt(pw, pf, lw, lf) then reason = 'max_gross_exposure' end
    end
    if not reason and ARGV[9] ~= '' then
      local pw, pf = split(pos)
      local sw, sf = split(rs)
      local lw, lf = split(ARGV[9])
      pw, pf = add(pw, pf, sw, sf)
      pw, pf = add(pw, pf, uw, uf)
      if gt(pw, pf, lw, lf) then reason = 'max_symbol_exposure' end
    end
  end
  if reason then
    if mode ~= 'check' then redis.call('HINCRBY', K_STATS, 'denied:' .. reason, 1) end
    return {'D', reason}
  end
  if mode == 'check' then return {'C'} end
  -- insert() computes its sums (which may overflow and raise) before it writes anything
  local at, expiry = int(now), int(now + ttl)
  insert(id, sym, units, token, at, expiry, pos ~= false, rs, tot[2])
  redis.call('HINCRBY', K_STATS, 'admitted', 1)
  return {'A', at, expiry}
end

-- release_order order_id token call_token -> 1 | 0
--   token: the reservation's ('' = whichever reservation has that id); call_token: see Retries.
if op == 'release_order' then
  local id, token, tk = ARGV[2], ARGV[3], ARGV[4] or ''
  local again, now = begin(tk)
  if again ~= nil then return again end
  local rec = redis.call('HGET', K_ORD, id)
  if not rec then return remember(tk, now, 0) end
  if token ~= '' then
    local _, t = parse_rec(rec)
    if t ~= token then return remember(tk, now, 0) end
  end
  drop(id, rec, 'released')
  return remember(tk, now, 1)
end

-- release_symbol symbol call_token -> number of reservations dropped
if op == 'release_symbol' then
  local sym, tk = ARGV[2], ARGV[3] or ''
  local again, now = begin(tk)
  if again ~= nil then return again end
  local esc = escaped(sym)
  local members = redis.call('ZRANGEBYLEX', K_BYSYM, '[' .. esc .. '\0', '(' .. esc .. '\1')
  local prefix = #esc + 2
  for i = 1, #members do
    local id = string.sub(members[i], prefix)
    local rec = redis.call('HGET', K_ORD, id)
    if rec then
      drop(id, rec, 'released')
    else
      redis.call('ZREM', K_BYSYM, members[i])
      corrupt()
    end
  end
  return remember(tk, now, #members)
end

-- reduce order_id token remaining_units call_token
--   -> {'R', remaining} | {'E'} (ended now) | {'G'} (gone)
--   Lowers the reservation to `remaining_units` (never raises it); '0' ends it ('filled').
if op == 'reduce' then
  local id, token, want, tk = ARGV[2], ARGV[3], ARGV[4], ARGV[5] or ''
  local again, now = begin(tk)
  if again ~= nil then return again end
  local rec = redis.call('HGET', K_ORD, id)
  if not rec then return remember(tk, now, {'G'}) end
  local units, t, at, sym = parse_rec(rec)
  if t ~= token then return remember(tk, now, {'G'}) end
  local uw, uf = split(units)
  local nw, nf = split(want)
  if nw == 0 and nf == 0 then
    drop(id, rec, 'filled')
    return remember(tk, now, {'E'})
  end
  if not gt(uw, uf, nw, nf) then return remember(tk, now, {'R', units}) end
  local dw, df = sub(uw, uf, nw, nf)
  local rw, rf = split(redis.call('HGET', K_RSYM, sym))
  local gw, gf = split(redis.call('HGET', K_TOT, 'res_gross'))
  local bad1, bad2
  rw, rf, bad1 = sub(rw, rf, dw, df)
  gw, gf, bad2 = sub(gw, gf, dw, df)
  redis.call('HSET', K_ORD, id, want .. '|' .. t .. '|' .. at .. '|' .. sym)
  redis.call('HSET', K_RSYM, sym, fmt(rw, rf))
  redis.call('HSET', K_TOT, 'res_gross', fmt(gw, gf))
  if bad1 or bad2 then corrupt() end
  return remember(tk, now, {'R', want})
end

-- status order_id token -> {'A', units} | {'G'}   (read-only: an overdue one counts as gone)
if op == 'status' then
  local id, token = ARGV[2], ARGV[3]
  local rec = redis.call('HGET', K_ORD, id)
  if not rec then return {'G'} end
  local units, t = parse_rec(rec)
  if token ~= '' and t ~= token then return {'G'} end
  local score = tonumber(redis.call('ZSCORE', K_EXP, id))
  if score and score <= now_us() then return {'G'} end
  return {'A', units}
end

-- set_position symbol signed_units call_token -> 1 if it was open before, else 0
if op == 'set_position' then
  local tk = ARGV[4] or ''
  local again, now = begin(tk)
  if again ~= nil then return again end
  if set_pos(ARGV[2], ARGV[3]) then return remember(tk, now, 1) end
  return remember(tk, now, 0)
end

-- close_position symbol call_token -> 1 if it was open, else 0
if op == 'close_position' then
  local tk = ARGV[3] or ''
  local again, now = begin(tk)
  if again ~= nil then return again end
  if close_pos(ARGV[2]) then return remember(tk, now, 1) end
  return remember(tk, now, 0)
end

-- fill order_id signed_units symbol ('' = the reservation's) call_token
--   Sets the position and ends the reservation (whichever has that id) in one step.
-- -> {'F', symbol} | {'P', symbol} (no reservation; position set from the given symbol)
--    | {'N'} (no reservation and no symbol: nothing written) | {'M', actual_symbol} (mismatch)
if op == 'fill' then
  local id, units, sym, tk = ARGV[2], ARGV[3], ARGV[4], ARGV[5] or ''
  local again, now = begin(tk)
  if again ~= nil then return again end
  local rec = redis.call('HGET', K_ORD, id)
  if rec then
    local _, _, _, rsym = parse_rec(rec)
    if sym ~= '' and sym ~= rsym then return remember(tk, now, {'M', rsym}) end
    sym = rsym
  end
  if not rec then
    if sym == '' then return remember(tk, now, {'N'}) end
    set_pos(sym, units)
    return remember(tk, now, {'P', sym})
  end
  set_pos(sym, units)
  drop(id, rec, 'filled')
  return remember(tk, now, {'F', sym})
end

-- restore only_if_missing gen ttl_us trust n_pos [symbol units]*n_pos [order_id symbol units token]*
--   Replaces the book and the reservations (keeps `halted`, the test clock and the stats) and
--   writes the marker. Every total is formed (and an overflow raised) before the first write;
--   the first write then withdraws the marker, so a restore that still fails part-way leaves the
--   namespace unrestored (decisions denied with book_not_restored), never a partial book that
--   the old marker vouches for. `gen` is new for each call: a client retry of a restore that
--   already ran finds it in the marker and gets the first answer.
-- -> {'R', now_us} | {'S'} (only_if_missing and the book is in place: nothing written)
if op == 'restore' then
  local meta = redis.call('HMGET', K_META, 'gen', 'run', 'clock_us', 'clock_frozen_us',
    'restored_at')
  if book_ok(meta[1], meta[2], ARGV[5]) then
    if meta[1] == ARGV[3] then return {'R', meta[5]} end -- a retry of this very call
    if ARGV[2] == '1' then return {'S'} end
  end
  local now = now_us(meta[3], meta[4])
  local at, expiry = int(now), int(now + tonumber(ARGV[4]))
  -- Check everything and form every total first: nothing below raises after the first write.
  local npos = tonumber(ARGV[6])
  local open = {}
  local pw, pf = 0, 0
  local i = 7
  for _ = 1, npos do
    local w, f = split(ARGV[i + 1])
    pw, pf = add(pw, pf, w, f)
    open[ARGV[i]] = true
    i = i + 2
  end
  local first_order = i
  local per, syms, ids = {}, {}, {}
  local gw, gf = 0, 0
  local norders = 0
  while i <= #ARGV do
    local id, sym = ARGV[i], ARGV[i + 1]
    if ids[id] then return redis.error_reply('pendingledger: order_id twice in restore') end
    ids[id] = true
    local w, f = split(ARGV[i + 2])
    local t = per[sym]
    if not t then
      t = {0, 0, 0}
      per[sym] = t
      syms[#syms + 1] = sym
    end
    t[1], t[2] = add(t[1], t[2], w, f)
    t[3] = t[3] + 1
    gw, gf = add(gw, gf, w, f)
    norders = norders + 1
    i = i + 4
  end
  local res_open = 0
  for _, sym in ipairs(syms) do
    if open[sym] then res_open = res_open + 1 end
  end
  -- The first write withdraws the marker.
  redis.call('HDEL', K_META, 'gen', 'run', 'restored_at')
  redis.call('DEL', K_POS, K_TOT, K_RSYM, K_RCNT, K_ORD, K_EXP, K_BYSYM)
  i = 7
  for _ = 1, npos do
    redis.call('HSET', K_POS, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  i = first_order
  while i <= #ARGV do
    local id, sym = ARGV[i], ARGV[i + 1]
    redis.call('HSET', K_ORD, id, ARGV[i + 2] .. '|' .. ARGV[i + 3] .. '|' .. at .. '|' .. sym)
    redis.call('ZADD', K_EXP, expiry, id)
    redis.call('ZADD', K_BYSYM, 0, member(sym, id))
    i = i + 4
  end
  for _, sym in ipairs(syms) do
    local t = per[sym]
    redis.call('HSET', K_RSYM, sym, fmt(t[1], t[2]))
    redis.call('HSET', K_RCNT, sym, t[3])
  end
  redis.call('HSET', K_TOT, 'pos_gross', fmt(pw, pf), 'res_gross', fmt(gw, gf),
    'res_syms', #syms, 'res_open', res_open)
  if norders > 0 then redis.call('HINCRBY', K_STATS, 'restored', norders) end
  redis.call('HSET', K_META, 'gen', ARGV[3], 'run', run_id(), 'restored_at', at)
  return {'R', at}
end

-- marker trust -> 1 if the book is in place (restored on this server run), else 0
if op == 'marker' then
  local meta = redis.call('HMGET', K_META, 'gen', 'run')
  if book_ok(meta[1], meta[2], ARGV[2]) then return 1 end
  return 0
end

-- sweep -> number of expired reservations dropped
if op == 'sweep' then
  local now = now_us()
  sweep_calls(now)
  return sweep(now)
end

-- stats -> {stats hash as a flat list, outstanding reservations, reserved gross in units}
--   Sweeps first, like every operation that writes, so a reservation past its expiry counts as
--   expired, never as outstanding (as in the in-process ledger). Reads counters only.
if op == 'stats' then
  local now = now_us()
  sweep(now)
  sweep_calls(now)
  return {
    redis.call('HGETALL', K_STATS),
    redis.call('HLEN', K_ORD),
    redis.call('HGET', K_TOT, 'res_gross') or '0',
  }
end

-- clock step_us freeze -> now_us after the step
--   The namespace's test clock (pendingledger.redis.testing; nothing else sends this). Moves now
--   forward by step_us (a whole number >= 0) for every later call in the namespace, so an expiry
--   it passes is swept by the next call exactly as if that much time had gone by (this call
--   sweeps nothing, as time passing does not). freeze '1' first stops TIME at its current
--   reading, if it is not stopped already. A step that would bring now to 2^52 us is refused
--   with nothing written. Moving or freezing the clock is refused (nothing written) unless
--   meta's `testing` field is '1', which only pendingledger.redis.testing sets; a step of 0
--   without freeze only reads the clock and is always allowed.
if op == 'clock' then
  local step = ARGV[2]
  if step ~= '0' and not string.match(step, '^[1-9]%d*$') then
    return redis.error_reply('pendingledger: clock step must be whole microseconds >= 0')
  end
  local m = redis.call('HMGET', K_META, 'clock_us', 'clock_frozen_us', 'testing')
  if (step ~= '0' or ARGV[3] == '1') and m[3] ~= '1' then
    return redis.error_reply('pendingledger: test operations are off in this namespace ' ..
      '(only pendingledger.redis.testing turns them on, for tests)')
  end
  local frozen = m[2]
  if ARGV[3] == '1' and not frozen then frozen = int(time_us()) end
  local now = now_us(m[1], frozen) + tonumber(step)
  if now >= CLOCK_MAX then
    return redis.error_reply('pendingledger: clock overflow: the test clock would pass 2^52 us')
  end
  if step ~= '0' then redis.call('HINCRBY', K_META, 'clock_us', step) end
  if frozen ~= m[2] then redis.call('HSET', K_META, 'clock_frozen_us', frozen) end
  return int(now)
end

-- snapshot -> everything, read-only, in one consistent view (for audits and tests)
if op == 'snapshot' then
  return {
    int(now_us()),
    redis.call('HGETALL', K_META),
    redis.call('HGETALL', K_POS),
    redis.call('HGETALL', K_TOT),
    redis.call('HGETALL', K_RSYM),
    redis.call('HGETALL', K_RCNT),
    redis.call('HGETALL', K_ORD),
    redis.call('ZRANGE', K_EXP, 0, -1, 'WITHSCORES'),
    redis.call('ZRANGE', K_BYSYM, 0, -1),
    redis.call('HGETALL', K_STATS),
  }
end

return redis.error_reply('pendingledger: unknown operation ' .. tostring(op))
