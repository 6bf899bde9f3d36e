-- settle: replace a reservation's hold with what the request actually used, and give back its
-- place among the key's requests in flight. Once per request: the reaper settles through here
-- too, so a reaped hold frees its slot.
--
-- KEYS[1] key hash        {t:<tenant>}:k:<key_id>
-- KEYS[2] reservation     {t:<tenant>}:r:<request_id>
-- KEYS[3] holds zset      {t:<tenant>}:holds
-- KEYS[4] month counter   {t:<tenant>}:m:<YYYYMM> of the reservation (for a refund)
-- KEYS[5 .. 4+n] the key's ancestors' hashes, as reserve was given them (its record's `anc`)
-- KEYS[5+n] the idempotency record (its record's `idem`), when ARGV[7] is 1
-- ARGV[1] member in the holds zset ("<key_id>:<request_id>")
-- ARGV[2] tokens used (tokens; -1: unknown, charge the hold)
-- ARGV[3] cost (micro-cents; -1: unknown, charge the hold)
-- ARGV[4] 1: the request never reached the upstream, give the activation back; else 0
-- ARGV[5] how long to remember a settled request id, seconds
-- ARGV[6] n, the number of ancestors (absent: 0)
-- ARGV[7] 1: the request carried an Idempotency-Key (absent: 0)
-- ARGV[8] 1: the call completed (a whole 2xx answer), so a retry is refused (absent: 0)
--
-- Returns {"ok", remaining_activations, remaining_tokens, remaining_microcents} (-1 unlimited;
-- the least left over the key and its ancestors)
-- or      {"skipped"} when the request id is unknown or already settled.

-- 2^53 - 1: beyond it a Lua number is no exact integer, and Redis would receive "1e+20" or
-- "inf" (both pass tonumber) from a write command, failing after the first write.
local MAX = 9007199254740991

local function num(i)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= math.floor(v) or v < -MAX or v > MAX then
    return redis.error_reply('ERR till settle: ARGV[' .. i .. '] is not an integer')
  end
  return v
end

local args = {}
for i = 2, 8 do
  if i >= 6 and ARGV[i] == nil then
    args[i] = 0
  else
    local v = num(i)
    if type(v) == 'table' then return v end
    args[i] = v
  end
end
local tokens, cost, refund, keep = args[2], args[3], args[4], args[5]
local n_anc, has_idem, done = args[6], args[7], args[8]
if tokens < -1 or cost < -1 or keep < 1 or (refund ~= 0 and refund ~= 1) or n_anc < 0
    or n_anc > 8 or (has_idem ~= 0 and has_idem ~= 1) or (done ~= 0 and done ~= 1) then
  return redis.error_reply('ERR till settle: amount out of range')
end
if #KEYS ~= 4 + n_anc + has_idem then
  return redis.error_reply('ERR till settle: wrong number of keys')
end

local r = redis.call('HMGET', KEYS[2], 'state', 'hold_tok', 'hold_mc', 'slot', 'act')
if r[1] ~= 'held' then
  return {'skipped'}
end
local hold_tok, hold_mc = tonumber(r[2]), tonumber(r[3])
if tokens < 0 then tokens = hold_tok end
if cost < 0 then cost = hold_mc end
-- A retry under an Idempotency-Key that spent no activation of its own gives none back.
local took_act = r[5] ~= '0'
local give_back = refund == 1 and took_act

local chain = {KEYS[1]}
for j = 1, n_anc do chain[j + 1] = KEYS[4 + j] end
local rem_act, rem_tok, rem_mc = nil, -1, -1
for _, name in ipairs(chain) do
  local k = redis.call('HMGET', name, 'status', 'max_act', 'max_tok', 'max_mc')
  if k[1] then
    local status, max_act = k[1], tonumber(k[2])
    local max_tok, max_mc = tonumber(k[3]), tonumber(k[4])
    -- 0 - x, not -x: Lua 5.1 formats -0 as "-0", which HINCRBY refuses.
    local held_tok = redis.call('HINCRBY', name, 'held_tok', 0 - hold_tok)
    local held_mc = redis.call('HINCRBY', name, 'held_mc', 0 - hold_mc)
    local used_tok = redis.call('HINCRBY', name, 'used_tok', tokens)
    local used_mc = redis.call('HINCRBY', name, 'used_mc', cost)
    -- Reservations made before `inflight` existed hold no slot.
    if r[4] == '1' and redis.call('HINCRBY', name, 'inflight', -1) < 0 then
      redis.call('HSET', name, 'inflight', 0)
    end
    local used_act
    if give_back then
      used_act = redis.call('HINCRBY', name, 'used_act', -1)
    else
      used_act = tonumber(redis.call('HGET', name, 'used_act'))
    end
    if status ~= 'revoked' then
      local spent = used_act >= max_act or (max_tok and used_tok >= max_tok)
        or (max_mc and used_mc >= max_mc)
      if spent then
        redis.call('HSET', name, 'status', 'exhausted')
      elseif status == 'exhausted' then
        redis.call('HSET', name, 'status', 'active')
      end
    end
    local left = math.max(0, max_act - used_act)
    if rem_act == nil or left < rem_act then rem_act = left end
    if max_tok then
      left = math.max(0, max_tok - used_tok - held_tok)
      if rem_tok < 0 or left < rem_tok then rem_tok = left end
    end
    if max_mc then
      left = math.max(0, max_mc - used_mc - held_mc)
      if rem_mc < 0 or left < rem_mc then rem_mc = left end
    end
  end
end
if give_back then
  local month = tonumber(redis.call('GET', KEYS[4]) or '0')
  if month > 0 then redis.call('DECR', KEYS[4]) end
end

if has_idem == 1 then
  -- Only the call the record names moves it: a late settlement of an earlier one does not.
  local idem = KEYS[5 + n_anc]
  if redis.call('HGET', idem, 'rid') == ARGV[1] then
    local state = 'open'
    if done == 1 then state = 'done' end
    redis.call('HSET', idem, 'state', state)
    if give_back then redis.call('HSET', idem, 'act', 0) end
  end
end

redis.call('HSET', KEYS[2], 'state', 'settled')
redis.call('EXPIRE', KEYS[2], keep)
redis.call('ZREM', KEYS[3], ARGV[1])

return {'ok', rem_act or 0, rem_tok, rem_mc}
