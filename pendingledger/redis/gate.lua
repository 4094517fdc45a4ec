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
-- A decision is TIME, HMGET, HSET and ZADD (an order with a side sets one field more; a scope
-- with a rate limit adds one HMGET of the window's stamps and an HDEL); a release TIME, HMGET,
-- HSET, ZREM and ZADD. After the commands, what costs most is turning
-- numbers into strings (a sprintf each) and packing state: the hot paths do neither more than
-- they must (see stamp, RING_NAMES, the two fields), and an order of unknown side on a symbol
-- with no pending buys or sells skips the worst-case arithmetic (see side_blind).
--
-- Decisions: rules.first_failing_rule over the figures this code keeps (rules.worst_case per
-- symbol from p:/k:, r:, b: and s:; their sum and the net figure from live's totals), in the
-- trading state of the moment: the operator's (control) or the loss latch's while it holds, the
-- stricter. The latch, the day's P&L and the equity's peak are in state (see record_pnl), so
-- every process sees one latch and one daily reset, on this code's clock.
--
-- Scopes (strategy budgets): a reservation and a part of a position belong to one strategy or
-- to the account's own. Each strategy keeps the account's figures over its own parts and
-- reservations (its fields below and its L<sk>), so a decision under strategy s checks the
-- trading state (halted: the account's), then s's limits over s's figures, then the account's
-- over everything, each rules.first_failing_rule (scope_rule), in the one call; the denial says
-- which scope denied. The account's position on a symbol is the sum of its parts (set_part).
-- The order caps bound the outstanding orders (nres, n:, N) and the admissions in a sliding
-- window on this code's clock: per scope, a deque of the last rate_count stamps kept as fields
-- (w:<n> the account's, W<sk><n> a strategy's; seq and lo in live or L<sk>), recorded while
-- the scope has a rate limit; trimming drops each stamp once, so O(1) amortized. When a rate
-- count is raised, the stamps kept so far are what counts.
--
-- Keys (all under one hash tag {ns}, so Redis Cluster keeps them in one slot):
--   KEYS[1] book    hash  state: the marker, the epoch, the operator's trading state, the test
--                           flag, the test clock, the counts a decision rarely changes and the
--                           loss latch's bookkeeping; live: the rest of the fencing mark, the
--                           totals and the common counts (both packed, see STATE_NAMES and
--                           LIVE_FORMAT below; gen 0 = not restored)
--                         p:<symbol>  the account's position's exposure in units (its
--                           magnitude): the sum of the parts
--                         k:<symbol>  its sign ('+' or '-'), the letter of its kind and, when
--                           more than one part is open, their number (parts_of)
--                         r:<symbol>  units reserved on the symbol, every side ('0' or absent:
--                           none)
--                         b:<symbol>, s:<symbol>  of them, the pending buys', sells' ('0' or
--                           absent: none)
--                         n:<symbol>  the symbol's outstanding reservations ('0' or absent: none)
--                         P0:<symbol>, K0:<symbol>  the account's own part of the position
--                         P, K, R, B, S, N<sk><symbol>  a strategy's part and its fields of the
--                           symbol, as p: k: r: b: s: n: (sk = '<byte length>:<name>')
--                         L<sk>  the strategy's totals, counts and window (L_NAMES, packed)
--                         Z  every sk that has an L<sk>, concatenated (the registry: stats)
--                         w:<n>, W<sk><n>  the rate windows' stamps (see Scopes)
--                         o:<order_id>  "units|token|reserved_at_us|ttl_us|side|n|<strategy>
--                           <symbol>" (parse_rec), or once ended a tombstone, '~' or
--                           '~<call_token>|<answer>' (kept for CALL_MEMO_US, see Retries)
--                         c:<call_token>  the answer that call got (see Retries)
--                         h:<n>  the fencing tag of the change that made hw n, n mod RING
--                           (see Fencing)
--   KEYS[2] expiry  zset  o:<order_id> of each outstanding reservation, scored by its expiry
--   KEYS[3] forget  zset  o:<order_id> of ended ones and c:<call_token>, scored by when they go
--   Both zsets hold the sentinel member '' at score -inf (see Eviction).
--
-- Amounts: exact integers of units (1 unit = 10^-9 of the account currency) kept as decimal
-- strings. Lua numbers are doubles, exact only up to 2^53, so a value is handled as two limbs
-- (w, f) = (value div 10^9, value mod 10^9), the floor for a signed one (see negate); |w| must
-- stay below 2^53. The client refuses
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
-- that answer without running again ('control' keeps only a resume's, the one call of it that
-- is not the same done twice). 'restore' is recognised by its generation.
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

-- Signed amounts (positions, their sum, P&L, equity) are floor limbs: w = floor(v / 10^9) (any
-- sign), f = v mod 10^9 in [0, 10^9). add and gt work on them unchanged; sadd does not clamp.
local function negate(w, f)
  if f == 0 then return -w, 0 end
  return -w - 1, B - f
end

local function sadd(aw, af, bw, bf)
  local w, f = aw + bw, af + bf
  if f >= B then f = f - B; w = w + 1 end
  if w > MAXW or w < -MAXW then
    return error('pendingledger: amount overflow (total >= 2^53 units)')
  end
  return w, f
end

local function sabs(w, f)
  if w < 0 then return negate(w, f) end
  return w, f
end

local MINUS = 45 -- string.byte('-')

-- "[-]units" -> floor limbs (split's arithmetic is exact for a negative below 10^15 too)
local function ssplit(s)
  if s and #s >= 16 and string.byte(s) == MINUS then
    return negate(split(string.sub(s, 2)))
  end
  return split(s)
end

local function sfmt(w, f)
  if w < 0 then return '-' .. fmt(negate(w, f)) end
  return fmt(w, f)
end

-- rules.worst_case: max(|p + b + u|, |p - s - u|), p signed (floor limbs), the rest >= 0.
-- With no buys or sells it is |p| + u, the side-blind figure, at the cost of one add.
local function worst(pw, pf, bw, bf, sw, sf, uw, uf)
  if bw == 0 and bf == 0 and sw == 0 and sf == 0 then
    local aw, af = sabs(pw, pf)
    return add(aw, af, uw, uf)
  end
  local xw, xf = add(bw, bf, uw, uf)
  local upw, upf = sabs(sadd(pw, pf, xw, xf))
  xw, xf = add(sw, sf, uw, uf)
  local dnw, dnf = sabs(sadd(pw, pf, negate(xw, xf)))
  if gt(dnw, dnf, upw, upf) then return dnw, dnf end
  return upw, upf
end

-- "units|token|reserved_at_us|ttl_us|side|n|<strategy><symbol>" -> units, token, reserved_at,
-- ttl, side, symbol, strategy ('' for the account's own). side: rules' code ('0' unknown, '1'
-- buy, '2' sell); n: the strategy's length in bytes (0: none), so both names may hold '|'.
local function parse_rec(rec)
  local units, t, at, ttl, side, n, rest =
    string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(%d+)|(.*)$')
  if n == '0' then return units, t, at, ttl, side, rest, '' end
  n = n + 0
  return units, t, at, ttl, side, string.sub(rest, n + 1), string.sub(rest, 1, n)
end

-- The book fields of symbol `sym`: position, its sign and kind, reserved, pending buys, sells.
local function sym_fields(sym)
  return 'p:' .. sym, 'r:' .. sym, 'k:' .. sym, 'b:' .. sym, 's:' .. sym
end

-- Scopes. The account's fields of a symbol are its own (sym_fields, and n:<symbol>, its
-- outstanding orders); a strategy's are the same letters in upper case after its scope key
-- sk = '<byte length>:<name>' (P, K, R, B, S, N), and its totals are packed in L<sk> (a table
-- like S while a call runs: scope_totals). The account's own part of a position is P0:/K0:.
-- A context names one scope's fields of one symbol and the totals they roll into (T).
local function names_of(sym)
  return {p = 'p:' .. sym, r = 'r:' .. sym, k = 'k:' .. sym, b = 'b:' .. sym, s = 's:' .. sym,
    n = 'n:' .. sym}
end

local function scope_key(strategy)
  return #strategy .. ':' .. strategy
end

local function scoped_names(sk, sym)
  return {p = 'P' .. sk .. sym, r = 'R' .. sk .. sym, k = 'K' .. sk .. sym, b = 'B' .. sk .. sym,
    s = 'S' .. sk .. sym, n = 'N' .. sk .. sym, sk = sk}
end

-- The account's own part of a position (no totals of its own: the account's are the sums).
local function own_names(sym)
  return {p = 'P0:' .. sym, k = 'K0:' .. sym}
end

local function field_list(x, out)
  out = out or {}
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] = x.p, x.r, x.k, x.b,
    x.s, x.n
  if x.sk then out[n + 7] = 'L' .. x.sk end
  return out
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
-- state, STATE_NAMES (37): the layout (LAYOUT), the marker, the flags, the test clock, the rare
--   counts and the denials by reason, then the loss latch's bookkeeping (see record_pnl)
-- live, LIVE_NAMES' 23 doubles and a string: the fencing mark's hw, the totals and the common
--   counts, then tag (the fencing tag of the write that made hw, TAG_SIZE characters: see
--   Fencing). The totals: pos_gross = sum of |position|, res_gross = sum of what is reserved
--   (every side), wc_gross = sum of the symbols' worst cases (rules.worst_case), net_pos = sum
--   of the signed positions (floor limbs), buys and sells = the pending buys and sells (a
--   symbol's pending of unknown side is r: less b: less s:).
-- gen 0: not restored. op: the operator's trading state (rules' code: 0 active, 1 reducing,
-- 2 halted). testing: 0 or 1. clock_frozen_us 0: not frozen. day_end 0: no loss call yet.
-- A book whose state has another size or layout was written by another version of this code
-- (another layout of the book, its records and its indexes): it is not restored, so every
-- decision is denied until restore rewrites it in this layout.
local STATE_NAMES = {'layout', 'gen', 'epoch', 'restored_at', 'op', 'testing', 'off', 'frozen',
  'expired', 'restored', 'corrupt', 'd_book_not_restored', 'd_halted', 'd_reducing_only',
  'd_max_concurrent_positions', 'd_max_gross_exposure', 'd_max_symbol_exposure',
  'd_max_net_exposure', 'd_max_order_notional', 'd_max_open_orders',
  'd_max_open_orders_per_symbol', 'd_max_orders_per_interval', 'reset_off', 'day_end', 'pnl_w', 'pnl_f', 'eq_set', 'eq_w', 'eq_f',
  'peak_w', 'peak_f', 'loss_kinds', 'l_state', 'l_reason', 'l_limit_w', 'l_limit_f', 'l_value_w',
  'l_value_f', 'l_kinds', 'l_at', 'l_until'}
-- (written out: the string library is not there while the library loads)
local STATE_FORMAT = '<' .. 'dddddddddd' .. 'dddddddddd' .. 'dddddddddd' .. 'ddddddddddd'
local LIVE_FORMAT = '<' .. 'dddddddddd' .. 'dddddddddd' .. 'ddddd' .. 'c16'
local LAYOUT, STATE_SIZE, LIVE_SIZE, TAG_SIZE = 4, 8 * #STATE_NAMES, 8 * 25 + 16, 16
-- A strategy's L<sk>: its totals (as live's, over its own positions and reservations), its
-- admissions and its rate window (seq: the admissions recorded, lo: the oldest kept: W<sk><n>),
-- then its decisions' denials by reason (whichever scope denied). The account's window is
-- live's seq and lo, its stamps w:<n>.
local L_NAMES = {'npos', 'pw', 'pf', 'rw', 'rf', 'res_syms', 'res_open', 'nres', 'gw', 'gf',
  'qw', 'qf', 'bw', 'bf', 'sw', 'sf', 'admitted', 'seq', 'lo', 'd_book_not_restored', 'd_halted',
  'd_reducing_only', 'd_max_concurrent_positions', 'd_max_gross_exposure',
  'd_max_symbol_exposure', 'd_max_net_exposure', 'd_max_order_notional', 'd_max_open_orders',
  'd_max_open_orders_per_symbol', 'd_max_orders_per_interval'}
local L_FORMAT = '<' .. 'dddddddddd' .. 'dddddddddd' .. 'dddddddddd'
local L_SIZE = 8 * #L_NAMES
local L_TOTALS = 16 -- the first 16 of L_NAMES are totals (restore forms them again)
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
  local values
  if cold and #cold == STATE_SIZE then values = {struct.unpack(STATE_FORMAT, cold)} end
  if not values or values[1] ~= LAYOUT then values = {} end
  for i = 2, #STATE_NAMES do t[STATE_NAMES[i]] = values[i] or 0 end
  if hot and #hot == LIVE_SIZE then
    t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open, t.nres, t.kinds, t.next_due,
      t.forget_due, t.admitted, t.released, t.filled, t.gw, t.gf, t.qw, t.qf, t.bw, t.bf, t.sw,
      t.sf, t.seq, t.lo, t.tag = struct.unpack(LIVE_FORMAT, hot)
  else
    t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open, t.nres, t.kinds, t.next_due,
      t.forget_due, t.admitted, t.released, t.filled, t.gw, t.gf, t.qw, t.qf, t.bw, t.bf, t.sw,
      t.sf, t.seq, t.lo, t.tag = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NEVER, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
      0, 0, 0, 1, NO_TAG
    t.gen = 0 -- the totals are gone: not restored
  end
end

local PACKED = {LAYOUT}
local function pack_state()
  local t = S
  for i = 2, #STATE_NAMES do PACKED[i] = t[STATE_NAMES[i]] end
  return struct.pack(STATE_FORMAT, unpack(PACKED))
end

local function pack_live()
  local t = S
  return struct.pack(LIVE_FORMAT, t.hw, t.npos, t.pw, t.pf, t.rw, t.rf, t.res_syms, t.res_open,
    t.nres, t.kinds, t.next_due, t.forget_due, t.admitted, t.released, t.filled, t.gw, t.gf, t.qw,
    t.qf, t.bw, t.bf, t.sw, t.sf, t.seq, t.lo, t.tag)
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

-- This call's strategies' totals by scope key, and those it changed (SCOPED: any was read, so
-- a call with no strategy allocates none of this).
local LT, LDIRTY, SCOPED = {}, {}, false

-- Start a call: bind the keys, read state, the fencing tag kept for the caller's hw and the
-- book fields named in the list `names` (no nil) with one HMGET.
local function begin(keys, args, names)
  K_BOOK, K_EXPIRY, K_FORGET = keys[1], keys[2], keys[3]
  HSET.n, HDEL.n, XADD.n, XREM.n, FADD.n, FREM.n = 0, 0, 0, 0, 0, 0
  if SCOPED then LT, LDIRTY, SCOPED = {}, {}, false end
  local ring = RING_NAMES[args[2] % RING]
  F = {}
  local got
  if names then
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring, unpack(names))
    for i = 1, #names do F[names[i]] = got[i + 3] or false end
  else
    got = redis.call('HMGET', K_BOOK, 'state', 'live', ring)
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

