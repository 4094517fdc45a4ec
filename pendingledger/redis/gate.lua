#!lua name=pendingledger_@VERSION@
-- pendingledger: the Redis gate's server code, one Redis Functions library.
--
-- Loaded once per server (FUNCTION LOAD; the client reloads it when FCALL finds it missing), so
-- a call runs only its own operation. The library and its functions carry the code's version
-- (@VERSION@, a digest of this file), so clients of different versions sharing a server never
-- run each other's code. Every operation is one function, called with FCALL and the namespace's
-- 3 keys, and runs atomically in the server: a decision reads the book and the reservations
-- and, when it admits, reserves in the same step, in one round trip.
--
-- The cost of a call is mostly the number of commands it sends (each redis.call costs a few
-- microseconds whatever it does), so a call reads every field it needs with one HMGET, keeps
-- what it changes in the tables below, and writes it back with one command per key (finish).
-- A decision is TIME, HMGET, HSET and ZADD; a release TIME, HMGET, HSET, ZREM and ZADD. After
-- the commands, what costs most is turning numbers into strings (a sprintf each) and packing
-- state: the hot paths do neither more than they must (see stamp, RING_NAMES, the two fields).
--
-- Keys (all under one hash tag {ns}, so Redis Cluster keeps them in one slot):
--   KEYS[1] book    hash  state: the marker, the epoch, the halt and test flags, the test clock
--                           and the counts a decision rarely changes; live: the rest of the
--                           fencing mark, the totals and the common counts (both packed, see
--                           STATE_FORMAT and LIVE_FORMAT below; gen 0 = not restored)
--                         p:<symbol>  the position's exposure in units (its magnitude)
--                         k:<symbol>  its sign ('+' or '-') and the letter of its kind
--                         r:<symbol>  units reserved on the symbol ('0' or absent: none)
--                         o:<order_id>  "units|token|reserved_at_us|ttl_us|symbol", or once
--                           ended a tombstone, '~' or '~<call_token>|<answer>' (kept for
--                           CALL_MEMO_US, see Retries)
--                         c:<call_token>  the answer that call got (see Retries)
--                         h:<n>  the fencing tag of the change that made hw n, n mod RING
--                           (see Fencing)
--   KEYS[2] expiry  zset  o:<order_id> of each outstanding reservation, scored by its expiry
--   KEYS[3] forget  zset  o:<order_id> of ended ones and c:<call_token>, scored by when they go
--   Both zsets hold the sentinel member '' at score -inf (see Eviction).
--
-- Amounts: exact non-negative integers of units (1 unit = 10^-9 of the account currency) kept as
-- decimal strings. Lua numbers are doubles, exact only up to 2^53, so a value is handled as two
-- limbs (w, f) = (value div 10^9, value mod 10^9); w must stay below 2^53. The client refuses
-- single amounts of 10^15 or more; a total that would pass 2^53 raises an error before the
-- operation writes anything (writes happen only in finish). No float is ever summed here.
--
-- Time comes from the server (TIME), never from a client: "now" is TIME in microseconds plus the
-- namespace's test clock (state's clock_us, and clock_frozen_us: the TIME reading the clock was
-- frozen at), which only pendingledger.redis.testing writes and only where state's `testing` flag
-- is on; absent in production. A reservation is expired from the instant now >= its expiry, as
-- in the in-process ledger: state's next_due is a lower bound of the earliest expiry, and a call
-- that finds now past it sweeps `expiry` (O(expired)). Ended records and kept answers are swept
-- from `forget` at most once a second (FORGET_EVERY_US), in one batch. No key gets a TTL.
--
-- Retries: a client that loses a reply (a timeout) may send the same call again. 'enter' carries
-- a token stored with the reservation it makes and answers a repeat from it. Every other call that
-- writes carries a random per-call token: its answer is kept for CALL_MEMO_US, in c:<token> or,
-- when the call ended a reservation, in that record's tombstone (see kept), and a repeat gets
-- that answer without running again. 'restore' is recognised by its generation.
--
-- Fencing: state's mark (epoch, hw, tag) names a point of one replication history. hw counts
-- the calls that changed the book, and each such call leaves a tag, its random token itself (or
-- its time or the restore's generation, in hex), in live and in the ring h:<hw mod RING>;
-- restore starts a new epoch (the server's clock in microseconds, always above the old epoch
-- and the caller's) with hw 0. Every
-- reply carries the mark, and every client keeps the highest it has seen and sends it with each
-- call. A server whose mark is behind a client's has lost writes that client saw (a failover to a
-- replica that had not received them, a resync from another primary, a restart from an old
-- snapshot); one that is level or ahead but holds another tag at the client's hw went on along
-- another history after losing them (other processes wrote as many times since). Either way the
-- call withdraws the marker, and every process is denied until restore. Beyond RING writes past
-- the client's hw the tag is no longer kept, and only "behind" can be seen.
--
-- Eviction: a key that is missing was evicted (or deleted). `book` holds the marker itself, so
-- without it nothing is restored; each zset holds the sentinel '' at -inf, which the sweep of
-- that zset always reads first: a sweep that does not find it withdraws the marker. Until the
-- sweep, a lost `expiry` only keeps reservations longer (over-blocking), a lost `forget` only
-- keeps answers longer. The ACL needs no @dangerous command (see the README).
--
-- Arguments and replies: every function's first three arguments are the caller's mark (epoch,
-- hw, tag; "mark" in the operations' descriptions below), and it returns {epoch, hw, tag, ...}:
-- the mark after the call, then its answer.

local B = 1000000000
local MAXW = 9007199254740991 -- 2^53 - 1
local SWEEP_MAX = 1000 -- expired reservations (or forgotten entries) dropped per sweep
-- How long a call's answer is kept for its retries: a minute, far beyond a client's retry (at
-- once, or after a backoff), and short enough that the book's ended records and kept answers
-- (one each per release or fill) stay a small part of it.
local CALL_MEMO_US = 60000000
local FORGET_EVERY_US = 1000000 -- `forget` is swept at most once a second of the server's clock
local CLOCK_MAX = 4503599627370496 -- 2^52 us (year 2112): the test clock stops short of it
local RING = 1024 -- writes whose fencing tags the book keeps (fields h:0 .. h:1023)

local K_BOOK, K_EXPIRY, K_FORGET

-- The ring's field names, made once: a number turned into a string costs a sprintf, and the
-- ring is read and written by nearly every call.
local RING_NAMES = {}
for i = 0, RING - 1 do RING_NAMES[i] = 'h:' .. i end

-- ------------------------------------------------------------------ amounts as two limbs

-- "units" -> w, f. A value below 10^15 is exact as a double: Lua converts it itself, and the
-- limbs come by arithmetic (VM operations, not function calls, which cost most of a call).
local function split(s)
  if not s then return 0, 0 end
  if #s < 16 then
    local n = s + 0
    local f = n % B
    return (n - f) / B, f
  end
  return tonumber(string.sub(s, 1, -10)), tonumber(string.sub(s, -9))
end

local function fmt(w, f)
  if w == 0 then
    if f == 0 then return '0' end
    return string.format('%d', f)
  end
  return string.format('%d%09d', w, f)
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

local function zero(w, f)
  return w == 0 and f == 0
end

-- an integral double as a decimal string (tostring() would print only 14 digits)
local function int(x)
  return string.format('%d', x)
end

-- "units|token|reserved_at_us|ttl_us|symbol" -> units, token, reserved_at, ttl, symbol
local function parse_rec(rec)
  return string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
end

local TILDE = 126 -- string.byte('~'): a tombstone's first byte

local function live(rec)
  return rec and string.byte(rec) ~= TILDE
end

-- ------------------------------------------------------------------ one call's state
--
-- S: the book's state and live fields, unpacked at the start of a call and changed in place.
-- F: every book field read in this call (false: absent), kept current by set(). The rest
-- collect the writes that finish() sends, one command per key. One call runs at a time, so
-- these tables are shared by all calls and reset by begin().

-- Little-endian doubles (struct; every value is an integer below 2^53, so exact), in two fields
-- so that a decision and a release pack only what they change (packing costs per field):
-- state, 16: layout (LAYOUT) gen epoch restored_at halted testing clock_us clock_frozen_us
--   expired restored corrupt, then the denials by reason: d_book_not_restored d_halted
--   d_max_concurrent_positions d_max_gross_exposure d_max_symbol_exposure
-- live, 15 doubles and a string: hw npos pos_gross_w pos_gross_f res_gross_w res_gross_f
--   res_syms res_open nres kinds next_due forget_due admitted released filled, then tag (the
--   fencing tag of the write that made hw, TAG_SIZE characters: see Fencing)
-- gen 0: not restored. halted, testing: 0 or 1. clock_frozen_us 0: not frozen.
-- A book whose state has another size or layout was written by another version of this code
-- (another layout of the book, its records and its indexes): it is not restored, so every
-- decision is denied until restore rewrites it in this layout.
local STATE_FORMAT = '<dddddddddddddddd'
local LIVE_FORMAT = '<dddddddddddddddc16'
local LAYOUT, STATE_SIZE, LIVE_SIZE, TAG_SIZE = 2, 128, 136, 16
local NO_TAG = '0000000000000000'

-- The fencing tag of a write: the caller's random token itself (16 hex digits from the client:
-- no conversion), any other string cut or padded to TAG_SIZE.
local function tag_of(token)
  if #token == TAG_SIZE then return token end
  return string.sub(token .. NO_TAG, 1, TAG_SIZE)
end
local NEVER = CLOCK_MAX -- next_due when nothing is reserved: the clock never gets there

local S, F = {}, {}
-- The writes a call collects for finish(), one list per command; each list counts its items in
-- `n` and is reused by the next call (begin sets n back to 0), so a call allocates none.
local HSET, HDEL, XADD, XREM, FADD, FREM = {n = 0}, {n = 0}, {n = 0}, {n = 0}, {n = 0}, {n = 0}

local function push(list, a, b)
  local n = list.n
  list[n + 1] = a
  if b == nil then
    list.n = n + 1
  else
    list[n + 2] = b
    list.n = n + 2
  end
end

-- One command per list, in chunks: Lua's unpack stops near 8,000 values (a restore of a big
-- book, a release of a symbol's thousands of reservations), and a chunk's even size keeps
-- field/value and score/member pairs whole.
local CHUNK = 1000
local function flush(command, key, list)
  local n = list.n
  if n == 0 then return end
  for first = 1, n, CHUNK do
    local last = first + CHUNK - 1
    if last > n then last = n end
    redis.call(command, key, unpack(list, first, last))
  end
end

local function unpack_state(cold, hot)
  local t = S
  local layout
  if cold and #cold == STATE_SIZE then
    layout, t.gen, t.epoch, t.restored_at, t.halted, t.testing, t.off, t.frozen, t.expired,
      t.restored, t.corrupt, t.d_book_not_restored, t.d_halted, t.d_max_concurrent_positions,
      t.d_max_gross_exposure, t.d_max_symbol_exposure = struct.unpack(STATE_FORMAT, cold)
  end
  if layout ~= LAYOUT then
    t.gen, t.epoch, t.restored_at, t.halted, t.testing, t.off, t.frozen, t.expired, t.restored,
      t.corrupt, t.d_book_not_restored, t.d_halted, t.d_max_concurrent_positions,
      t.d_max_gross_exposure, t.d_max_symbol_exposure = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
  end
  if hot and #hot == LIVE_SIZE then
    t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open, t.nres, t.kinds, t.next_due,
      t.forget_due, t.admitted, t.released, t.filled, t.tag = struct.unpack(LIVE_FORMAT, hot)
  else
    t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open, t.nres, t.kinds, t.next_due,
      t.forget_due, t.admitted, t.released, t.filled, t.tag =
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NEVER, 0, 0, 0, 0, NO_TAG
    t.gen = 0 -- the totals are gone: not restored
  end
end

local function pack_state()
  local t = S
  return struct.pack(STATE_FORMAT, LAYOUT, t.gen, t.epoch, t.restored_at, t.halted, t.testing,
    t.off, t.frozen, t.expired, t.restored, t.corrupt, t.d_book_not_restored, t.d_halted,
    t.d_max_concurrent_positions, t.d_max_gross_exposure, t.d_max_symbol_exposure)
end

local function pack_live()
  local t = S
  return struct.pack(LIVE_FORMAT, t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open,
    t.nres, t.kinds, t.next_due, t.forget_due, t.admitted, t.released, t.filled, t.tag)
end

-- The state and live fields each book had after the last call here that read or wrote them, and
-- S as it was then: a call that reads the same bytes back (the common case: nothing else writes
-- the book) needs no unpack. A pure cache: equal bytes mean equal values, and a call that fails
-- part-way has already dropped its book's entry (load_state), so S is unpacked again.
local COLD, HOT, STATES, NSTATES = {}, {}, {}, 0
local READ_COLD, READ_HOT -- the fields as this call read them

local function load_state(cold, hot)
  READ_COLD, READ_HOT = cold, hot
  if cold and hot and COLD[K_BOOK] == cold and HOT[K_BOOK] == hot then
    S = STATES[K_BOOK]
  else
    if NSTATES >= 64 then COLD, HOT, STATES, NSTATES = {}, {}, {}, 0 end
    if not STATES[K_BOOK] then NSTATES = NSTATES + 1 end
    S = {}
    STATES[K_BOOK] = S
    unpack_state(cold, hot)
  end
  COLD[K_BOOK], HOT[K_BOOK] = nil, nil
end

-- Start a call: bind the keys, read state, the fencing tag kept for the caller's hw and up to
-- four book fields (a, b, c, d: names or nil) with one HMGET. F is built by one constructor,
-- sized for what the call reads (a table grown key by key would be rebuilt on the way).
local function begin(keys, args, a, b, c, d)
  K_BOOK, K_EXPIRY, K_FORGET = keys[1], keys[2], keys[3]
  HSET.n, HDEL.n, XADD.n, XREM.n, FADD.n, FREM.n = 0, 0, 0, 0, 0, 0
  local ring = RING_NAMES[args[2] % RING]
  local got
  if d then
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring, a, b, c, d)
    F = {[a] = got[4] or false, [b] = got[5] or false, [c] = got[6] or false,
      [d] = got[7] or false}
  elseif c then
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring, a, b, c)
    F = {[a] = got[4] or false, [b] = got[5] or false, [c] = got[6] or false}
  elseif b then
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring, a, b)
    F = {[a] = got[4] or false, [b] = got[5] or false}
  elseif a then
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring, a)
    F = {[a] = got[4] or false}
  else
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring)
    F = {}
  end
  load_state(got[1], got[2])
  S.ring_tag = got[3]
  S.dirty, S.cold, S.call_tag = false, false, nil
