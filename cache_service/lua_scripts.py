"""The index's Lua scripts: every multi-key update and every lookup is one atomic script.

Redis schema (``P`` is the key prefix, default ``pc:``; ``<h>`` is a raw
16-byte block hash, ``<i>`` a node's small integer index):

    P ids            hash    node_id -> i          (a short field name for every entry below)
    P next_idx       string  counter handing out i
    P n:<i>          hash    id, addr, model, bs, cap, nbytes, prefill, bw, ray, epoch,
                             ttl_ms, reg_ms, hb_ms, running, waiting, free, cached
    P hb:<i>         string  heartbeat: exists while the node is alive (PX ttl)
    P b:<h>          hash    i -> last_access_s * 4 + tier        (the block's holders; tier: the
                                                                  node's fastest for it, 0 device,
                                                                  1 host, 2 disk)
    P nb:<i>         set     <h> ...                              (the node's blocks, for its removal)
    P pins           set     pin ids
    P pin:<id>       hash    replicas, model, salt, tokens (LE u32 bytes), num_blocks, expire_ms, tenant
                             (the owner; a pin from before owners existed belongs to 'default')
    P pinh:<id>      set     node ids holding the pin
    P ctr            hash    counters (lookups, hit_blocks, publishes, events, ...), saturating at 2^62
    P stat           hash    num_blocks (distinct block keys, kept exact by the scripts)

Scripts name their keys from ARGV (they are built from the prefix and the
arguments), so this schema targets a single Redis/Valkey primary, not Redis
Cluster. Time comes from Redis ``TIME`` so that several service replicas agree.
"""

from __future__ import annotations

# Helpers shared by every script (prepended to each body).
_COMMON = r"""
local P = ARGV[1]
local blocks_delta = 0
local function fmt(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_alive(idx)
  return redis.call('EXISTS', P .. 'hb:' .. idx) == 1
end
local function drop_entry(idx, h)
  local bk = P .. 'b:' .. h
  if redis.call('HDEL', bk, idx) == 1 then
    -- Redis deletes a hash with no fields left: the block is gone from the cluster.
    if redis.call('EXISTS', bk) == 0 then blocks_delta = blocks_delta - 1 end
    return 1
  end
  return 0
end
local function clear_node(idx)
  local nbk = P .. 'nb:' .. idx
  local n = 0
  local members = redis.call('SMEMBERS', nbk)
  for k = 1, #members do n = n + drop_entry(idx, members[k]) end
  redis.call('DEL', nbk)
  return n
end
local function flush_stats()
  if blocks_delta ~= 0 then redis.call('HINCRBY', P .. 'stat', 'num_blocks', blocks_delta) end
  blocks_delta = 0
end
-- Counters saturate at 2^62 instead of overflowing. An HINCRBY past INT64_MAX is an error that aborts
-- the script, and every later script adding to the same counter: one heartbeat reporting ~2^63 bytes
-- once made every later heartbeat with a transfer count fail, and with it the pins they deliver.
-- The delta is clamped first (so the sum stays below 2^63), and a total that reaches the bound (or was
-- left at the edge by an earlier version) is set to it: a counter never fails its script. Lua sees
-- integers as doubles, so "reaches" is within a double's precision there (2^62 +- 512).
local COUNTER_MAX = '4611686018427387904'
local COUNTER_MAX_N = tonumber(COUNTER_MAX)
local function bump(field, delta)
  local d = tonumber(delta)
  if d <= 0 then return end
  local ctr = P .. 'ctr'
  if d >= COUNTER_MAX_N then
    redis.call('HSET', ctr, field, COUNTER_MAX)
    return
  end
  local r = redis.pcall('HINCRBY', ctr, field, delta)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'overflow', 1, true) then redis.call('HSET', ctr, field, COUNTER_MAX) end
  elseif r >= COUNTER_MAX_N then
    redis.call('HSET', ctr, field, COUNTER_MAX)
  end
end
-- A pin's owner: nil when there is no such pin.
local function pin_owner(pk)
  if redis.call('EXISTS', pk) == 0 then return nil end
  return redis.call('HGET', pk, 'tenant') or 'default'
end
"""