-- The totals of the strategy of scope key `sk` (read on first use in a call; a new one: zeros).
local function scope_totals(sk)
  local t = LT[sk]
  if t then return t end
  local name = 'L' .. sk
  if F[name] == nil then ensure({name}) end
  local raw = F[name]
  local values = {}
  if raw and #raw == L_SIZE then values = {struct.unpack(L_FORMAT, raw)} end
  t = {sk = sk, new = not raw}
  for i = 1, #L_NAMES do t[L_NAMES[i]] = values[i] or 0 end
  if t.lo == 0 then t.lo = 1 end
  LT[sk] = t
  SCOPED = true
  return t
end

-- Note a change to the totals `T` (S, or a strategy's): finish writes them, and the mark moves.
local function touch(T)
  S.dirty = true
  if T ~= S then LDIRTY[T.sk] = T end
end

-- The scope keys in the registry Z (every strategy that has an L<sk>), in order.
local function registry(z)
  local out, i = {}, 1
  while z and i <= #z do
    local colon = string.find(z, ':', i, true)
    local n = tonumber(string.sub(z, i, colon - 1))
    out[#out + 1] = string.sub(z, i, colon + n)
    i = colon + n + 1
  end
  return out
end

-- Write the strategies' totals this call changed (a new one joins the registry).
local function write_scopes()
  if not SCOPED then return end
  for sk, t in pairs(LDIRTY) do
    local values = {}
    for i = 1, #L_NAMES do values[i] = t[L_NAMES[i]] end
    set('L' .. sk, struct.pack(L_FORMAT, unpack(values)))
    if t.new then
      ensure({'Z'})
      set('Z', (F['Z'] or '') .. sk)
      t.new = false
    end
  end
  LDIRTY = {}
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
  write_scopes()
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

-- The book's fields but state, live and the strategies' L<sk> (binary: no client reads them, so
-- a client that decodes replies never meets them), as a flat list; with `prefix`, only the
-- fields that start with it.
local L_BYTE = 76 -- string.byte('L')
local function book_fields(prefix)
  local all = redis.call('HGETALL', K_BOOK)
  local out = {}
  local n = prefix and #prefix
  for j = 1, #all, 2 do
    local name = all[j]
    if name ~= 'state' and name ~= 'live' and string.byte(name) ~= L_BYTE and
      (not prefix or string.sub(name, 1, n) == prefix) then
      out[#out + 1] = name
      out[#out + 1] = all[j + 1]
    end
  end
  return out
end

-- ------------------------------------------------------------------ book keeping
--
-- Every function below works on a context x (names_of, scoped_names: one scope's fields of one
-- symbol, F holding them) and its totals x.T (S for the account, a strategy's L table). A
-- reservation of strategy s rolls into both the account's context and s's; the account's
-- position is the sum of its parts (set_part).

local IN_STATE = {expired = true, restored = true, corrupt = true} -- counts in state, not live
local function count(name)
  S[name] = S[name] + 1
  S.dirty = true
  if IN_STATE[name] then S.cold = true end
end

-- The signed position of context `x`, as floor limbs.
local function spos(x)
  local m = F[x.p]
  if not m then return 0, 0 end
  local w, f = split(m)
  if string.byte(F[x.k] or '+') == MINUS then return negate(w, f) end
  return w, f
end

-- The pending buys, sells and orders of unknown side of context `x`.
local function pending(x)
  local rw, rf = split(F[x.r])
  local bw, bf = split(F[x.b])
  local sw, sf = split(F[x.s])
  local uw, uf, bad = sub(rw, rf, bw, bf)
  local bad2
  uw, uf, bad2 = sub(uw, uf, sw, sf)
  if bad or bad2 then count('corrupt') end
  return bw, bf, sw, sf, uw, uf
end

local function sym_worst(x)
  local pw, pf = spos(x)
  return worst(pw, pf, pending(x))
end

-- After a change to context `x`, whose worst case was `ow, of` before it: its gross follows.
local function regross(x, ow, of)
  local T = x.T
  local nw, nf = sym_worst(x)
  local gw, gf, bad = sub(T.gw, T.gf, ow, of)
  T.gw, T.gf = add(gw, gf, nw, nf)
  if bad then count('corrupt') end
end

-- Add `dw, df` units to the pending of side `side` in context `x` (its b: or s:, and the buys
-- or sells total), or with `take` take them off. Nothing for side '0'.
local function side_pending(x, side, dw, df, take)
  local name
  if side == '1' then name = x.b elseif side == '2' then name = x.s else return end
  local T = x.T
  local w, f = split(F[name])
  local tw, tf = T.sw, T.sf
  if side == '1' then tw, tf = T.bw, T.bf end
  local bad, bad2
  if take then
    w, f, bad = sub(w, f, dw, df)
    tw, tf, bad2 = sub(tw, tf, dw, df)
  else
    w, f = add(w, f, dw, df)
    tw, tf = add(tw, tf, dw, df)
  end
  if side == '1' then T.bw, T.bf = tw, tf else T.sw, T.sf = tw, tf end
  -- '0' rather than deleted, as r: is: a field set and then deleted in one call would come back
  -- (finish sends HDEL before HSET)
  set(name, fmt(w, f))
  if bad or bad2 then count('corrupt') end
end

local function none_of(v) return not v or v == '0' end

-- True if context `x` has no pending buys or sells: its worst case is then |p| + u, side-blind,
-- and moves by exactly what an order of unknown side adds or takes off (no worst() to work out).
local function side_blind(x)
  return none_of(F[x.b]) and none_of(F[x.s])
end

-- Take `dw, df` units of side `side` off the reservations of context `x`.
local function unreserve(x, dw, df, side)
  local T = x.T
  local blind = side == '0' and side_blind(x)
  local ow, of
  if blind then
    local gw, gf, bad = sub(T.gw, T.gf, dw, df)
    T.gw, T.gf = gw, gf
    if bad then count('corrupt') end
  else
    ow, of = sym_worst(x)
  end
  local rw, rf = split(F[x.r])
  local sw, sf, bad = sub(rw, rf, dw, df)
  local bad2
  T.rw, T.rf, bad2 = sub(T.rw, T.rf, dw, df)
  if zero(sw, sf) then
    T.res_syms = T.res_syms - 1
    if F[x.p] then T.res_open = T.res_open - 1 end
  end
  set(x.r, fmt(sw, sf))
  if not blind then
    side_pending(x, side, dw, df, true)
    regross(x, ow, of)
  end
  if bad or bad2 then count('corrupt') end
  touch(T)
end

-- One order more (`by` 1) or less (-1) outstanding in context `x`.
local function count_order(x, by)
  local n = (tonumber(F[x.n]) or 0) + by
  if n < 0 then
    n = 0
    count('corrupt')
  end
  set(x.n, '' .. n)
  x.T.nres = x.T.nres + by
end

-- The contexts of symbol `sym` for a record of strategy `strategy` ('' none), their fields
-- read: the account's, and the strategy's or nil.
local function contexts(sym, strategy)
  local a = names_of(sym)
  local names = field_list(a)
  local x
  if strategy ~= '' then
    x = scoped_names(scope_key(strategy), sym)
    field_list(x, names)
  end
  ensure(names)
  a.T = S
  if x then x.T = scope_totals(x.sk) end
  return a, x
end

-- End the reservation `id` (its record's `units`, `side`, `sym`, strategy's contexts a and x)
-- as `counter` says. Released and filled ones leave a tombstone for CALL_MEMO_US: `tomb` (the
-- answer of the call that ended it: see kept) or '~'; expired ones go at once.
local function drop(id, units, side, a, x, counter, now, tomb)
  local name = 'o:' .. id
  if counter == 'expired' then
    delete(name)
  else
    set(name, tomb or '~')
    forget_later(name, now)
    push(XREM, name)
  end
  local uw, uf = split(units)
  unreserve(a, uw, uf, side)
  count_order(a, -1)
  if x then
    unreserve(x, uw, uf, side)
    count_order(x, -1)
  end
  count(counter)
end

-- Reserve `uw, uf` units of side `side` in context `x`, whose worst case that raises by
-- `dgw, dgf` (the decision worked it out).
local function reserve_in(x, uw, uf, units, side, dgw, dgf)
  local T = x.T
  local sw, sf = split(F[x.r])
  local was_zero = zero(sw, sf)
  T.rw, T.rf = add(T.rw, T.rf, uw, uf)
  T.gw, T.gf = add(T.gw, T.gf, dgw, dgf)
  if was_zero then set(x.r, units) else set(x.r, fmt(add(sw, sf, uw, uf))) end
  side_pending(x, side, uw, uf, false)
  if was_zero then
    T.res_syms = T.res_syms + 1
    if F[x.p] then T.res_open = T.res_open + 1 end
  end
  count_order(x, 1)
  touch(T)
end

-- The record of a reservation, and its entry in `expiry`.
local function write_record(id, sym, strategy, units, token, at_s, ttl, side, expiry)
  local name = 'o:' .. id
  set(name, units .. '|' .. token .. '|' .. at_s .. '|' .. ttl .. '|' .. side .. '|' ..
    #strategy .. '|' .. strategy .. sym)
  push(XADD, expiry, name)
  if expiry < S.next_due then S.next_due = expiry end
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
  local fields, parsed = {}, {}
  for i = 1, #names do
    local rec = F[names[i]]
    if live(rec) then
      local units, _, _, _, side, sym, strategy = parse_rec(rec)
      parsed[i] = {units, side, sym, strategy}
      field_list(names_of(sym), fields)
      if strategy ~= '' then field_list(scoped_names(scope_key(strategy), sym), fields) end
    elseif not rec then
      count('corrupt')
    end
  end
  ensure(fields)
  local n = 0
  for i = 1, #names do
    push(XREM, names[i])
    local p = parsed[i]
    if p then
      local a, x = contexts(p[3], p[4])
      drop(string.sub(names[i], 3), p[1], p[2], a, x, 'expired', now)
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

-- Set the position of context `x` (its magnitude in units, and its sign and kind letter).
-- Raises (overflow) before anything is written.
local function set_pos(x, value, code)
  local T = x.T
  local gw, gf = sym_worst(x)
  local qw, qf = sadd(T.qw, T.qf, negate(spos(x)))
  set(x.k, code)
  local old = F[x.p]
  local ow, of = split(old)
  local nw, nf = split(value)
  local bad
  local pw, pf = add(T.pw, T.pf, nw, nf)
  T.pw, T.pf, bad = sub(pw, pf, ow, of)
  set(x.p, value)
  T.qw, T.qf = sadd(qw, qf, spos(x))
  regross(x, gw, gf)
  if not old then
    T.npos = T.npos + 1
    local rw, rf = split(F[x.r])
    if not zero(rw, rf) then T.res_open = T.res_open + 1 end
  end
  if bad then count('corrupt') end
  touch(T)
  return old ~= false
end

local function close_pos(x)
  local T = x.T
  local old = F[x.p]
  if not old then return false end
  local gw, gf = sym_worst(x)
  T.qw, T.qf = sadd(T.qw, T.qf, negate(spos(x)))
  local ow, of = split(old)
  local bad
  T.pw, T.pf, bad = sub(T.pw, T.pf, ow, of)
  delete(x.p)
  delete(x.k)
  regross(x, gw, gf)
  T.npos = T.npos - 1
  local rw, rf = split(F[x.r])
  if not zero(rw, rf) then T.res_open = T.res_open - 1 end
  if bad then count('corrupt') end
  touch(T)
  return true
end

-- The parts of the account's position: its k: code is the sign, the kind letter and, when more
-- than one part is open, their number ('+a', '-c3'); the kind letter is the union of the parts'
-- kinds while more than one is open (a single part's is its own: its value as set).
local function parts_of(code)
  if not code then return 0 end
  if #code > 2 then return tonumber(string.sub(code, 3)) end
  return 1
end

local function kind_union(a, b)
  return string.char(97 + bit.bor(string.byte(a, 2) - 97, string.byte(b, 2) - 97))
end

-- The account's position of `a` made the signed sum `w, f` of `n` parts of kind `letter`.
local function set_sum(a, w, f, letter, n)
  local sign = '+'
  if w < 0 then sign = '-' end
  local code = sign .. letter
  if n > 1 then code = code .. n end
  set_pos(a, fmt(sabs(w, f)), code)
end

-- Set part `part` (a strategy's context, or own_names: the account's own) of the position of
-- the account's context `a` to `value` (magnitude) and `code`; the account's is their sum.
local function set_part(a, part, value, code)
  local ow, of = spos(part)
  local was = F[part.p] and true or false
  if part.T then
    set_pos(part, value, code)
  else
    set(part.p, value)
    set(part.k, code)
  end
  local n = parts_of(F[a.k])
  if not was then n = n + 1 end
  if n == 1 then
    set_pos(a, value, code)
    return
  end
  local sw, sf = spos(a)
  sw, sf = sadd(sw, sf, negate(ow, of))
  sw, sf = sadd(sw, sf, spos(part))
  set_sum(a, sw, sf, kind_union(F[a.k] or code, code), n)
end

-- Remove part `part` of the position of `a`; true if it was open.
local function close_part(a, part)
  if not F[part.p] then return false end
  local ow, of = spos(part)
  if part.T then
    close_pos(part)
  else
    delete(part.p)
    delete(part.k)
  end
  local n = parts_of(F[a.k]) - 1
  if n <= 0 then
    close_pos(a)
  else
    local sw, sf = spos(a)
    sw, sf = sadd(sw, sf, negate(ow, of))
    set_sum(a, sw, sf, string.sub(F[a.k], 2, 2), n)
  end
  return true
end

-- The context of the part of strategy `strategy` ('' the account's own) of symbol `sym`, its
-- fields read.
local function part_of(sym, strategy)
  if strategy == '' then
    local x = own_names(sym)
    ensure({x.p, x.k})
    return x
  end
  local _, x = contexts(sym, strategy)
  return x
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
  local units, t, at, ttl, side, sym, strategy = parse_rec(rec)
  local a, x = contexts(sym, strategy)
  local nw, nf = after_fill(units, down, up)
  if zero(nw, nf) then
    drop(id, units, side, a, x, 'filled', now, tomb)
    return 'E'
  end
  local want = fmt(nw, nf)
  local uw, uf = split(units)
  local dw, df = sub(uw, uf, nw, nf)
  set('o:' .. id, want .. '|' .. t .. '|' .. at .. '|' .. ttl .. '|' .. side .. '|' ..
    #strategy .. '|' .. strategy .. sym)
  unreserve(a, dw, df, side)
  if x then unreserve(x, dw, df, side) end
  return 'R', want
end

-- ------------------------------------------------------------------ writing operations

local function refused()
  return redis.error_reply('pendingledger: test operations are off in this namespace ' ..
    '(only pendingledger.redis.testing turns them on, for tests)')
end

-- A scope's limits parsed once per distinct string (a gate sends the same one with every
-- decision until its limits change): "ttl_us|max_pos|max_gross|max_sym|max_net|max_order|
-- max_open_orders|max_open_orders_per_symbol|rate_count|rate_us" (a limit '' when none; a
-- strategy's ttl is unused). Amount limits as limbs; false: none. A pure function of the
-- string, so keeping it between calls is safe.
local CONFIGS, NCONFIGS = {}, 0
local function limbs(s)
  if s == '' then return false, 0 end
  return split(s)
end

local function config(s)
  local c = CONFIGS[s]
  if c then return c end
  local ttl, max_pos, max_gross, max_sym, max_net, max_order, orders, sym_orders, rate_n, rate_us =
    string.match(s, '^(%d+)|(%d*)|(%d*)|(%d*)|(%d*)|(%d*)|(%d*)|(%d*)|(%d*)|(%d*)$')
  if not ttl then return error('pendingledger: bad limits config') end
  c = {ttl = ttl + 0, ttl_s = ttl, max_pos = max_pos ~= '' and max_pos + 0,
    orders = orders ~= '' and orders + 0, sym_orders = sym_orders ~= '' and sym_orders + 0,
    rate_n = rate_n ~= '' and rate_n + 0, rate_us = rate_us ~= '' and rate_us + 0}
  c.gw, c.gf = limbs(max_gross)
  c.yw, c.yf = limbs(max_sym)
  c.nw, c.nf = limbs(max_net)
  c.ow, c.of = limbs(max_order)
  if NCONFIGS >= 64 then CONFIGS, NCONFIGS = {}, 0 end
  CONFIGS[s], NCONFIGS = c, NCONFIGS + 1
  return c
end

-- A denial: counted (in state, and in the strategy's totals `T` of the decision, if any) but in
-- mode 'check'; `scope` names the strategy whose limit denied ('' the account's).
local function deny(mode, reason, T, scope)
  if mode ~= 'check' then
    local name = 'd_' .. reason
    S[name] = S[name] + 1
    S.cold = true
    if T then
      T[name] = T[name] + 1
      LDIRTY[T.sk] = T
    end
  end
  return finish('D', reason, scope or '')
end

-- rules' trading state codes
local ACTIVE, REDUCING, HALTED_STATE = 0, 1, 2

-- The trading state at `now`: the operator's, or the loss latch's while it holds, the stricter.
-- A latch holds until its `until` (the day's end when it fired): past it, it is as good as
-- cleared by the daily roll, which the next loss call makes (see roll).
local function trading_state(now)
  local st = S.op
  if S.l_state > st and now < S.l_until then st = S.l_state end
  return st
end

-- `w, f` with `dw, df` units added under side `side` (b, s, u: the pending of each side).
local function with_order(side, dw, df, bw, bf, sw, sf, uw, uf)
  if side == '1' then
    bw, bf = add(bw, bf, dw, df)
  elseif side == '2' then
    sw, sf = add(sw, sf, dw, df)
  else
    uw, uf = add(uw, uf, dw, df)
  end
  return bw, bf, sw, sf, uw, uf
end

-- The net figure of totals `T` before and after an order of `dw, df` units of side `side`:
-- rules.worst_case over the sums (the signed positions', the buys', the sells', the unknown's).
local function net_figures(T, side, dw, df)
  local uw, uf = sub(T.rw, T.rf, T.bw, T.bf)
  uw, uf = sub(uw, uf, T.sw, T.sf)
  local bw, bf, sw, sf = T.bw, T.bf, T.sw, T.sf
  local nw, nf = worst(T.qw, T.qf, bw, bf, sw, sf, uw, uf)
  local aw, af = worst(T.qw, T.qf, with_order(side, dw, df, bw, bf, sw, sf, uw, uf))
  return nw, nf, aw, af
end

-- The worst case of context `x` before and after an order of `dw, df` units of side `side`.
local function order_figures(x, side, dw, df)
  if side == '0' and side_blind(x) then
    local pw, pf = sabs(spos(x))
    local ow, of = add(pw, pf, split(F[x.r]))
    local aw, af = add(ow, of, dw, df)
    return ow, of, aw, af
  end
  local pw, pf = spos(x)
  local bw, bf, sw, sf, uw, uf = pending(x)
  local ow, of = worst(pw, pf, bw, bf, sw, sf, uw, uf)
  local aw, af = worst(pw, pf, with_order(side, dw, df, bw, bf, sw, sf, uw, uf))
  return ow, of, aw, af
end

-- The stamp of the c.rate_n-th most recent admission kept in totals `T`'s window (its fields
-- `prefix`<n>, read), or nil (fewer kept, or no rate limit): rules.NO_WINDOW.
local function window_name(c, T, prefix)
  if not c.rate_n then return nil end
  local i = T.seq - c.rate_n + 1
  if i < T.lo or i < 1 then return nil end
  return prefix .. i
end

-- One admission more in `T`'s window (when the scope has a rate limit): the oldest stamps that
-- no longer count under c.rate_n are dropped, each once (O(1) amortized).
local function record_admission(c, T, prefix, now_s)
  if not c.rate_n then return end
  T.seq = T.seq + 1
  set(prefix .. T.seq, now_s)
  while T.lo <= T.seq - c.rate_n do
    delete(prefix .. T.lo)
    T.lo = T.lo + 1
  end
end

-- rules.first_failing_rule after the halted state (which the decision checks first) at one
-- scope: limits `c`, context `x` of the order's symbol and its totals, the order's worst case
-- `ow, of` to `aw, af`, its `dw, df` units of side `side`, the scope's window start `ws` (nil:
-- none) at `now`. The conformance and model tests hold this to the rule function.
local function scope_rule(c, st, x, ow, of, aw, af, side, dw, df, ws, now)
  local T = x.T
  local open = F[x.p] or not zero(split(F[x.r]))
  local raises = gt(aw, af, ow, of)
  if st == REDUCING then
    if not open or raises then return 'reducing_only' end
    local nw, nf, naw, naf = net_figures(T, side, dw, df)
    if gt(naw, naf, nw, nf) then return 'reducing_only' end
  end
  if c.max_pos and not open and T.npos + T.res_syms - T.res_open >= c.max_pos then
    return 'max_concurrent_positions'
  end
  if raises then
    if c.gw then
      local gw, gf = sub(T.gw, T.gf, ow, of)
      gw, gf = add(gw, gf, aw, af)
      if gt(gw, gf, c.gw, c.gf) then return 'max_gross_exposure' end
    end
    if c.yw and gt(aw, af, c.yw, c.yf) then return 'max_symbol_exposure' end
  end
  if c.nw then
    local nw, nf, naw, naf = net_figures(T, side, dw, df)
    if gt(naw, naf, nw, nf) and gt(naw, naf, c.nw, c.nf) then return 'max_net_exposure' end
  end
  if c.ow and gt(dw, df, c.ow, c.of) then return 'max_order_notional' end
  if c.orders and T.nres >= c.orders then return 'max_open_orders' end
  if c.sym_orders and (tonumber(F[x.n]) or 0) >= c.sym_orders then
    return 'max_open_orders_per_symbol'
  end
  if ws and ws > now - c.rate_us then return 'max_orders_per_interval' end
  return nil
end

local SIDES = {['0'] = true, ['1'] = true, ['2'] = true}

-- enter mark symbol units order_id token config kind mode side strategy strategy_config
--   config: the account's limits (see config), strategy_config the strategy's (strategy ''
--   none: only the account's are checked); kind: the amount's kind bit. mode: '' (check and
--   reserve), 'check' (check only: the first half of the deliberately broken gates of the
--   stress suite and the race demo) or 'force' (reserve unchecked but for the halt: the second
--   half); both test operations, refused unless state's `testing` flag is on. side: rules'
--   side code ('0': not known; '1' buy, '2' sell).
-- -> {'A', reserved_at_us, expiry_us} | {'D', reason, scope} (scope: the strategy whose limit
--    denied, '' the account's) | {'X'} (order_id held by another call) | {'C'} (mode 'check'
--    passed)
local function enter(keys, args)
  local sym, units, id, token = args[4], args[5], args[6], args[7]
  local c = config(args[8])
  local mode, side, strategy = args[10] or '', args[11] or '0', args[12] or ''
  if not SIDES[side] then return redis.error_reply('pendingledger: bad side code') end
  local a = names_of(sym)
  local names = field_list(a)
  names[7] = 'o:' .. id
  local x, sc
  if strategy ~= '' then
    sc = config(args[13])
    x = scoped_names(scope_key(strategy), sym)
    field_list(x, names)
  end
  begin(keys, args, names)
  a.T = S
  if x then x.T = scope_totals(x.sk) end
  if mode ~= '' and not (S.testing == 1 and (mode == 'check' or mode == 'force')) then
    return refused()
  end
  local T = x and x.T
  if not usable(args) then return deny(mode, 'book_not_restored', T) end
  local now = now_us()
  sweeps(now)
  if S.gen == 0 then return deny(mode, 'book_not_restored', T) end -- a sweep found a key evicted
  local rec = F['o:' .. id]
  if live(rec) then
    local _, t, at, ttl = parse_rec(rec)
    if t == token then -- the same call, sent again by a client retry after a lost reply
      return finish('A', at + 0, at + ttl)
    end
    return finish('X')
  end
  local state = trading_state(now)
  if state == HALTED_STATE then return deny(mode, 'halted', T) end
  local dw, df = split(units)
  local ow, of, aw, af = order_figures(a, side, dw, df)
  local sow, sof, saw, saf
  if x then sow, sof, saw, saf = order_figures(x, side, dw, df) end
  if mode ~= 'force' then
    local wa, wx = window_name(c, S, 'w:'), x and window_name(sc, T, 'W' .. x.sk)
    if wa or wx then ensure({wa or wx, wx or wa}) end
    if x then
      local reason = scope_rule(sc, state, x, sow, sof, saw, saf, side, dw, df,
        wx and tonumber(F[wx]), now)
      if reason then return deny(mode, reason, T, strategy) end
    end
    local reason = scope_rule(c, state, a, ow, of, aw, af, side, dw, df, wa and tonumber(F[wa]),
      now)
    if reason then return deny(mode, reason, T) end
  end
  if mode == 'check' then return finish('C') end
  S.call_tag = tag_of(token)
  if rec and #rec > 1 then keep_answer(rec, now) end -- the id is used again: see kept()
  local now_s = stamp(now)
  write_record(id, sym, strategy, units, token, now_s, c.ttl_s, side, now + c.ttl)
  reserve_in(a, dw, df, units, side, sub(aw, af, ow, of))
  S.kinds = bit.bor(S.kinds, args[9] + 0)
  count('admitted')
  record_admission(c, S, 'w:', now_s)
  if x then
    reserve_in(x, dw, df, units, side, sub(saw, saf, sow, sof))
    T.admitted = T.admitted + 1
    record_admission(sc, T, 'W' .. x.sk, now_s)
  end
  return finish('A', now, now + c.ttl)
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

-- A writing operation with call token args[4]: `read` returns a list of the book fields `op`
-- needs (read in the call's one HMGET with the kept answer c:<token>);
-- `op(args, now)` returns the answer (one or two items), which is kept for a retry of the same
-- call, and true as a third result when it ended the reservation of order args[5] and left its
-- answer in the record's tombstone, '~<call_token>|<answer>' (tombstone()), which costs no field
-- and no `forget` entry of its own; `by_order` says args[5] is an order id whose record `read`
-- names. {'D'}: book not restored, unless `anywhere` (the loss calls, which like halt work on
-- any namespace: the latch must not wait for a restore).
local function kept(read, op, by_order, anywhere)
  return function(keys, args)
    local memo = 'c:' .. args[4]
    local names = read(args)
    names[#names + 1] = memo
    begin(keys, args, names)
    local record = by_order and 'o:' .. args[5]
    local again = F[memo] or (record and answer_in(F[record], args[4]))
    if again then
      local bar = string.find(again, '|', 1, true)
      if not bar then return finish(again) end
      return finish(string.sub(again, 1, bar - 1), string.sub(again, bar + 1))
    end
    local ok = usable(args)
    if not ok and not anywhere then return finish('D') end
    local now = now_us()
    S.call_tag = tag_of(args[4])
    if ok then sweeps(now) end
    if S.gen == 0 and not anywhere then return finish('D') end
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

-- The fields of order args[5], and of symbol args[at] (and strategy args[strategy_at]) when the
-- caller names them ('' if not): a hint, read in the first HMGET; find reads what it lacks.
local function order_fields(args, at, strategy_at)
  local names = {'o:' .. args[5]}
  local sym = args[at]
  if sym and sym ~= '' then
    field_list(names_of(sym), names)
    local strategy = args[strategy_at]
    if strategy and strategy ~= '' then
      field_list(scoped_names(scope_key(strategy), sym), names)
    end
  end
  return names
end

-- The record of order `id` if it is live and (unless `token` is '') holds `token`, its units,
-- symbol, side and strategy, and its contexts (fields read).
local function find(id, token)
  local rec = F['o:' .. id]
  if not live(rec) then return nil end
  local units, t, _, _, side, sym, strategy = parse_rec(rec)
  if token ~= '' and t ~= token then return nil end
  local a, x = contexts(sym, strategy)
  return rec, units, sym, side, strategy, a, x
end

-- release_order mark call_token order_id token symbol unconfirmed strategy -> {1} | {0}
--   token: the reservation's ('' = whichever reservation has that id); symbol and strategy:
--   the reservation's if the caller knows them (read in the first HMGET), else ''.
--   unconfirmed '1': the admission being released was never confirmed by enough replicas
--   (min_replicas), so it is uncounted.
local function release_order(args, now)
  local rec, units, _, side, _, a, x = find(args[5], args[6])
  if not rec then return '0' end
  drop(args[5], units, side, a, x, 'released', now, tombstone(args, '1'))
  if args[8] == '1' then -- an admission no replica confirmed (min_replicas): it counts nowhere
    S.admitted, S.released = S.admitted - 1, S.released - 1
    if x then x.T.admitted = x.T.admitted - 1 end
  end
  return '1', nil, true
end

-- release_symbol mark call_token symbol -> {number of reservations dropped}
--   A walk of every record: dropping all of a symbol's reservations is rare, and an index by
--   symbol would cost every reservation two more writes.
local function release_symbol(args, now)
  local sym = args[5]
  ensure(field_list(names_of(sym)))
  local all = book_fields('o:')
  local n = 0
  for i = 1, #all, 2 do
    local name = all[i]
    -- this call's own view first: the sweep before may have expired (deleted) a record that
    -- HGETALL, which runs before the call's writes, still returns
    local rec = F[name]
    if rec == nil then rec = all[i + 1] end
    if live(rec) then
      local units, _, _, _, side, rsym, strategy = parse_rec(rec)
      if rsym == sym then
        local a, x = contexts(sym, strategy)
        drop(string.sub(name, 3), units, side, a, x, 'released', now)
        n = n + 1
      end
    end
  end
  return n
end

-- reduce mark call_token order_id token down up symbol strategy
--   A partial fill of `down` to `up` units (_units.reduction_units); token '' = whichever
--   reservation has that id. -> {'R', remaining} | {'E'} (ended now, as filled) | {'G'} (gone)
local function reduce(args, now)
  local rec = find(args[5], args[6])
  if not rec then return 'G' end
  local a, b = reduce_rec(args[5], rec, args[7], args[8], now, tombstone(args, 'E'))
  return a, b, a == 'E'
end

-- set_position mark call_token symbol units code strategy -> {1} if the part was open, else {0}
--   units: the exposure's magnitude; code: its sign ('+' or '-') and its kind letter; strategy:
--   whose part ('' the account's own).
local function set_position(args)
  local a = contexts(args[5], '')
  local part = part_of(args[5], args[8] or '')
  local was = F[part.p] and true or false
  set_part(a, part, args[6], args[7])
  if was then return '1' end
  return '0'
end

-- close_position mark call_token symbol strategy -> {1} if the part was open, else {0}
local function close_position(args)
  local a = contexts(args[5], '')
  if close_part(a, part_of(args[5], args[6] or '')) then return '1' end
  return '0'
end

-- The fields a position call on symbol args[5] of strategy args[at] reads.
local function part_fields(at)
  return function(args)
    local sym, strategy = args[5], args[at] or ''
    local names = field_list(names_of(sym))
    if strategy == '' then
      local x = own_names(sym)
      names[#names + 1], names[#names + 2] = x.p, x.k
    else
      field_list(scoped_names(scope_key(strategy), sym), names)
    end
    return names
  end
end

-- fill mark call_token order_id units code symbol down up strategy
--   Sets the position of the reservation's strategy (its part: see set_part) to `value` and,
--   for the reservation with that id, ends it (down and up '') or reduces it by a fill of
--   `down` to `up` units, in one step. strategy: '' (not given) or the strategy the caller
--   says the order is of (and whose part is set when no reservation is outstanding; '' then:
--   the account's own).
-- -> {'F', symbol} (reservation ended) | {'R', symbol} (reduced) | {'P', symbol} (no
--    reservation; position set from the given symbol) | {'N'} (no reservation and no symbol:
--    nothing written) | {'M', actual_symbol} (a different symbol: nothing written) |
--    {'T', actual_strategy} (a different strategy: nothing written)
local function fill(args, now)
  local id, value, code, sym, down, up = args[5], args[6], args[7], args[8], args[9], args[10]
  local given = args[11] or ''
  local rec, units, rsym, side, strategy, a, x = find(id, '')
  if not rec then
    if sym == '' then return 'N' end
    local acc = contexts(sym, '')
    set_part(acc, part_of(sym, given), value, code)
    return 'P', sym
  end
  if sym ~= '' and sym ~= rsym then return 'M', rsym end
  if given ~= '' and given ~= strategy then return 'T', strategy end
  set_part(a, x or part_of(rsym, ''), value, code)
  local tomb = tombstone(args, 'F|' .. rsym)
  if up == '' then
    drop(id, units, side, a, x, 'filled', now, tomb)
    return 'F', rsym, true
  end
  if reduce_rec(id, rec, down, up, now, tomb) == 'E' then return 'F', rsym, true end
  return 'R', rsym
end

-- Every field reads as absent: the book a restore builds, from nothing.
local ABSENT = {__index = function() return false end}
local W_BYTE = 87 -- string.byte('W')

-- restore mark only_if_missing gen ttl_us n_pos [symbol units code]*n_pos
--   n_parts [strategy symbol units code]*n_parts [order_id symbol units token kind side
--   strategy]*
--   Replaces the book and the reservations (keeps the flags, the trading state and the loss
--   latch, the test clock, the counts and the denials, and every scope's counts and rate
--   window), writes the sentinels and the marker, and starts a new epoch of the mark. The
--   positions are the account's own parts, the n_parts the strategies'. Every total is formed
--   (and an overflow raised) before the first write. A retry of a restore that already ran
--   finds its generation in the marker and gets the first answer.
-- -> {'R', now_us} | {'S'} (only_if_missing and the book is in place: nothing written)
local function restore(keys, args)
  begin(keys, args)
  local gen = tonumber(args[5])
  if S.gen ~= 0 and S.gen == gen then return finish('R', S.restored_at) end
  if args[4] == '1' and usable(args) then return finish('S') end
  local now = now_us()
  local at, expiry, at_s = now, now + tonumber(args[6]), stamp(now)
  -- what the new book keeps of the old one: the windows, the registry, the scopes' counts
  local old = redis.call('HGETALL', K_BOOK)
  F = setmetatable({}, ABSENT)
  local scopes = {}
  for j = 1, #old, 2 do
    local name, byte = old[j], string.byte(old[j])
    if byte == W_BYTE or name == 'Z' or string.sub(name, 1, 2) == 'w:' then
      set(name, old[j + 1])
    elseif byte == L_BYTE then
      scopes[#scopes + 1] = string.sub(name, 2)
      rawset(F, name, old[j + 1])
    end
  end
  for _, sk in ipairs(scopes) do
    local t = scope_totals(sk)
    for i = 1, L_TOTALS do t[L_NAMES[i]] = 0 end
    touch(t)
  end
  for _, name in ipairs({'npos', 'pw', 'pf', 'rw', 'rf', 'res_syms', 'res_open', 'nres', 'kinds',
      'gw', 'gf', 'qw', 'qf', 'bw', 'bf', 'sw', 'sf'}) do
    S[name] = 0
  end
  S.next_due = NEVER
  local i = 8
  for _ = 1, tonumber(args[7]) do
    local sym = args[i]
    local a = names_of(sym)
    a.T = S
    set_part(a, own_names(sym), args[i + 1], args[i + 2])
    i = i + 3
  end
  local nparts = tonumber(args[i])
  i = i + 1
  for _ = 1, nparts do
    local a, x = contexts(args[i + 1], args[i])
    set_part(a, x, args[i + 2], args[i + 3])
    i = i + 4
  end
  local norders, ids = 0, {}
  while i <= #args do
    local id, sym, units, side, strategy = args[i], args[i + 1], args[i + 2], args[i + 5],
      args[i + 6]
    if ids[id] then return redis.error_reply('pendingledger: order_id twice in restore') end
    if not SIDES[side] then return redis.error_reply('pendingledger: bad side code') end
    ids[id] = true
    local uw, uf = split(units)
    write_record(id, sym, strategy, units, args[i + 3], at_s, args[6], side, expiry)
    local a, x = contexts(sym, strategy)
    for _, ctx in ipairs({a, x}) do
      local ow, of = sym_worst(ctx)
      reserve_in(ctx, uw, uf, units, side, 0, 0)
      regross(ctx, ow, of)
    end
    S.kinds = bit.bor(S.kinds, tonumber(args[i + 4]))
    norders = norders + 1
    i = i + 7
  end
  write_scopes()
  -- Everything is replaced but state (counts, flags, trading state, latch, test clock), in S.
  redis.call('DEL', K_BOOK, K_EXPIRY, K_FORGET)
  push(XADD, '-inf', '')
  push(FADD, '-inf', '')
  local epoch = now_us() - S.off -- the server's own clock, not the test clock's offset
  for _, floor in ipairs({S.epoch + 1, (tonumber(args[1]) or 0) + 1}) do
    if floor > epoch then epoch = floor end
  end
  S.epoch = epoch
  S.hw = -1 -- finish() counts this write: the new epoch starts at 0
  S.gen, S.restored_at, S.call_tag = gen, at, tag_of(string.format('%016x', gen))
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

-- ------------------------------------------------------------------ the loss latch
--
-- state keeps the day's realized P&L (pnl, floor limbs), the last equity set (eq; eq_set 0:
-- none yet), its peak since the period began (peak: set exactly when eq_set is), the day's end
-- (day_end, server us; 0 until the first loss call), the kinds of every loss amount recorded
-- (sticky, as in process) and the latch (l_*: l_state 0 = none; its reason, limit and value as
-- rules names them, the kinds they read back in, its time and its until). The limits, their
-- kinds, on_loss and the daily reset's offset come with each loss call, from the calling gate.

local DAY_US = 86400000000

-- rules.next_reset, in microseconds
local function next_reset(now, off)
  return off + (math.floor((now - off) / DAY_US) + 1) * DAY_US
end

-- A new measuring period: no P&L, the peak is the last equity, no latch.
local function new_period()
  S.pnl_w, S.pnl_f = 0, 0
  S.peak_w, S.peak_f = S.eq_w, S.eq_f
  S.l_state, S.l_reason, S.l_limit_w, S.l_limit_f = 0, 0, 0, 0
  S.l_value_w, S.l_value_f, S.l_kinds, S.l_at, S.l_until = 0, 0, 0, 0, 0
end

-- The daily roll before a loss call (a decision needs none: trading_state ignores a latch past
-- its until, and the P&L and peak are read only here).
local function roll(now, off)
  S.reset_off = off
  if S.day_end == 0 then
    S.day_end = next_reset(now, off)
  elseif now >= S.day_end then
    new_period()
    S.day_end = next_reset(now, off)
  end
end

-- "max_daily_loss|max_drawdown|their kinds|on_loss|reset offset us" (limits in units, '' when
-- none) -> a table, or an error (nothing written).
local function loss_config(s)
  local ml, md, kinds, on_loss, off = string.match(s, '^(%d*)|(%d*)|(%d+)|([12])|(%d+)$')
  if not off then return error('pendingledger: bad loss config') end
  return {ml ~= '' and ml, md ~= '' and md, kinds + 0, on_loss + 0, off + 0}
end

local function latch(lc, now, reason, limit, vw, vf)
  S.l_state, S.l_reason = lc[4], reason
  S.l_limit_w, S.l_limit_f = split(limit)
  S.l_value_w, S.l_value_f = vw, vf
  S.l_kinds = bit.bor(S.loss_kinds, lc[3])
  S.l_at, S.l_until = now, S.day_end
end

-- rules.loss_to_latch after a loss call; a latch already set is kept (the first one wins).
local function check_latch(lc, now)
  if S.l_state ~= 0 then return end
  if lc[1] then
    local lw, lf = split(lc[1])
    if not gt(lw, lf, negate(S.pnl_w, S.pnl_f)) then
      return latch(lc, now, 1, lc[1], S.pnl_w, S.pnl_f)
    end
  end
  if lc[2] then
    local dw, df = 0, 0
    if S.eq_set == 1 then dw, df = sadd(S.peak_w, S.peak_f, negate(S.eq_w, S.eq_f)) end
    local lw, lf = split(lc[2])
    if not gt(lw, lf, dw, df) then return latch(lc, now, 2, lc[2], dw, df) end
  end
end

-- A loss call's change: state is written and the mark moves (a latch a failover lost is
-- fenced like a lost halt).
local function loss_changed(lc, now)
  check_latch(lc, now)
  S.dirty, S.cold = true, true
  return int(trading_state(now))
end

-- record_pnl mark call_token amount kind loss_config -> {trading state code after it}
--   Adds the signed `amount` (units, rounded toward -infinity) to the day's realized P&L.
local function record_pnl(args, now)
  local lc = loss_config(args[7])
  roll(now, lc[5])
  S.pnl_w, S.pnl_f = sadd(S.pnl_w, S.pnl_f, ssplit(args[5]))
  S.loss_kinds = bit.bor(S.loss_kinds, args[6] + 0)
  return loss_changed(lc, now)
end

-- set_equity mark call_token equity kind loss_config -> {trading state code after it}
--   The account's equity (signed units); its peak since the period began rises with it.
local function set_equity(args, now)
  local lc = loss_config(args[7])
  roll(now, lc[5])
  local w, f = ssplit(args[5])
  S.eq_w, S.eq_f, S.loss_kinds = w, f, bit.bor(S.loss_kinds, args[6] + 0)
  if S.eq_set == 0 or gt(w, f, S.peak_w, S.peak_f) then S.peak_w, S.peak_f = w, f end
  S.eq_set = 1
  return loss_changed(lc, now)
end

-- The trading state at `now` and the latch in force, for a reply: {state, op} and {} or
-- {latch state, reason, limit units, value units, their kinds, at us, until us}.
local function trading_reply(now)
  local l = {}
  if S.l_state ~= 0 and now < S.l_until then
    l = {S.l_state, S.l_reason, fmt(S.l_limit_w, S.l_limit_f), sfmt(S.l_value_w, S.l_value_f),
      S.l_kinds, int(S.l_at), int(S.l_until)}
  end
  return trading_state(now), S.op, l
end

-- trading mark -> {state, operator's state, latch ({} if none)}: read only.
local function trading(keys, args)
  begin(keys, args)
  return finish(trading_reply(now_us()))
end

local REASON_NAMES = {'book_not_restored', 'halted', 'reducing_only', 'max_concurrent_positions',
  'max_gross_exposure', 'max_symbol_exposure', 'max_net_exposure', 'max_order_notional',
  'max_open_orders', 'max_open_orders_per_symbol', 'max_orders_per_interval'}

-- stats mark -> {counts as a flat list, outstanding reservations, reserved gross units,
--   kinds, state, operator's state, latch (as trading), scopes}. scopes: a flat list of, for
--   each strategy in the registry, its name, its admissions, its denials by reason (as
--   REASON_NAMES) and its outstanding reservations. Sweeps first when the book is usable
--   and a reservation is due, so a reservation past its expiry counts as expired, never as
--   outstanding (as in the in-process ledger).
local function stats(keys, args)
  begin(keys, args, {'Z'})
  local now = now_us()
  if usable(args) and now >= S.next_due then sweep(now) end
  local counts = {}
  for _, name in ipairs({'admitted', 'released', 'filled', 'expired', 'restored', 'corrupt'}) do
    counts[#counts + 1] = name
    counts[#counts + 1] = S[name]
  end
  for _, reason in ipairs(REASON_NAMES) do
    counts[#counts + 1] = 'denied:' .. reason
    counts[#counts + 1] = S['d_' .. reason]
  end
  local scopes = {}
  for _, sk in ipairs(registry(F['Z'])) do
    local t = scope_totals(sk)
    scopes[#scopes + 1] = string.sub(sk, string.find(sk, ':', 1, true) + 1)
    scopes[#scopes + 1] = t.admitted
    for _, reason in ipairs(REASON_NAMES) do scopes[#scopes + 1] = t['d_' .. reason] end
    scopes[#scopes + 1] = t.nres
  end
  local state, op, l = trading_reply(now)
  return finish(counts, S.nres, fmt(S.rw, S.rf), S.kinds, state, op, l, scopes)
end

-- control mark flag value call_token -> {'1'}: sets the operator's trading state (flag
--   'state', value rules' code: any client: RedisGate.halt, reduce_only, resume; '0', resume,
--   also clears the loss latch and starts a new measuring period) or the `testing` flag
--   (pendingledger.redis.testing; value '1' or '0'). Works on any namespace, restored or not,
--   and changes nothing else; it moves the mark like a change. A repeat of a resume (its call
--   token kept, as kept() does) is answered without starting the period again.
local function control(keys, args)
  local memo = 'c:' .. args[6]
  begin(keys, args, {memo})
  if F[memo] then return finish('1') end
  local flag, value = args[4], tonumber(args[5])
  if flag == 'state' then
    if value ~= ACTIVE and value ~= REDUCING and value ~= HALTED_STATE then
      return redis.error_reply('pendingledger: unknown state ' .. tostring(args[5]))
    end
    if value == ACTIVE then
      new_period()
      local now = now_us()
      set(memo, '1')
      forget_later(memo, now)
    elseif S.op == value then
      return finish('1') -- already so: nothing changes
    end
    S.op = value
  elseif flag == 'testing' and (value == 0 or value == 1) then
    if S.testing == value then return finish('1') end
    S.testing = value
  else
    return redis.error_reply('pendingledger: unknown flag ' .. tostring(flag))
  end
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
  begin(keys, args, {'o:' .. args[4]})
  local rec = F['o:' .. args[4]]
  if S.gen == 0 or not live(rec) then return finish('G') end -- (a book of another layout too)
  local units, t, at, ttl = parse_rec(rec)
  if args[5] ~= '' and t ~= args[5] then return finish('G') end
  if at + ttl <= now_us() then return finish('G') end
  return finish('A', units)
end

-- What snapshot sends of S, in _audit.STATE's order (then the tag).
local SNAP_NAMES = {'gen', 'epoch', 'hw', 'npos', 'pw', 'pf', 'rw', 'rf', 'res_syms', 'res_open',
  'nres', 'kinds', 'next_due', 'forget_due', 'admitted', 'released', 'filled', 'expired',
  'restored', 'corrupt', 'restored_at', 'op', 'testing', 'off', 'frozen', 'd_book_not_restored',
  'd_halted', 'd_reducing_only', 'd_max_concurrent_positions', 'd_max_gross_exposure',
  'd_max_symbol_exposure', 'd_max_net_exposure', 'd_max_order_notional', 'd_max_open_orders',
  'd_max_open_orders_per_symbol', 'd_max_orders_per_interval', 'gw', 'gf', 'qw', 'qf', 'bw',
  'bf', 'sw', 'sf', 'seq', 'lo'}
for i = 23, #STATE_NAMES do SNAP_NAMES[#SNAP_NAMES + 1] = STATE_NAMES[i] end

-- snapshot mark -> {now_us, state (SNAP_NAMES' numbers, then the tag: _audit.STATE's order),
--   book fields, expiry, forget, scopes} (flat lists, sentinels included; scopes: for every
--   L<sk>, {sk, L_NAMES' numbers}), in one consistent view (for audits).
local function snapshot(keys, args)
  begin(keys, args)
  local state = {}
  for i, name in ipairs(SNAP_NAMES) do state[i] = S[name] end
  state[#state + 1] = S.tag
  local all = redis.call('HGETALL', K_BOOK)
  local scopes = {}
  for j = 1, #all, 2 do
    if string.byte(all[j]) == L_BYTE and #all[j + 1] == L_SIZE then
      local entry = {string.sub(all[j], 2), struct.unpack(L_FORMAT, all[j + 1])}
      entry[#entry] = nil -- struct.unpack's last result: the next position
      scopes[#scopes + 1] = entry
    end
  end
  return finish(now_us(), state, book_fields(nil),
    redis.call('ZRANGE', K_EXPIRY, 0, -1, 'WITHSCORES'),
    redis.call('ZRANGE', K_FORGET, 0, -1, 'WITHSCORES'), scopes)
end

-- positions mark strategy -> {the operator's trading state, position and code fields as a flat
--   list}: the account's (p: and k:, the sums of the parts) for strategy '', else the
--   strategy's part (P<sk> and K<sk>, names as stored).
local function positions(keys, args)
  begin(keys, args)
  local strategy = args[4] or ''
  local p, k = 'p:', 'k:'
  if strategy ~= '' then
    local sk = scope_key(strategy)
    p, k = 'P' .. sk, 'K' .. sk
  end
  local out = book_fields(p)
  local codes = book_fields(k)
  for j = 1, #codes do out[#out + 1] = codes[j] end
  return finish(S.op, out)
end

-- ------------------------------------------------------------------ registration

local function register(name, fn, read_only)
  local flags = {}
  if read_only then flags = {'no-writes'} end
  redis.register_function{function_name = 'pl@VERSION@_' .. name, callback = fn, flags = flags}
end

local function none() return {} end

register('enter', enter)
register('release_order', kept(function(args) return order_fields(args, 7, 9) end,
  release_order, true))
register('release_symbol', kept(none, release_symbol))
register('reduce', kept(function(args) return order_fields(args, 9, 10) end, reduce, true))
register('set_position', kept(part_fields(8), set_position))
register('close_position', kept(part_fields(6), close_position))
register('fill', kept(function(args) return order_fields(args, 8, 11) end, fill, true))
register('record_pnl', kept(none, record_pnl, false, true))
register('set_equity', kept(none, set_equity, false, true))
register('restore', restore)
register('marker', marker)
register('sweep', sweep_op)
register('stats', stats)
register('trading', trading, true)
register('control', control)
register('clock', clock)
register('status', status, true)
register('snapshot', snapshot, true)
register('positions', positions, true)
