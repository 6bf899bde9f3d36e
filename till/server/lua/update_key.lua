-- update_key: change a key's limits and metadata, or top its budgets up, all at once or not at
-- all. Every worker reads the limits from here on its next request.
--
-- KEYS[1] key hash        {t:<tenant>}:k:<key_id>
-- ARGV[1] the new metadata as JSON, or "" to keep it
-- ARGV[2..] triples: op, field, value
--   op "set": field = value (an integer); "add": field += value, the field must be set;
--   "del": the field is removed (the limit lifted; value ignored)
--   fields: max_act, max_tok, max_mc, rpm, max_conc
--
-- Returns {"ok"}, -1 when there is no such key, or {"refused", code, field}:
--   already_revoked, or no_limit (an "add" to a limit the key does not have).

local MAX = 9007199254740991
local FIELDS = {max_act = true, max_tok = true, max_mc = true, rpm = true, max_conc = true}

if (#ARGV - 1) % 3 ~= 0 then
  return redis.error_reply('ERR till update_key: ARGV is not metadata then op, field, value')
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return -1
end
if status == 'revoked' then
  return {'refused', 'already_revoked', ''}
end

-- Check everything before the first write.
local changes = {}
for i = 2, #ARGV, 3 do
  local op, field, value = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if not FIELDS[field] or (op ~= 'set' and op ~= 'add' and op ~= 'del') then
    return redis.error_reply('ERR till update_key: bad op or field at ARGV[' .. i .. ']')
  end
  if op == 'del' and field == 'max_act' then
    return redis.error_reply('ERR till update_key: max_act cannot be removed')
  end
  local new = nil
  if op ~= 'del' then
    if value == nil or value ~= math.floor(value) or value < 1 or value > MAX then
      return redis.error_reply('ERR till update_key: ARGV[' .. (i + 2) .. '] is out of range')
    end
    new = value
    if op == 'add' then
      local current = tonumber(redis.call('HGET', KEYS[1], field))
      if current == nil then
        return {'refused', 'no_limit', field}
      end
      new = current + value
      if new > MAX then
        return redis.error_reply('ERR till update_key: ' .. field .. ' would overflow')
      end
    end
  end
  changes[#changes + 1] = {field, new}
end

if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1])
end
for _, c in ipairs(changes) do
  if c[2] == nil then
    redis.call('HDEL', KEYS[1], c[1])
  else
    redis.call('HSET', KEYS[1], c[1], c[2])
  end
end

-- A key with room again is active; one at or past a limit (lowered under its use) exhausted.
local k = redis.call('HMGET', KEYS[1], 'max_act', 'used_act', 'max_tok', 'used_tok', 'max_mc',
  'used_mc')
local max_tok, max_mc = tonumber(k[3]), tonumber(k[5])
local spent = tonumber(k[2]) >= tonumber(k[1])
  or (max_tok and (tonumber(k[4]) or 0) >= max_tok)
  or (max_mc and (tonumber(k[6]) or 0) >= max_mc)
if spent then
  redis.call('HSET', KEYS[1], 'status', 'exhausted')
else
  redis.call('HSET', KEYS[1], 'status', 'active')
end
return {'ok'}