end

-- Read the fields of `names` this call has not read yet (one HMGET, or none).
local function ensure(names)
  local missing = {}
  for i = 1, #names do
    if F[names[i]] == nil then missing[#missing + 1] = names[i] end
  end
  if #missing == 0 then return end
  local got = redis.call('HMGET', K_BOOK, unpack(missing))
  for i = 1, #missing do F[missing[i]] = got[i] end
end

local function set(name, value)
  F[name] = value
  push(HSET, name, value)
end

local function delete(name)
  F[name] = false
  push(HDEL, name)
end

local TIME_NOW, TIME_US -- the last TIME reply, and it in microseconds
local function now_us()
  if S.frozen ~= 0 then return S.frozen + S.off end
  local t = redis.call('TIME')
  local us = t[1] * 1000000 + t[2] -- Lua converts the strings itself: no function call
  TIME_NOW, TIME_US = t, us
  return us + S.off
end

-- `now` (from now_us) as a decimal string. Without the test clock it is TIME's own two strings,
-- joined: string.format, a sprintf, costs more than the rest of a decision's bookkeeping.
local USEC_PAD = {'00000', '0000', '000', '00', '0', ''}
local function stamp(now)
  if S.off == 0 and S.frozen == 0 and TIME_US == now then
    local t = TIME_NOW
    return t[1] .. USEC_PAD[#t[2]] .. t[2]
  end
  return string.format('%d', now)
end

-- Send this call's writes and return its answer after the mark. The indexes go first and the
-- book (with state, the marker) last: if a write fails part-way, an index entry without its
-- record is harmless (the sweep counts it as corrupt), and a record left without its expiry
-- only over-blocks. In each key removals go first, so a member dropped and added again in one
-- call ends added.
local function finish(...)
  local cold, hot = READ_COLD, READ_HOT
  if S.dirty then
    S.hw = S.hw + 1
    S.tag = S.call_tag or tag_of(string.format('%016x', now_us())) -- no token: its time
    push(HSET, RING_NAMES[S.hw % RING], S.tag)
    hot = pack_live()
    push(HSET, 'live', hot)
  end
  if S.cold then -- a field of state changed (a denial's count changes only that: the mark stays)
    cold = pack_state()
    push(HSET, 'state', cold)
  end
  COLD[K_BOOK], HOT[K_BOOK] = cold, hot
  flush('ZREM', K_EXPIRY, XREM)
  flush('ZADD', K_EXPIRY, XADD)
  flush('ZREM', K_FORGET, FREM)
  flush('ZADD', K_FORGET, FADD)
  flush('HDEL', K_BOOK, HDEL)
  flush('HSET', K_BOOK, HSET)
  return {S.epoch, S.hw, S.tag, ...}
end

-- Withdraw the marker: every process is denied with book_not_restored until restore.
local function withdraw()
  S.gen = 0
  S.dirty, S.cold = true, true
end

-- True if the book can be trusted for this call: restored, and on the history the caller saw
-- (its mark: ARGV[1..3] = epoch, hw, tag): not behind it, and holding the caller's tag at the
-- caller's hw while the ring still keeps it. Else the marker is withdrawn.
local function usable(args)
  if S.gen == 0 then return false end
  local ce, ch = args[1] + 0, args[2] + 0
  if S.epoch < ce or (S.epoch == ce and S.hw < ch) then
    withdraw()
    return false
  end
  if S.epoch == ce and ch > 0 then
    local kept_tag
    if S.hw == ch then kept_tag = S.tag elseif S.hw - ch < RING then kept_tag = S.ring_tag end
    if kept_tag and kept_tag ~= args[3] then
      withdraw()
      return false
    end
  end
  return true
end

local function forget_later(name, now)
  push(FADD, now + CALL_MEMO_US, name)
end

-- The book's fields but state and live (binary: no client reads them, so a client that decodes
-- replies never meets them), as a flat list; with `prefix`, only the fields that start with it.
local function book_fields(prefix)
  local all = redis.call('HGETALL', K_BOOK)
  local out = {}
  for j = 1, #all, 2 do
    local name = all[j]
    if name ~= 'state' and name ~= 'live' and (not prefix or string.sub(name, 1, 2) == prefix)
    then
      out[#out + 1] = name
      out[#out + 1] = all[j + 1]
    end
  end
  return out
end

-- ------------------------------------------------------------------ book keeping

local IN_STATE = {expired = true, restored = true, corrupt = true} -- counts in state, not live
local function count(name)
  S[name] = S[name] + 1
  S.dirty = true
  if IN_STATE[name] then S.cold = true end
end

-- Take `dw, df` units off the reservations of `sym` (F holds r:sym and p:sym).
local function unreserve(sym, dw, df)
  local rw, rf = split(F['r:' .. sym])
  local sw, sf, bad = sub(rw, rf, dw, df)
  local bad2
  S.rw, S.rf, bad2 = sub(S.rw, S.rf, dw, df)
  if zero(sw, sf) then
    S.res_syms = S.res_syms - 1
    if F['p:' .. sym] then S.res_open = S.res_open - 1 end
  end
  set('r:' .. sym, fmt(sw, sf))
  if bad or bad2 then count('corrupt') end
  S.dirty = true
end

-- End the reservation `id` (its record's `units` and `sym`; F holds its r: and p: fields) as
-- `counter` says. Released and filled ones leave a tombstone for CALL_MEMO_US: `tomb` (the
-- answer of the call that ended it: see kept) or '~'; expired ones go at once.
local function drop(id, units, sym, counter, now, tomb)
  local name = 'o:' .. id
  if counter == 'expired' then
    delete(name)
  else
    set(name, tomb or '~')
    forget_later(name, now)
    push(XREM, name)
  end
  local uw, uf = split(units)
  unreserve(sym, uw, uf)
  S.nres = S.nres - 1
  count(counter)
end

-- Reserve: `rs` and `pos` are F's r:sym and p:sym.
local function insert(id, sym, units, token, now, ttl, kind)
  local uw, uf = split(units)
  local rs = F['r:' .. sym]
  local sw, sf = split(rs)
  local was_zero = zero(sw, sf)
  sw, sf = add(sw, sf, uw, uf)
  S.rw, S.rf = add(S.rw, S.rf, uw, uf)
  local name = 'o:' .. id
  local expiry = now + ttl
  set(name, units .. '|' .. token .. '|' .. stamp(now) .. '|' .. ttl .. '|' .. sym)
  if was_zero then set('r:' .. sym, units) else set('r:' .. sym, fmt(sw, sf)) end
  push(XADD, expiry, name)
  if was_zero then
    S.res_syms = S.res_syms + 1
    if F['p:' .. sym] then S.res_open = S.res_open + 1 end
  end
  S.nres = S.nres + 1
  S.kinds = bit.bor(S.kinds, kind)
  if expiry < S.next_due then S.next_due = expiry end
  count('admitted')
end

-- A tombstone '~<call_token>|<answer>' about to be overwritten by a new reservation of the same
-- order id: its answer moves to c:<call_token>, so a retry of the call that ended the old
-- reservation still gets it (and does not run again, on the new one).
local function keep_answer(rec, now)
  local bar = string.find(rec, '|', 2, true)
  if not bar then return end
  local memo = 'c:' .. string.sub(rec, 2, bar - 1)
  set(memo, string.sub(rec, bar + 1))
  forget_later(memo, now)
end

-- The first due entries of zset `key` (after its sentinel), or nil if the sentinel is gone.
local function due(key, now)
  local got = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, SWEEP_MAX + 1)
  if got[1] ~= '' then return nil end
  table.remove(got, 1)
  return got
end

-- Expire every reservation due by `now` (state's next_due is past). Returns how many.
local function sweep(now)
  local names = due(K_EXPIRY, now)
  if not names then
    withdraw()
    return 0
  end
  ensure(names)
  local syms, parsed = {}, {}
  for i = 1, #names do
    local rec = F[names[i]]
    if live(rec) then
      local units, _, _, _, sym = parse_rec(rec)
      parsed[i] = {units, sym}
      syms[#syms + 1] = 'r:' .. sym
      syms[#syms + 1] = 'p:' .. sym
    elseif not rec then
      count('corrupt')
    end
  end
  ensure(syms)
  local n = 0
  for i = 1, #names do
    push(XREM, names[i])
    local p = parsed[i]
    if p then
      drop(string.sub(names[i], 3), p[1], p[2], 'expired', now)
      n = n + 1
    end
  end
  if #names < SWEEP_MAX then
    local after = redis.call('ZRANGEBYSCORE', K_EXPIRY, '(' .. int(now), '+inf', 'WITHSCORES',
      'LIMIT', 0, 1)
    S.next_due = tonumber(after[2]) or NEVER
  else
    S.next_due = now -- more are due: the next call goes on
  end
  S.dirty = true
  return n
end

-- Drop the ended records and kept answers whose time is up (at most once a second).
local function sweep_forget(now, always)
  if now < S.forget_due and not always then return end
  local names = due(K_FORGET, now)
  if not names then
    withdraw()
    return
  end
  ensure(names)
  for _, name in ipairs(names) do
    -- an order id reused since it ended holds a live record: that one stays
    if not live(F[name]) or string.sub(name, 1, 2) == 'c:' then delete(name) end
    push(FREM, name)
  end
  S.forget_due = now + FORGET_EVERY_US
  if #names >= SWEEP_MAX then S.forget_due = now end
  S.dirty = true
end

-- The sweeps a writing call starts with, once the book is known to be usable.
local function sweeps(now)
  if now >= S.next_due then sweep(now) end
  sweep_forget(now, false)
end

-- Set a position ("signed units" and a kind letter; F holds p:sym and r:sym). Raises
-- (overflow) before anything is written.
local function set_pos(sym, value, code)
  local name = 'p:' .. sym
  set('k:' .. sym, code)
  local old = F[name]
  local ow, of = split(old)
  local nw, nf = split(value)
  local bad
  local pw, pf = add(S.pw, S.pf, nw, nf)
  S.pw, S.pf, bad = sub(pw, pf, ow, of)
  set(name, value)
  if not old then
    S.npos = S.npos + 1
    local rw, rf = split(F['r:' .. sym])
    if not zero(rw, rf) then S.res_open = S.res_open + 1 end
  end
  if bad then count('corrupt') end
  S.dirty = true
  return old ~= false
end

local function close_pos(sym)
  local name = 'p:' .. sym
  local old = F[name]
  if not old then return false end
  local ow, of = split(old)
  local bad
  S.pw, S.pf, bad = sub(S.pw, S.pf, ow, of)
  delete(name)
  delete('k:' .. sym)
  S.npos = S.npos - 1
  local rw, rf = split(F['r:' .. sym])
  if not zero(rw, rf) then S.res_open = S.res_open - 1 end
  if bad then count('corrupt') end
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
-- (ended, as filled, leaving `tomb`) or 'R' and the units that stay.
local function reduce_rec(id, rec, down, up, now, tomb)
  local units, t, at, ttl, sym = parse_rec(rec)
  local nw, nf = after_fill(units, down, up)
  if zero(nw, nf) then
    drop(id, units, sym, 'filled', now, tomb)
    return 'E'
  end
  local want = fmt(nw, nf)
  local uw, uf = split(units)
  local dw, df = sub(uw, uf, nw, nf)
  set('o:' .. id, want .. '|' .. t .. '|' .. at .. '|' .. ttl .. '|' .. sym)
  unreserve(sym, dw, df)
  return 'R', want
end

-- ------------------------------------------------------------------ writing operations

local function refused()
  return redis.error_reply('pendingledger: test operations are off in this namespace ' ..
    '(only pendingledger.redis.testing turns them on, for tests)')
end

-- A decision's config parsed once per distinct string (a gate sends the same one with every
-- decision until its limits change): {ttl, max_pos or false, and each exposure limit as limbs
-- (false: none), then ttl as the string it came as}. A pure function of the string, so
-- keeping it between calls is safe.
local CONFIGS, NCONFIGS = {}, 0
local function config(s)
  local c = CONFIGS[s]
  if c then return c end
  local ttl, max_pos, max_gross, max_sym = string.match(s, '^(%d+)|(%d*)|(%d*)|(%d*)$')
  c = {ttl + 0, max_pos ~= '' and max_pos + 0, false, 0, false, 0, ttl}
  if max_gross ~= '' then c[3], c[4] = split(max_gross) end
  if max_sym ~= '' then c[5], c[6] = split(max_sym) end
  if NCONFIGS >= 64 then CONFIGS, NCONFIGS = {}, 0 end
  CONFIGS[s], NCONFIGS = c, NCONFIGS + 1
  return c
end

local function deny(mode, reason)
  if mode ~= 'check' then
    local name = 'd_' .. reason
    S[name] = S[name] + 1
    S.cold = true
  end
  return finish('D', reason)
end

-- The first rule `units` on `sym` fails (rules.first_failing_rule, which the conformance suite
-- holds this to), or nil. `pos` and `rs`: the symbol's position and reserved units.
local function failing_rule(c, units, pos, rs)
  local uw, uf = split(units)
  local rw, rf = split(rs)
  if c[2] and not pos and zero(rw, rf) and S.npos + S.res_syms - S.res_open >= c[2] then
    return 'max_concurrent_positions'
  end
  if c[3] then
    local gw, gf = add(S.pw, S.pf, S.rw, S.rf)
    gw, gf = add(gw, gf, uw, uf)
    if gt(gw, gf, c[3], c[4]) then return 'max_gross_exposure' end
  end
  if c[5] then
    local pw, pf = split(pos)
    pw, pf = add(pw, pf, rw, rf)
    pw, pf = add(pw, pf, uw, uf)
    if gt(pw, pf, c[5], c[6]) then return 'max_symbol_exposure' end
  end
  return nil
end

-- enter mark symbol units order_id token config kind [mode]
--   config: "ttl_us|max_pos|max_gross|max_sym" (a limit '' when none); kind: the amount's kind
--   bit. mode: '' (check and reserve), 'check' (check only: the first half of the deliberately
--   broken gates of the stress suite and the race demo) or 'force' (reserve unchecked: the
--   second half); both test operations, refused unless state's `testing` flag is on.
-- -> {'A', reserved_at_us, expiry_us} | {'D', reason} | {'X'} (order_id held by another call)
--    | {'C'} (mode 'check' passed)
local function enter(keys, args)
  local sym, units, id, token = args[4], args[5], args[6], args[7]
  local c = config(args[8])
  local mode = args[10] or ''
  begin(keys, args, 'p:' .. sym, 'r:' .. sym, 'o:' .. id)
  if mode ~= '' and not (S.testing == 1 and (mode == 'check' or mode == 'force')) then
    return refused()
  end
  if not usable(args) then return deny(mode, 'book_not_restored') end
  local now = now_us()
  sweeps(now)
  if S.gen == 0 then return deny(mode, 'book_not_restored') end -- a sweep found a key evicted
  local rec = F['o:' .. id]
  if live(rec) then
    local _, t, at, ttl = parse_rec(rec)
    if t == token then -- the same call, sent again by a client retry after a lost reply
      return finish('A', at + 0, at + ttl)
    end
    return finish('X')
  end
  local pos, rs = F['p:' .. sym], F['r:' .. sym]
  if S.halted == 1 then return deny(mode, 'halted') end
  if mode ~= 'force' then
    local reason = failing_rule(c, units, pos, rs)
    if reason then return deny(mode, reason) end
  end
  if mode == 'check' then return finish('C') end
  S.call_tag = tag_of(token)
  if rec and #rec > 1 then keep_answer(rec, now) end -- the id is used again: see kept()
  insert(id, sym, units, token, now, c[7], args[9] + 0)
  return finish('A', now, now + c[1])
end

-- The tombstone a call (call token args[4]) leaves in the record it ends, with its answer.
local function tombstone(args, answer)
  return '~' .. args[4] .. '|' .. answer
end

-- The answer the call `token` left in tombstone `rec`, or nil.
local function answer_in(rec, token)
  if not rec or string.byte(rec) ~= TILDE then return nil end
  local head = '~' .. token .. '|'
  if string.sub(rec, 1, #head) ~= head then return nil end
  return string.sub(rec, #head + 1)
end

-- A writing operation with call token args[4]: `read` returns the names of the book fields `op`
-- needs, at most three (read in the call's one HMGET with the kept answer c:<token>);
-- `op(args, now)` returns the answer (one or two items), which is kept for a retry of the same
-- call, and true as a third result when it ended the reservation of order args[5] and left its
-- answer in the record's tombstone, '~<call_token>|<answer>' (tombstone()), which costs no field
-- and no `forget` entry of its own; `by_order` says args[5] is an order id whose record `read`
-- names. {'D'}: book not restored.
local function kept(read, op, by_order)
  return function(keys, args)
    local memo = 'c:' .. args[4]
    begin(keys, args, memo, read(args))
    local record = by_order and 'o:' .. args[5]
    local again = F[memo] or (record and answer_in(F[record], args[4]))
    if again then
      local bar = string.find(again, '|', 1, true)
      if not bar then return finish(again) end
      return finish(string.sub(again, 1, bar - 1), string.sub(again, bar + 1))
    end
    if not usable(args) then return finish('D') end
    local now = now_us()
    S.call_tag = tag_of(args[4])
    sweeps(now)
    if S.gen == 0 then return finish('D') end
    local a, b, in_tombstone = op(args, now)
    if not in_tombstone then
      if type(a) ~= 'string' then a = tostring(a) end -- as a retry gets it back
      local enc = a
      if b ~= nil then enc = a .. '|' .. b end
      set(memo, enc)
      forget_later(memo, now)
    end
    return finish(a, b)
  end
end

-- The fields of order args[5], and of symbol args[7] when the caller names it ('' if not).
local function order_fields(args, at)
  local sym = args[at]
  if sym and sym ~= '' then return 'o:' .. args[5], 'r:' .. sym, 'p:' .. sym end
  return 'o:' .. args[5]
end

-- The record of order `id` if it is live and (unless `token` is '') holds `token`, and its
-- units and symbol, with the fields of its symbol read.
local function find(id, token)
  local rec = F['o:' .. id]
  if not live(rec) then return nil end
  local units, t, _, _, sym = parse_rec(rec)
  if token ~= '' and t ~= token then return nil end
  ensure({'r:' .. sym, 'p:' .. sym})
  return rec, units, sym
end

-- release_order mark call_token order_id token symbol [unconfirmed] -> {1} | {0}
--   token: the reservation's ('' = whichever reservation has that id); symbol: its symbol if the
--   caller knows it (read in the first HMGET), else ''. unconfirmed '1': the admission being
--   released was never confirmed by enough replicas (min_replicas), so it is uncounted.
local function release_order(args, now)
  local rec, units, sym = find(args[5], args[6])
  if not rec then return '0' end
  drop(args[5], units, sym, 'released', now, tombstone(args, '1'))
  if args[8] == '1' then -- an admission no replica confirmed (min_replicas): it counts nowhere
    S.admitted, S.released = S.admitted - 1, S.released - 1
  end
  return '1', nil, true
end

-- release_symbol mark call_token symbol -> {number of reservations dropped}
--   A walk of every record: dropping all of a symbol's reservations is rare, and an index by
--   symbol would cost every reservation two more writes.
local function release_symbol(args, now)
  local sym = args[5]
  ensure({'r:' .. sym, 'p:' .. sym})
  local all = book_fields('o:')
  local n = 0
  for i = 1, #all, 2 do
    local name = all[i]
    -- this call's own view first: the sweep before may have expired (deleted) a record that
    -- HGETALL, which runs before the call's writes, still returns
    local rec = F[name]
    if rec == nil then rec = all[i + 1] end
    if live(rec) then
      local units, _, _, _, rsym = parse_rec(rec)
      if rsym == sym then
        drop(string.sub(name, 3), units, sym, 'released', now)
        n = n + 1
      end
    end
  end
  return n
end

-- reduce mark call_token order_id token down up symbol
--   A partial fill of `down` to `up` units (_units.reduction_units); token '' = whichever
--   reservation has that id. -> {'R', remaining} | {'E'} (ended now, as filled) | {'G'} (gone)
local function reduce(args, now)
  local rec = find(args[5], args[6])
  if not rec then return 'G' end
  local a, b = reduce_rec(args[5], rec, args[7], args[8], now, tombstone(args, 'E'))
  return a, b, a == 'E'
end

-- set_position mark call_token symbol units code -> {1} if it was open before, else {0}
--   units: the exposure's magnitude; code: its sign ('+' or '-') and its kind letter
local function set_position(args)
  if set_pos(args[5], args[6], args[7]) then return '1' end
  return '0'
end

-- close_position mark call_token symbol -> {1} if it was open, else {0}
local function close_position(args)
  if close_pos(args[5]) then return '1' end
  return '0'
end

local function symbol_fields(args)
  return 'p:' .. args[5], 'r:' .. args[5]
end

-- fill mark call_token order_id units code symbol down up
--   Sets the position to `value` and, for the reservation with that id, ends it (down and up
--   '') or reduces it by a fill of `down` to `up` units, in one step.
-- -> {'F', symbol} (reservation ended) | {'R', symbol} (reduced) | {'P', symbol} (no
--    reservation; position set from the given symbol) | {'N'} (no reservation and no symbol:
--    nothing written) | {'M', actual_symbol} (a different symbol: nothing written)
local function fill(args, now)
  local id, value, code, sym, down, up = args[5], args[6], args[7], args[8], args[9], args[10]
  local rec, units, rsym = find(id, '')
  if not rec then
    if sym == '' then return 'N' end
    ensure({'p:' .. sym, 'r:' .. sym})
    set_pos(sym, value, code)
    return 'P', sym
  end
  if sym ~= '' and sym ~= rsym then return 'M', rsym end
  set_pos(rsym, value, code)
  local tomb = tombstone(args, 'F|' .. rsym)
  if up == '' then
    drop(id, units, rsym, 'filled', now, tomb)
    return 'F', rsym, true
  end
  if reduce_rec(id, rec, down, up, now, tomb) == 'E' then return 'F', rsym, true end
  return 'R', rsym
end

-- restore mark only_if_missing gen ttl_us n_pos [symbol units code]*n_pos
--   [order_id symbol units token kind]*
--   Replaces the book and the reservations (keeps the flags, the test clock, the counts and the
--   denials), writes the sentinels and the marker, and starts a new epoch of the mark. Every
--   total is formed (and an overflow raised) before the first write. A retry of a restore that
--   already ran finds its generation in the marker and gets the first answer.
-- -> {'R', now_us} | {'S'} (only_if_missing and the book is in place: nothing written)
local function restore(keys, args)
  begin(keys, args)
  local gen = tonumber(args[5])
  if S.gen ~= 0 and S.gen == gen then return finish('R', S.restored_at) end
  if args[4] == '1' and usable(args) then return finish('S') end
  local now = now_us()
  local at, expiry, at_s = now, now + tonumber(args[6]), stamp(now)
  local npos = tonumber(args[7])
  local pw, pf = 0, 0
  local open = {}
  local i = 8
  for _ = 1, npos do
    local w, f = split(args[i + 1])
    pw, pf = add(pw, pf, w, f)
    open[args[i]] = true
    i = i + 3
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
  -- Everything is replaced but state's counts, flags and test clock, which stay in S.
  redis.call('DEL', K_BOOK, K_EXPIRY, K_FORGET)
  push(XADD, '-inf', '')
  push(FADD, '-inf', '')
  i = 8
  for _ = 1, npos do
    set('p:' .. args[i], args[i + 1])
    set('k:' .. args[i], args[i + 2])
    i = i + 3
  end
  i = first_order
  while i <= #args do
    local name = 'o:' .. args[i]
    set(name, args[i + 2] .. '|' .. args[i + 3] .. '|' .. at_s .. '|' .. args[6] .. '|' ..
      args[i + 1])
    push(XADD, expiry, name)
    i = i + 5
  end
  for _, sym in ipairs(syms) do
    local t = per[sym]
    set('r:' .. sym, fmt(t[1], t[2]))
  end
  local epoch = now_us() - S.off -- the server's own clock, not the test clock's offset
  for _, floor in ipairs({S.epoch + 1, (tonumber(args[1]) or 0) + 1}) do
    if floor > epoch then epoch = floor end
  end
  S.epoch = epoch
  S.hw = -1 -- finish() counts this write: the new epoch starts at 0
  S.gen, S.restored_at, S.call_tag = gen, at, tag_of(string.format('%016x', gen))
  S.npos, S.pw, S.pf, S.rw, S.rf = npos, pw, pf, gw, gf
  S.res_syms, S.res_open, S.nres, S.kinds = #syms, res_open, norders, kinds
  S.next_due = NEVER
  if norders > 0 then S.next_due = tonumber(expiry) end
  S.forget_due = now + FORGET_EVERY_US
  S.restored = S.restored + norders
  S.dirty, S.cold = true, true
  return finish('R', at)
end

-- marker mark -> {1} if the book is in place (restored, the mark not behind the caller's),
--   else {0}. Withdraws the marker when the mark is behind.
local function marker(keys, args)
  begin(keys, args)
  if usable(args) then return finish(1) end
  return finish(0)
end

-- sweep mark -> {number of expired reservations dropped}; both zsets swept now, whatever
--   next_due and forget_due say (their sentinels checked).
local function sweep_op(keys, args)
  begin(keys, args)
  if not usable(args) then return finish(0) end
  local now = now_us()
  local n = sweep(now)
  sweep_forget(now, true)
  return finish(n)
end

-- stats mark -> {counts as a flat list, outstanding reservations, reserved gross units,
--   kinds}. Sweeps first when the book is usable and a reservation is due, so a reservation past
--   its expiry counts as expired, never as outstanding (as in the in-process ledger).
local function stats(keys, args)
  begin(keys, args)
  if usable(args) then
    local now = now_us()
    if now >= S.next_due then sweep(now) end
  end
  local counts = {}
  for _, name in ipairs({'admitted', 'released', 'filled', 'expired', 'restored', 'corrupt'}) do
    counts[#counts + 1] = name
    counts[#counts + 1] = S[name]
  end
  for _, reason in ipairs({'book_not_restored', 'halted', 'max_concurrent_positions',
      'max_gross_exposure', 'max_symbol_exposure'}) do
    counts[#counts + 1] = 'denied:' .. reason
    counts[#counts + 1] = S['d_' .. reason]
  end
  return finish(counts, S.nres, fmt(S.rw, S.rf), S.kinds)
end

-- control mark flag value call_token -> {'1'}: sets state's `halted` (any client: RedisGate.halt
--   and resume) or `testing` (pendingledger.redis.testing) flag to value '1' or '0'. Works on
--   any namespace, restored or not, and changes nothing else; it moves the mark like a change.
local function control(keys, args)
  begin(keys, args)
  local flag, on = args[4], args[5] == '1'
  if flag ~= 'halted' and flag ~= 'testing' then
    return redis.error_reply('pendingledger: unknown flag ' .. tostring(flag))
  end
  local value = on and 1 or 0
  if S[flag] == value then return finish('1') end -- already so: nothing changes
  S[flag] = value
  -- A change like any other: a halt a failover lost leaves the halting client's mark ahead.
  S.call_tag = tag_of(args[6])
  S.dirty, S.cold = true, true
  return finish('1')
end

-- clock mark step_us freeze -> {now_us after the step}
--   The namespace's test clock (pendingledger.redis.testing; nothing else sends this). Moves
--   now forward by step_us (whole microseconds >= 0) for every later call in the namespace; an
--   expiry it passes is swept by the next call. freeze '1' first stops TIME at its current
--   reading. A step that would bring now to 2^52 us is refused with nothing written. Moving or
--   freezing is refused unless state's `testing` flag is on; a step of 0 only reads the clock.
local function clock(keys, args)
  begin(keys, args)
  local step, freeze = args[4], args[5] == '1'
  if step ~= '0' and not string.match(step, '^[1-9]%d*$') then
    return redis.error_reply('pendingledger: clock step must be whole microseconds >= 0')
  end
  if (step ~= '0' or freeze) and S.testing ~= 1 then return refused() end
  local before = S.frozen
  if freeze and S.frozen == 0 then
    local t = redis.call('TIME')
    S.frozen = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  local now = now_us() + tonumber(step)
  if now >= CLOCK_MAX then
    return redis.error_reply('pendingledger: clock overflow: the test clock would pass 2^52 us')
  end
  if step ~= '0' or S.frozen ~= before then
    S.off = S.off + tonumber(step)
    S.cold = true
  end
  return finish(now)
end

-- ------------------------------------------------------------------ reading operations

-- status mark order_id token -> {'A', units} | {'G'}  (an overdue one is gone)
local function status(keys, args)
  begin(keys, args, 'o:' .. args[4])
  local rec = F['o:' .. args[4]]
  if S.gen == 0 or not live(rec) then return finish('G') end -- (a book of another layout too)
  local units, t, at, ttl = parse_rec(rec)
  if args[5] ~= '' and t ~= args[5] then return finish('G') end
  if at + ttl <= now_us() then return finish('G') end
  return finish('A', units)
end

-- snapshot mark -> {now_us, state (30 numbers, then the tag: _audit.STATE's order), book fields,
--   expiry, forget} (flat lists, sentinels included), in one consistent view (for audits).
local function snapshot(keys, args)
  begin(keys, args)
  local t = S
  return finish(now_us(),
    {t.gen, t.epoch, t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open, t.nres,
      t.kinds, t.next_due, t.forget_due, t.admitted, t.released, t.filled, t.expired, t.restored,
      t.corrupt, t.restored_at, t.halted, t.testing, t.off, t.frozen, t.d_book_not_restored,
      t.d_halted, t.d_max_concurrent_positions, t.d_max_gross_exposure,
      t.d_max_symbol_exposure, t.tag},
    book_fields(nil),
    redis.call('ZRANGE', K_EXPIRY, 0, -1, 'WITHSCORES'),
    redis.call('ZRANGE', K_FORGET, 0, -1, 'WITHSCORES'))
end

-- positions mark -> {halted, p: and k: fields as a flat list}
local function positions(keys, args)
  begin(keys, args)
  local out = book_fields('p:')
  local codes = book_fields('k:')
  for j = 1, #codes do out[#out + 1] = codes[j] end
  return finish(S.halted, out)
end

-- ------------------------------------------------------------------ registration

local function register(name, fn, read_only)
  local flags = {}
  if read_only then flags = {'no-writes'} end
  redis.register_function{function_name = 'pl@VERSION@_' .. name, callback = fn, flags = flags}
end

local function none() end

register('enter', enter)
register('release_order', kept(function(args) return order_fields(args, 7) end, release_order,
  true))
register('release_symbol', kept(none, release_symbol))
register('reduce', kept(function(args) return order_fields(args, 9) end, reduce, true))
register('set_position', kept(symbol_fields, set_position))
register('close_position', kept(symbol_fields, close_position))
register('fill', kept(function(args) return order_fields(args, 8) end, fill, true))
register('restore', restore)
register('marker', marker)
register('sweep', sweep_op)
register('stats', stats)
register('control', control)
register('clock', clock)
register('status', status, true)
register('snapshot', snapshot, true)
register('positions', positions, true)
