-- reserve: admit one request against a scoped key, or refuse it without writing anything.
--
-- KEYS[1] key hash        {t:<tenant>}:k:<key_id>
-- KEYS[2] tenant hash     {t:<tenant>}:tenant
-- KEYS[3] month counter   {t:<tenant>}:m:<YYYYMM>
-- KEYS[4] reservation     {t:<tenant>}:r:<request_id>
-- KEYS[5] holds zset      {t:<tenant>}:holds   (member "<key_id>:<request_id>", score deadline ms)
-- KEYS[6 .. 5+n] the key's ancestors' hashes, parent first (a child key's budget is carved out
--         of theirs: each is checked and charged as the key itself is)
-- KEYS[6+n] idempotency record {t:<tenant>}:i:<digest>, when ARGV[13] > 0
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
-- ARGV[12] n, the number of ancestors (absent: 0)
-- ARGV[13] how long to keep the idempotency record, seconds (absent or 0: no Idempotency-Key)
-- ARGV[14] the request's fingerprint: a retry under the same Idempotency-Key must match it
--
-- Key hash fields read here beyond the budgets: `expires` (s since the epoch), `rpm` and
-- `max_conc` (absent: no such limit), `inflight` (requests held now: taken here, given back by
-- settle), and the rate window `rl_w` (window number, now // window), `rl_c` (requests admitted
-- in it), `rl_p` (in the window before).
--
-- The idempotency record: `state` (held: a call runs; done: one completed; open: none did, a
-- retry may go), `fp`, `rid` (the holds member of the last call), `act` (1: an activation is
-- spent for this Idempotency-Key, and a retry takes none).
--
-- Returns {"ok", grant, remaining_activations, remaining_tokens, remaining_microcents}
--   grant: the output cap to forward (-1: leave the request as it is); remaining_*: the least
--   left over the key and its ancestors, -1 unlimited
-- or      {"refused", code, limit, used, remaining, retry_after_ms, detail}
--   retry_after_ms: when a retry may pass (rate, concurrency, idempotency in progress), else 0;
--   detail: "parent" when an ancestor's limit refused, the holds member of the first call for
--   an idempotency refusal, else ""
-- Idempotent by request id: a replay returns the first answer and writes nothing more.

-- 2^53 - 1: beyond it a Lua number is no exact integer, and Redis would receive "1e+20" or
-- "inf" (both pass tonumber) from a write command, failing after the first write.
local MAX = 9007199254740991
local MAX_ANCESTORS = 8

local function num(i)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= math.floor(v) or v < -MAX or v > MAX then
    return redis.error_reply('ERR till reserve: ARGV[' .. i .. '] is not an integer')
  end
  return v
end

local args = {}
for i = 2, 13 do
  if i >= 12 and ARGV[i] == nil then
    args[i] = 0
  else
    local v = num(i)
    if type(v) == 'table' then return v end
    args[i] = v
  end
end
local now, deadline, month_ttl = args[2], args[3], args[4]
local input_tokens, asked, default_out = args[5], args[6], args[7]
local input_mc, out_nc, min_out, window = args[8], args[9], args[10], args[11]
local n_anc, idem_ttl, fp = args[12], args[13], ARGV[14] or ''
if now < 0 or deadline < 0 or month_ttl < 1 or input_tokens < 0 or asked < -1
    or default_out < 1 or input_mc < -1 or out_nc < -1 or min_out < 0
    or window < 1 or window > 86400000 or n_anc < 0 or n_anc > MAX_ANCESTORS or idem_ttl < 0 then
  return redis.error_reply('ERR till reserve: amount out of range')
end
local idem = nil
if idem_ttl > 0 then idem = KEYS[6 + n_anc] end
if #KEYS ~= 5 + n_anc + (idem and 1 or 0) then
  return redis.error_reply('ERR till reserve: wrong number of keys')
end

local prior = redis.call('HMGET', KEYS[4], 'grant', 'rem_act', 'rem_tok', 'rem_mc')
if prior[1] then
  return {'ok', tonumber(prior[1]), tonumber(prior[2]), tonumber(prior[3]), tonumber(prior[4])}
end