# ARGV: P, node_id, ttl_ms, field, value, ...  -> {idx, epoch}
REGISTER = _COMMON + r"""
local id = ARGV[2]
local idx = redis.call('HGET', P .. 'ids', id)
if not idx then
  idx = fmt(redis.call('INCR', P .. 'next_idx'))
  redis.call('HSET', P .. 'ids', id, idx)
end
local nk = P .. 'n:' .. idx
local epoch = redis.call('HINCRBY', nk, 'epoch', 1)
-- A (re)registered node starts from nothing: what an earlier incarnation
-- published is stale; the node republishes a full snapshot next.
clear_node(idx)
local now = fmt(now_ms())
local fields = {'id', id, 'ttl_ms', ARGV[3], 'reg_ms', now, 'hb_ms', now,
                'running', '0', 'waiting', '0', 'free', '0', 'cached', '0'}
for k = 4, #ARGV do fields[#fields + 1] = ARGV[k] end
redis.call('HSET', nk, unpack(fields))
redis.call('SET', P .. 'hb:' .. idx, epoch, 'PX', ARGV[3])
bump('registrations', 1)
flush_stats()
return {idx, epoch}
"""

# ARGV: P, node_id, epoch, full ('1'|'0'), count_publish ('1'|'0'), op, op, ...
# op = 'S' .. hash [.. tier digit] (stored; no digit: tier 0) | 'R' .. hash (removed) | 'C' (all cleared)
# -> {status, num_applied, current_epoch}; status 1 ok, -1 unknown node, -2 stale epoch, -3 expired
# A stored op for a block the node already holds is a move between its tiers: it rewrites the entry's
# value (tier and last access) and nothing else, so the block and entry counts stay exact.
PUBLISH = _COMMON + r"""
local id = ARGV[2]
local idx = redis.call('HGET', P .. 'ids', id)
if not idx then return {-1, 0, 0} end
local nk = P .. 'n:' .. idx
local epoch = redis.call('HGET', nk, 'epoch')
if epoch ~= ARGV[3] then return {-2, 0, tonumber(epoch or '0')} end
if not is_alive(idx) then return {-3, 0, tonumber(epoch)} end
local nbk = P .. 'nb:' .. idx
if ARGV[4] == '1' then clear_node(idx) end
-- The tier in the low 2 bits, the last access (s) above them. The service validated the tier (0..2).
local access4 = tonumber(redis.call('TIME')[1]) * 4
for k = 6, #ARGV do
  local op = ARGV[k]
  local kind = string.sub(op, 1, 1)
  if kind == 'C' then
    clear_node(idx)
  else
    local h = string.sub(op, 2, 17)
    local bk = P .. 'b:' .. h
    if kind == 'S' then
      local tier = 0
      if #op > 17 then tier = string.byte(op, 18) - 48 end
      if redis.call('HSET', bk, idx, fmt(access4 + tier)) == 1 then
        if redis.call('HLEN', bk) == 1 then blocks_delta = blocks_delta + 1 end
        redis.call('SADD', nbk, h)
      end
    elseif drop_entry(idx, h) == 1 then
      redis.call('SREM', nbk, h)
    end
  end
end
if ARGV[5] == '1' then bump('publishes', 1) end
bump('events', #ARGV - 5)
flush_stats()
return {1, #ARGV - 5, tonumber(epoch)}
"""

