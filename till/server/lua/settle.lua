-- settle: replace a reservation's hold with what the request actually used, and give back its
-- place among the key's requests in flight. Once per request: the reaper settles through here
-- too, so a reaped hold frees its slot.
--
-- KEYS[1] key hash        {t:<tenant>}:k:<key_id>
-- KEYS[2] reservation     {t:<tenant>}:r:<request_id>
-- KEYS[3] holds zset      {t:<tenant>}:holds
-- KEYS[4] month counter   {t:<tenant>}:m:<YYYYMM> of the reservation (for a refund)
-- ARGV[1] member in the holds zset ("<key_id>:<request_id>")
-- ARGV[2] tokens used (tokens; -1: unknown, charge the hold)
-- ARGV[3] cost (micro-cents; -1: unknown, charge the hold)
-- ARGV[4] 1: the request never reached the upstream, give the activation back; else 0
-- ARGV[5] how long to remember a settled request id, seconds
--
-- Returns {"ok", remaining_activations, remaining_tokens, remaining_microcents} (-1 unlimited)
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
for i = 2, 5 do
  local v = num(i)
  if type(v) == 'table' then return v end
  args[i] = v
end
local tokens, cost, refund, keep = args[2], args[3], args[4], args[5]
if tokens < -1 or cost < -1 or keep < 1 or (refund ~= 0 and refund ~= 1) then
  return redis.error_reply('ERR till settle: amount out of range')
end

local r = redis.call('HMGET', KEYS[2], 'state', 'hold_tok', 'hold_mc', 'slot')
if r[1] ~= 'held' then
  return {'skipped'}
end
local hold_tok, hold_mc = tonumber(r[2]), tonumber(r[3])
if tokens < 0 then tokens = hold_tok end
if cost < 0 then cost = hold_mc end

local k = redis.call('HMGET', KEYS[1], 'status', 'max_act', 'max_tok', 'max_mc')
local status, max_act = k[1], tonumber(k[2])
local max_tok, max_mc = tonumber(k[3]), tonumber(k[4])

-- 0 - x, not -x: Lua 5.1 formats -0 as "-0", which HINCRBY refuses.
local held_tok = redis.call('HINCRBY', KEYS[1], 'held_tok', 0 - hold_tok)
local held_mc = redis.call('HINCRBY', KEYS[1], 'held_mc', 0 - hold_mc)
local used_tok = redis.call('HINCRBY', KEYS[1], 'used_tok', tokens)
local used_mc = redis.call('HINCRBY', KEYS[1], 'used_mc', cost)
-- Reservations made before `inflight` existed hold no slot.
if r[4] == '1' and redis.call('HINCRBY', KEYS[1], 'inflight', -1) < 0 then
  redis.call('HSET', KEYS[1], 'inflight', 0)
end
local used_act
if refund == 1 then
  used_act = redis.call('HINCRBY', KEYS[1], 'used_act', -1)
  local month = tonumber(redis.call('GET', KEYS[4]) or '0')
  if month > 0 then redis.call('DECR', KEYS[4]) end
else
  used_act = tonumber(redis.call('HGET', KEYS[1], 'used_act'))
end

if status ~= 'revoked' then
  local spent = used_act >= max_act or (max_tok and used_tok >= max_tok) or (max_mc and used_mc >= max_mc)
  if spent then
    redis.call('HSET', KEYS[1], 'status', 'exhausted')
  elseif status == 'exhausted' then
    redis.call('HSET', KEYS[1], 'status', 'active')
  end
end

redis.call('HSET', KEYS[2], 'state', 'settled')
redis.call('EXPIRE', KEYS[2], keep)
redis.call('ZREM', KEYS[3], ARGV[1])

local rem_tok, rem_mc = -1, -1
if max_tok then rem_tok = math.max(0, max_tok - used_tok - held_tok) end
if max_mc then rem_mc = math.max(0, max_mc - used_mc - held_mc) end
return {'ok', max_act - used_act, rem_tok, rem_mc}