-- A retry under an Idempotency-Key: refused while a call runs or once one completed; after
-- calls that failed, it goes on the activation the first one spent.
local reuse_act = false
if idem then
  local i = redis.call('HMGET', idem, 'state', 'fp', 'rid', 'act')
  if i[1] then
    if i[2] ~= fp then
      return {'refused', 'idempotency_key_reused', 0, 0, 0, 0, ''}
    end
    if i[1] == 'held' then
      return {'refused', 'idempotency_in_progress', 0, 0, 0, 1000, i[3]}
    end
    if i[1] == 'done' then
      return {'refused', 'idempotent_request_completed', 0, 0, 0, 0, i[3]}
    end
    reuse_act = i[4] == '1'
  end
end

-- The key, then its ancestors.
local chain = {KEYS[1]}
for j = 1, n_anc do chain[j + 1] = KEYS[5 + j] end
local rows = {}
for j, name in ipairs(chain) do
  local k = redis.call('HMGET', name, 'status', 'max_act', 'used_act', 'max_tok', 'used_tok',
    'held_tok', 'max_mc', 'used_mc', 'held_mc', 'expires', 'rpm', 'max_conc', 'inflight',
    'rl_w', 'rl_c', 'rl_p')
  if not k[1] then
    if j == 1 then return {'refused', 'invalid_api_key', 0, 0, 0, 0, ''} end
    return {'refused', 'key_revoked', 0, 0, 0, 0, 'parent'}
  end
  rows[j] = {
    status = k[1], max_act = tonumber(k[2]), used_act = tonumber(k[3]),
    max_tok = tonumber(k[4]), used_tok = tonumber(k[5]) or 0, held_tok = tonumber(k[6]) or 0,
    max_mc = tonumber(k[7]), used_mc = tonumber(k[8]) or 0, held_mc = tonumber(k[9]) or 0,
    expires = tonumber(k[10]), rpm = tonumber(k[11]), max_conc = tonumber(k[12]),
    inflight = tonumber(k[13]) or 0, rl_w = tonumber(k[14]), rl_c = tonumber(k[15]) or 0,
    rl_p = tonumber(k[16]) or 0, who = (j == 1) and '' or 'parent',
  }
end

for _, r in ipairs(rows) do
  if r.status == 'revoked' then
    return {'refused', 'key_revoked', r.max_act, r.used_act, 0, 0, r.who}
  end
  -- The token's sealed expiry is checked before the store is asked; this one is the record's.
  if r.expires and now >= r.expires * 1000 then
    return {'refused', 'key_expired', 0, 0, 0, 0, r.who}
  end
  if r.used_act >= r.max_act and not reuse_act then
    return {'refused', 'activation_limit_reached', r.max_act, r.used_act, 0, 0, r.who}
  end
  if r.max_tok and r.used_tok >= r.max_tok then
    return {'refused', 'token_limit_reached', r.max_tok, r.used_tok, 0, 0, r.who}
  end
  if r.max_mc and r.used_mc >= r.max_mc then
    return {'refused', 'spend_limit_reached', r.max_mc, r.used_mc, 0, 0, r.who}
  end
end

local t = redis.call('HMGET', KEYS[2], 'status', 'max_apm')
if t[1] ~= 'active' then
  return {'refused', 'tenant_suspended', 0, 0, 0, 0, ''}
end
local max_apm = tonumber(t[2])
local month_used = tonumber(redis.call('GET', KEYS[3]) or '0')
if month_used >= max_apm and not reuse_act then
  return {'refused', 'monthly_quota_reached', max_apm, month_used, 0, 0, ''}
end

-- Size the hold: the estimated input plus the largest answer every key can still pay for.
local limited, priced = false, false
for _, r in ipairs(rows) do
  if r.max_tok or r.max_mc then limited = true end
  if r.max_mc then priced = true end
end
local grant = -1
local hold_tok, hold_mc = 0, 0
if limited then
  grant = asked
  if grant < 0 then grant = default_out end
  for _, r in ipairs(rows) do
    if r.max_tok then
      local room = r.max_tok - r.used_tok - r.held_tok - input_tokens
      if room < min_out then
        return {'refused', 'token_limit_reached', r.max_tok, r.used_tok,
          math.max(0, r.max_tok - r.used_tok - r.held_tok), 0, r.who}
      end
      if room < grant then grant = room end
    end
  end
  if priced then
    for _, r in ipairs(rows) do
      if r.max_mc then
        local left = math.max(0, r.max_mc - r.used_mc - r.held_mc)
        if out_nc < 0 or input_mc < 0 then
          return {'refused', 'unknown_model_price', r.max_mc, r.used_mc, left, 0, r.who}
        end
        local room_mc = r.max_mc - r.used_mc - r.held_mc - input_mc
        local affordable = grant
        if out_nc > 0 then affordable = math.floor(room_mc * 1000 / out_nc) end
        if room_mc < 0 or affordable < min_out then
          return {'refused', 'spend_limit_reached', r.max_mc, r.used_mc, left, 0, r.who}
        end
        if affordable < grant then grant = affordable end
      end
    end
    hold_mc = input_mc + math.ceil(grant * out_nc / 1000)
  end
  hold_tok = input_tokens + grant