# ARGV: P, model ('' = any), hash, hash, ...
# -> {node_id, num_blocks, addr, num_device, num_host, num_disk, ...}
# Walks the chain once: the candidates are the live holders of block 0; each
# later block keeps those that hold it too (one HMGET per block), and the walk
# stops as soon as no candidate is left. The entry values it reads anyway give
# each block's tier on each candidate, counted per tier along its prefix.
LOOKUP = _COMMON + r"""
local model = ARGV[2]
local n = #ARGV - 2
bump('lookups', 1)
bump('lookup_blocks', n)
if n == 0 then return {} end
-- A value's tier is its low 2 bits (outside 0..2, never written, it counts as disk). Values repeat (one per
-- publish's time and tier), so each distinct one is converted once: a string-keyed table read costs a
-- fraction of tonumber, and this runs for every candidate at every block.
local tier_of = {}
local function convert(v)
  local t = tonumber(v) % 4
  if t > 2 then t = 2 end
  tier_of[v] = t
  return t
end
local cands, lower = {}, {}  -- lower[idx] = {host blocks, disk blocks} along idx's prefix
local first = redis.call('HGETALL', P .. 'b:' .. ARGV[3])
for k = 1, #first, 2 do
  local idx = first[k]
  if is_alive(idx) and (model == '' or redis.call('HGET', P .. 'n:' .. idx, 'model') == model) then
    cands[#cands + 1] = idx
    local c = {0, 0}
    local t = convert(first[k + 1])
    if t ~= 0 then c[t] = 1 end
    lower[idx] = c
  end
end
local done, lens = {}, {}
local pos = 2
while #cands > 0 and pos <= n do
  local vals = redis.call('HMGET', P .. 'b:' .. ARGV[pos + 2], unpack(cands))
  local keep = {}
  for k = 1, #cands do
    local v = vals[k]
    if v then
      local idx = cands[k]
      keep[#keep + 1] = idx
      local t = tier_of[v] or convert(v)
      if t ~= 0 then
        local c = lower[idx]
        c[t] = c[t] + 1
      end
    else done[#done + 1] = cands[k]; lens[#lens + 1] = pos - 1 end
  end
  cands = keep
  pos = pos + 1
end
for k = 1, #cands do done[#done + 1] = cands[k]; lens[#lens + 1] = pos - 1 end
local out, best = {}, 0
for k = 1, #done do
  local info = redis.call('HMGET', P .. 'n:' .. done[k], 'id', 'addr')
  if info[1] then
    local c = lower[done[k]]
    out[#out + 1] = info[1]; out[#out + 1] = lens[k]; out[#out + 1] = info[2] or ''
    out[#out + 1] = lens[k] - c[1] - c[2]; out[#out + 1] = c[1]; out[#out + 1] = c[2]
    if lens[k] > best then best = lens[k] end
  end
end
if best > 0 then
  bump('lookup_hits', 1)
  bump('hit_blocks', best)
end
return out
"""

# ARGV: P, batch, forget_after_ms -> {num_dead, num_removed, more, num_forgotten}
# Removes up to ``batch`` entries per dead node per call (SPOP), so that one
# call never blocks Redis for long; ``more`` = 1 asks the caller to go again.
SWEEP = _COMMON + r"""
local batch = tonumber(ARGV[2])
local forget_ms = tonumber(ARGV[3])
local now = now_ms()
local ids = redis.call('HGETALL', P .. 'ids')
local num_dead, num_removed, more, num_forgotten = 0, 0, 0, 0
for k = 1, #ids, 2 do
  local id, idx = ids[k], ids[k + 1]
  if not is_alive(idx) then
    num_dead = num_dead + 1
    local nbk = P .. 'nb:' .. idx
    local members = redis.call('SPOP', nbk, batch)
    for j = 1, #members do num_removed = num_removed + drop_entry(idx, members[j]) end
    if redis.call('EXISTS', nbk) == 1 then
      more = 1
    else
      local hb = tonumber(redis.call('HGET', P .. 'n:' .. idx, 'hb_ms') or '0')
      if now - hb > forget_ms then
        redis.call('DEL', P .. 'n:' .. idx)
        redis.call('HDEL', P .. 'ids', id)
        num_forgotten = num_forgotten + 1
      end
    end
  end
end
local pins = redis.call('SMEMBERS', P .. 'pins')
for k = 1, #pins do
  local hk = P .. 'pinh:' .. pins[k]
  local holders = redis.call('SMEMBERS', hk)
  for j = 1, #holders do
    local hidx = redis.call('HGET', P .. 'ids', holders[j])
    if not hidx or not is_alive(hidx) then redis.call('SREM', hk, holders[j]) end
  end
end
bump('swept_entries', num_removed)
flush_stats()
return {num_dead, num_removed, more, num_forgotten}
"""

