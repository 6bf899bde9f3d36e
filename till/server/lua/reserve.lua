-- reserve: admit one request against a scoped key, or refuse it without writing anything.
--
-- KEYS[1] key hash        {t:<tenant>}:k:<key_id>
-- KEYS[2] tenant hash     {t:<tenant>}:tenant
-- KEYS[3] month counter   {t:<tenant>}:m:<YYYYMM>
-- KEYS[4] reservation     {t:<tenant>}:r:<request_id>
-- KEYS[5] holds zset      {t:<tenant>}:holds   (member "<key_id>:<request_id>", score deadline ms)
-- ARGV[1] member for the holds zset ("<key_id>:<request_id>")
-- ARGV[2] now, ms since the epoch
-- ARGV[3] hold deadline, ms since the epoch (the reaper charges the hold after it)
-- ARGV[4] month counter TTL, seconds
-- ARGV[5] estimated input tokens (tokens)
-- ARGV[6] output tokens the request asks for (tokens; -1: the request sets no cap)
-- ARGV[7] output tokens to reserve when the request sets no cap (tokens)
-- ARGV[8] cost of the estimated input (micro-cents; -1: the model has no known price)
-- ARGV[9] price of one output token (nano-cents, rounded up; -1: no known price)
-- ARGV[10] smallest useful answer (tokens): less than this affordable means refuse
-- ARGV[11] rate window, ms (the key's `rpm` is requests per window; 60000 outside tests)
--
-- Key hash fields read here beyond the budgets: `expires` (s since the epoch), `rpm` and
-- `max_conc` (absent: no such limit), `inflight` (requests held now: taken here, given back by
-- settle), and the rate window `rl_w` (window number, now // window), `rl_c` (requests admitted
-- in it), `rl_p` (in the window before).
--
-- Returns {"ok", grant, remaining_activations, remaining_tokens, remaining_microcents}
--   grant: the output cap to forward (-1: leave the request as it is); remaining_*: -1 unlimited
-- or      {"refused", code, limit, used, remaining, retry_after_ms}
--   retry_after_ms: when a retry may pass (rate and concurrency refusals), else 0
-- Idempotent by request id: a replay returns the first answer and writes nothing more.

-- 2^53 - 1: beyond it a Lua number is no exact integer, and Redis would receive "1e+20" or
-- "inf" (both pass tonumber) from a write command, failing after the first write.
local MAX = 9007199254740991

local function num(i)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= math.floor(v) or v < -MAX or v > MAX then
    return redis.error_reply('ERR till reserve: ARGV[' .. i .. '] is not an integer')
  end
  return v
end

local args = {}
for i = 2, 11 do
  local v = num(i)
  if type(v) == 'table' then return v end
  args[i] = v
end
local now, deadline, month_ttl = args[2], args[3], args[4]
local input_tokens, asked, default_out = args[5], args[6], args[7]
local input_mc, out_nc, min_out, window = args[8], args[9], args[10], args[11]
if now < 0 or deadline < 0 or month_ttl < 1 or input_tokens < 0 or asked < -1
    or default_out < 1 or input_mc < -1 or out_nc < -1 or min_out < 0
    or window < 1 or window > 86400000 then
  return redis.error_reply('ERR till reserve: amount out of range')
end

local prior = redis.call('HMGET', KEYS[4], 'grant', 'rem_act', 'rem_tok', 'rem_mc')
if prior[1] then
  return {'ok', tonumber(prior[1]), tonumber(prior[2]), tonumber(prior[3]), tonumber(prior[4])}
end

local k = redis.call('HMGET', KEYS[1], 'status', 'max_act', 'used_act', 'max_tok', 'used_tok',
  'held_tok', 'max_mc', 'used_mc', 'held_mc', 'expires', 'rpm', 'max_conc', 'inflight',
  'rl_w', 'rl_c', 'rl_p')
if not k[1] then
  return {'refused', 'invalid_api_key', 0, 0, 0, 0}
end
local status = k[1]
local max_act, used_act = tonumber(k[2]), tonumber(k[3])
local max_tok, used_tok, held_tok = tonumber(k[4]), tonumber(k[5]) or 0, tonumber(k[6]) or 0
local max_mc, used_mc, held_mc = tonumber(k[7]), tonumber(k[8]) or 0, tonumber(k[9]) or 0

local expires = tonumber(k[10])
local rpm, max_conc, inflight = tonumber(k[11]), tonumber(k[12]), tonumber(k[13]) or 0

if status == 'revoked' then
  return {'refused', 'key_revoked', max_act, used_act, 0, 0}
end
-- The token's sealed expiry is checked before the store is asked; this one is the record's.
if expires and now >= expires * 1000 then
  return {'refused', 'key_expired', 0, 0, 0, 0}
end
if used_act >= max_act then
  return {'refused', 'activation_limit_reached', max_act, used_act, 0, 0}
end
if max_tok and used_tok >= max_tok then
  return {'refused', 'token_limit_reached', max_tok, used_tok, 0, 0}
end
if max_mc and used_mc >= max_mc then
  return {'refused', 'spend_limit_reached', max_mc, used_mc, 0, 0}
end

local t = redis.call('HMGET', KEYS[2], 'status', 'max_apm')
if t[1] ~= 'active' then
  return {'refused', 'tenant_suspended', 0, 0, 0, 0}
end
local max_apm = tonumber(t[2])
local month_used = tonumber(redis.call('GET', KEYS[3]) or '0')
if month_used >= max_apm then
  return {'refused', 'monthly_quota_reached', max_apm, month_used, 0, 0}
end

-- Size the hold: the estimated input plus the largest answer the key can still pay for.
local grant = -1
local hold_tok, hold_mc = 0, 0
if max_tok or max_mc then
  grant = asked
  if grant < 0 then grant = default_out end
  if max_tok then
    local room = max_tok - used_tok - held_tok - input_tokens
    if room < min_out then
      return {'refused', 'token_limit_reached', max_tok, used_tok,
        math.max(0, max_tok - used_tok - held_tok), 0}
    end
    if room < grant then grant = room end
  end
  if max_mc then
    if out_nc < 0 or input_mc < 0 then
      return {'refused', 'unknown_model_price', max_mc, used_mc,
        math.max(0, max_mc - used_mc - held_mc), 0}
    end
    local room_mc = max_mc - used_mc - held_mc - input_mc
    local affordable = grant
    if out_nc > 0 then affordable = math.floor(room_mc * 1000 / out_nc) end
    if room_mc < 0 or affordable < min_out then
      return {'refused', 'spend_limit_reached', max_mc, used_mc,
        math.max(0, max_mc - used_mc - held_mc), 0}
    end
    if affordable < grant then grant = affordable end
    hold_mc = input_mc + math.ceil(grant * out_nc / 1000)
  end
  hold_tok = input_tokens + grant
end

-- The rate: a sliding window, estimated from two fixed ones (this one and the one before,
-- weighted by how much of it the sliding window still covers). Integers throughout: the
-- estimate times the window length, against rpm times it.
local win, cur, prev = math.floor(now / window), 0, 0
if rpm then
  local elapsed = now - win * window
  local w = tonumber(k[14])
  if w == win then
    cur, prev = tonumber(k[15]) or 0, tonumber(k[16]) or 0
  elseif w == win - 1 then
    prev = tonumber(k[15]) or 0
  end
  if cur * window + prev * (window - elapsed) >= rpm * window then
    -- The first moment the estimate drops below rpm: in this window if what came before
    -- fades enough by its end, else in the next one, where this window's count fades.
    local wait
    if cur < rpm then
      wait = math.floor(window - (rpm - cur) * window / prev) + 1 - elapsed
    else
      wait = window - elapsed + math.floor(window - rpm * window / cur) + 1
    end
    local used = math.floor((cur * window + prev * (window - elapsed)) / window)
    return {'refused', 'rate_limited', rpm, used, 0, math.max(1, wait)}
  end
end
if max_conc and inflight >= max_conc then
  -- Requests in flight end at their own pace: a second is a fair guess.
  return {'refused', 'concurrency_limit_reached', max_conc, inflight, 0, 1000}
end

-- Every check passed: write.
used_act = redis.call('HINCRBY', KEYS[1], 'used_act', 1)
if used_act >= max_act then
  redis.call('HSET', KEYS[1], 'status', 'exhausted')
end
redis.call('HSET', KEYS[1], 'last_used', now)
if hold_tok > 0 then held_tok = redis.call('HINCRBY', KEYS[1], 'held_tok', hold_tok) end
if hold_mc > 0 then held_mc = redis.call('HINCRBY', KEYS[1], 'held_mc', hold_mc) end
redis.call('HINCRBY', KEYS[1], 'inflight', 1)
if rpm then
  redis.call('HSET', KEYS[1], 'rl_w', win, 'rl_c', cur + 1, 'rl_p', prev)
end
if redis.call('INCR', KEYS[3]) == 1 then
  redis.call('EXPIRE', KEYS[3], month_ttl)
end

local rem_act = max_act - used_act
local rem_tok, rem_mc = -1, -1
if max_tok then rem_tok = math.max(0, max_tok - used_tok - held_tok) end
if max_mc then rem_mc = math.max(0, max_mc - used_mc - held_mc) end

-- slot: this request counts in `inflight`, which its settlement (and only that) gives back.
redis.call('HSET', KEYS[4], 'state', 'held', 'hold_tok', hold_tok, 'hold_mc', hold_mc,
  'grant', grant, 'rem_act', rem_act, 'rem_tok', rem_tok, 'rem_mc', rem_mc, 'slot', 1)
-- Kept a day past the deadline (or now, if that is later: a record born expired would leave
-- its hold to no one, as the reaper drops holds whose record is gone).
redis.call('PEXPIREAT', KEYS[4], math.max(deadline, now) + 86400000)
redis.call('ZADD', KEYS[5], deadline, ARGV[1])
return {'ok', grant, rem_act, rem_tok, rem_mc}