end

-- The rate: a sliding window, estimated from two fixed ones (this one and the one before,
-- weighted by how much of it the sliding window still covers). Integers throughout: the
-- estimate times the window length, against rpm times it.
local win = math.floor(now / window)
local elapsed = now - win * window
for _, r in ipairs(rows) do
  r.cur, r.prev = 0, 0
  if r.rpm then
    local rpm = r.rpm
    if r.rl_w == win then
      r.cur, r.prev = r.rl_c, r.rl_p
    elseif r.rl_w == win - 1 then
      r.prev = r.rl_c
    end
    local cur, prev = r.cur, r.prev
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
      return {'refused', 'rate_limited', rpm, used, 0, math.max(1, wait), r.who}
    end
  end
  if r.max_conc and r.inflight >= r.max_conc then
    -- Requests in flight end at their own pace: a second is a fair guess.
    return {'refused', 'concurrency_limit_reached', r.max_conc, r.inflight, 0, 1000, r.who}
  end
end

-- Every check passed: write.
local rem_act, rem_tok, rem_mc = MAX, -1, -1
for j, r in ipairs(rows) do
  local name = chain[j]
  if not reuse_act then
    r.used_act = redis.call('HINCRBY', name, 'used_act', 1)
    if r.used_act >= r.max_act then
      redis.call('HSET', name, 'status', 'exhausted')
    end
  end
  if j == 1 then redis.call('HSET', name, 'last_used', now) end
  if hold_tok > 0 then r.held_tok = redis.call('HINCRBY', name, 'held_tok', hold_tok) end
  if hold_mc > 0 then r.held_mc = redis.call('HINCRBY', name, 'held_mc', hold_mc) end
  redis.call('HINCRBY', name, 'inflight', 1)
  if r.rpm then
    redis.call('HSET', name, 'rl_w', win, 'rl_c', r.cur + 1, 'rl_p', r.prev)
  end
  rem_act = math.min(rem_act, math.max(0, r.max_act - r.used_act))
  if r.max_tok then
    local left = math.max(0, r.max_tok - r.used_tok - r.held_tok)
    if rem_tok < 0 or left < rem_tok then rem_tok = left end
  end
  if r.max_mc then
    local left = math.max(0, r.max_mc - r.used_mc - r.held_mc)
    if rem_mc < 0 or left < rem_mc then rem_mc = left end
  end
end
if not reuse_act and redis.call('INCR', KEYS[3]) == 1 then
  redis.call('EXPIRE', KEYS[3], month_ttl)
end

-- slot: this request counts in `inflight`, which its settlement (and only that) gives back;
-- act: it spent an activation (a retry under an Idempotency-Key may not); anc, idem: what its
-- settlement (the reaper's too) must update besides the key.
redis.call('HSET', KEYS[4], 'state', 'held', 'hold_tok', hold_tok, 'hold_mc', hold_mc,
  'grant', grant, 'rem_act', rem_act, 'rem_tok', rem_tok, 'rem_mc', rem_mc, 'slot', 1,
  'act', reuse_act and 0 or 1)
if n_anc > 0 then
  redis.call('HSET', KEYS[4], 'anc', table.concat(KEYS, ' ', 6, 5 + n_anc))
end
if idem then
  redis.call('HSET', KEYS[4], 'idem', idem)
  redis.call('HSET', idem, 'state', 'held', 'fp', fp, 'rid', ARGV[1], 'act', 1)
  redis.call('EXPIRE', idem, idem_ttl)
end
-- Kept a day past the deadline (or now, if that is later: a record born expired would leave
-- its hold to no one, as the reaper drops holds whose record is gone).
redis.call('PEXPIREAT', KEYS[4], math.max(deadline, now) + 86400000)
redis.call('ZADD', KEYS[5], deadline, ARGV[1])
return {'ok', grant, rem_act, rem_tok, rem_mc}