# ARGV: P, node_id, epoch, running, waiting, free, cached, transfers, failed, t_blocks, t_bytes
# -> {known (0|1), pin_id, tokens, salt, num_blocks, ...}: the pins this node must hold.
# Reconciles pins on the way: a dead holder is dropped and this live node of
# the pin's model takes its place while the pin has fewer than ``replicas``.
HEARTBEAT = _COMMON + r"""
local id = ARGV[2]
local idx = redis.call('HGET', P .. 'ids', id)
if not idx then return {0} end
local nk = P .. 'n:' .. idx
local f = redis.call('HMGET', nk, 'epoch', 'ttl_ms', 'model')
if f[1] ~= ARGV[3] then return {0} end
if redis.call('PEXPIRE', P .. 'hb:' .. idx, f[2]) == 0 then return {0} end
local now = now_ms()
redis.call('HSET', nk, 'hb_ms', fmt(now), 'running', ARGV[4], 'waiting', ARGV[5],
           'free', ARGV[6], 'cached', ARGV[7])
bump('heartbeats', 1)
local tnames = {'transfers', 'transfers_failed', 'transferred_blocks', 'transferred_bytes'}
for k = 1, 4 do bump(tnames[k], ARGV[7 + k]) end
local model = f[3]
local out = {1}
local pins = redis.call('SMEMBERS', P .. 'pins')
for k = 1, #pins do
  local pid = pins[k]
  local pk, hk = P .. 'pin:' .. pid, P .. 'pinh:' .. pid
  local p = redis.call('HMGET', pk, 'replicas', 'model', 'expire_ms')
  if not p[1] then
    redis.call('SREM', P .. 'pins', pid); redis.call('DEL', hk)
  elseif tonumber(p[3]) > 0 and now > tonumber(p[3]) then
    redis.call('DEL', pk, hk); redis.call('SREM', P .. 'pins', pid)
  elseif p[2] == model then
    local holders = redis.call('SMEMBERS', hk)
    local num_live, mine = 0, false
    for j = 1, #holders do
      local h = holders[j]
      if h == id then
        mine = true; num_live = num_live + 1
      else
        local hidx = redis.call('HGET', P .. 'ids', h)
        if hidx and is_alive(hidx) then num_live = num_live + 1 else redis.call('SREM', hk, h) end
      end
    end
    if not mine and num_live < tonumber(p[1]) then
      redis.call('SADD', hk, id); mine = true
      bump('pin_assignments', 1)
    end
    if mine then
      local g = redis.call('HMGET', pk, 'tokens', 'salt', 'num_blocks')
      out[#out + 1] = pid; out[#out + 1] = g[1]; out[#out + 1] = g[2]; out[#out + 1] = g[3]
    end
  end
end
return out
"""

# ARGV: P, pin_id, replicas, ttl_ms, model, salt, tokens, num_blocks, tenant, operator ('1'|'0'),
#       quota_blocks (-1: quota_fraction of the smallest live node of the model), quota_fraction, hash, ...
# -> {1, holder node id, ...} | {-1, 0, 0} the pin is another tenant's | {-2, used, quota} over the quota.
# Checks first, then writes (a refused pin changes nothing). The owner's quota counts the blocks of its
# other live pins (not this one: pinning again is idempotent), once per pin whatever its replicas:
# what the quota bounds is how much of one node's pool a tenant's pins can take. Then keeps live
# holders and fills up with live nodes of the model that already hold the longest part of the prefix,
# then the least loaded. A block held in any tier counts as held: the holder loads it back (cheaper than
# a prefill) when it pins it, and a pinned block then stays on device on its holders.
PIN = _COMMON + r"""
local pid = ARGV[2]
local replicas = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local model = ARGV[5]
local num_blocks = tonumber(ARGV[8])
local tenant, operator = ARGV[9], ARGV[10] == '1'
local quota = tonumber(ARGV[11])
local FIRST_HASH = 13
local now = now_ms()
local pk, hk = P .. 'pin:' .. pid, P .. 'pinh:' .. pid
local owner = pin_owner(pk)
if owner and owner ~= tenant and not operator then return {-1, 0, 0} end
owner = owner or tenant  -- an operator pinning a tenant's prefix again leaves it that tenant's
local ids = redis.call('HGETALL', P .. 'ids')
if quota < 0 then
  local smallest = nil  -- no live node of the model reports a capacity: no quota yet
  for k = 1, #ids, 2 do
    local idx = ids[k + 1]
    if is_alive(idx) then
      local nf = redis.call('HMGET', P .. 'n:' .. idx, 'model', 'cap')
      local cap = tonumber(nf[2] or '0')
      if nf[1] == model and cap > 0 and (not smallest or cap < smallest) then smallest = cap end
    end
  end
  if smallest then quota = math.floor(smallest * tonumber(ARGV[12])) end
end
if quota >= 0 then
  local used = 0
  local pins = redis.call('SMEMBERS', P .. 'pins')
  for k = 1, #pins do
    if pins[k] ~= pid then
      local o = redis.call('HMGET', P .. 'pin:' .. pins[k], 'tenant', 'num_blocks', 'expire_ms')
      local expire = tonumber(o[3] or '0')
      if o[2] and (o[1] or 'default') == owner and (expire == 0 or now <= expire) then
        used = used + tonumber(o[2])
      end
    end
  end
  if used + num_blocks > quota then return {-2, used, quota} end
end
local expire = 0
if ttl > 0 then expire = now + ttl end
redis.call('HSET', pk, 'replicas', ARGV[3], 'model', model, 'salt', ARGV[6], 'tokens', ARGV[7],
           'num_blocks', ARGV[8], 'expire_ms', fmt(expire), 'tenant', owner)
redis.call('SADD', P .. 'pins', pid)
local holders, is_holder = {}, {}
local old = redis.call('SMEMBERS', hk)
for j = 1, #old do
  local hidx = redis.call('HGET', P .. 'ids', old[j])
  if hidx and is_alive(hidx) and redis.call('HGET', P .. 'n:' .. hidx, 'model') == model then
    holders[#holders + 1] = old[j]; is_holder[old[j]] = true
  else
    redis.call('SREM', hk, old[j])
  end
end
local cands = {}
for k = 1, #ids, 2 do
  local id, idx = ids[k], ids[k + 1]
  if not is_holder[id] and is_alive(idx) then
    local nf = redis.call('HMGET', P .. 'n:' .. idx, 'model', 'running', 'waiting')
    if nf[1] == model then
      local held = 0
      for j = FIRST_HASH, #ARGV do
        if redis.call('HEXISTS', P .. 'b:' .. ARGV[j], idx) == 1 then held = held + 1 else break end
      end
      cands[#cands + 1] = {id, held, tonumber(nf[2] or '0') + tonumber(nf[3] or '0')}
    end
  end
end
table.sort(cands, function(a, b)
  if a[2] ~= b[2] then return a[2] > b[2] end
  if a[3] ~= b[3] then return a[3] < b[3] end
  return a[1] < b[1]
end)
local c = 1
while #holders < replicas and c <= #cands do
  holders[#holders + 1] = cands[c][1]; redis.call('SADD', hk, cands[c][1]); c = c + 1
end
while #holders > replicas do
  redis.call('SREM', hk, holders[#holders]); holders[#holders] = nil
end
bump('pins', 1)
local out = {1}
for j = 1, #holders do out[#out + 1] = holders[j] end
return out
"""

# ARGV: P, pin_id, tenant, operator ('1'|'0') -> {found (0|1), holder, ...} | {-1}: another tenant's pin
UNPIN = _COMMON + r"""
local pk, hk = P .. 'pin:' .. ARGV[2], P .. 'pinh:' .. ARGV[2]
local owner = pin_owner(pk)
if owner and owner ~= ARGV[3] and ARGV[4] ~= '1' then return {-1} end
local holders = redis.call('SMEMBERS', hk)
local found = redis.call('DEL', pk)
redis.call('DEL', hk)
redis.call('SREM', P .. 'pins', ARGV[2])
local out = {found}
for j = 1, #holders do out[#out + 1] = holders[j] end
return out
"""
