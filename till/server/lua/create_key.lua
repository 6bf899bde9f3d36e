-- create_key: add a scoped key to a tenant if its plan has room for one more live key.
--
-- KEYS[1] tenant hash     {t:<tenant>}:tenant
-- KEYS[2] key hash        {t:<tenant>}:k:<key_id>
-- KEYS[3] keys zset       {t:<tenant>}:keys   (member key id, score creation ms)
-- KEYS[4] expiring keys zset  {t:<tenant>}:exp   (member key id, score expiry s; the reaper
--         frees an expired key's place in the plan)
-- KEYS[5] the parent's hash  {t:<tenant>}:k:<parent_id>   (a child key only)
-- KEYS[6] the parent's children zset  {t:<tenant>}:kids:<parent_id>   (a child key only)
-- ARGV[1] key id
-- ARGV[2] creation time, ms since the epoch
-- ARGV[3..] field, value pairs of the key hash
--
-- A child's limits (max_act, max_tok, max_mc among the pairs) must fit in what its parent has
-- left; the parent must be live. Its requests count against the parent as well (reserve.lua).
--
-- Returns {"ok", live_keys} or {"refused", code, limit, used, field}.

if #KEYS ~= 4 and #KEYS ~= 6 then
  return redis.error_reply('ERR till create_key: wrong number of keys')
end
local t = redis.call('HMGET', KEYS[1], 'status', 'max_keys', 'live_keys')
if not t[1] then
  return {'refused', 'unauthorized', 0, 0, ''}
end
if t[1] ~= 'active' then
  return {'refused', 'tenant_suspended', 0, 0, ''}
end
local max_keys, live = tonumber(t[2]), tonumber(t[3]) or 0
if live >= max_keys then
  return {'refused', 'max_keys_reached', max_keys, live, ''}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('ERR till create_key: key id already exists')
end
if (#ARGV - 2) % 2 ~= 0 then
  return redis.error_reply('ERR till create_key: odd number of field values')
end
local created = tonumber(ARGV[2])
if created == nil or created ~= created then
  return redis.error_reply('ERR till create_key: ARGV[2] is not a number')
end

local want = {}
for i = 3, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
local expires = tonumber(want['expires'])
if want['expires'] and (expires == nil or expires ~= math.floor(expires)) then
  return redis.error_reply('ERR till create_key: expires is not an integer')
end
if #KEYS == 6 then
  local p = redis.call('HMGET', KEYS[5], 'status', 'expires', 'max_act', 'used_act', 'max_tok',
    'used_tok', 'held_tok', 'max_mc', 'used_mc', 'held_mc')
  if not p[1] or p[1] == 'revoked' then
    return {'refused', 'key_revoked', 0, 0, ''}
  end
  if p[2] and created >= tonumber(p[2]) * 1000 then
    return {'refused', 'key_expired', 0, 0, ''}
  end
  local left = {
    max_act = tonumber(p[3]) - tonumber(p[4]),
    max_tok = p[5] and (tonumber(p[5]) - (tonumber(p[6]) or 0) - (tonumber(p[7]) or 0)),
    max_mc = p[8] and (tonumber(p[8]) - (tonumber(p[9]) or 0) - (tonumber(p[10]) or 0)),
  }
  for _, field in ipairs({'max_act', 'max_tok', 'max_mc'}) do
    local asked = tonumber(want[field])
    if asked and left[field] and asked > left[field] then
      return {'refused', 'parent_limit_exceeded', asked, math.max(0, left[field]), field}
    end
  end
  redis.call('ZADD', KEYS[6], created, ARGV[1])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
if expires then redis.call('ZADD', KEYS[4], expires, ARGV[1]) end
redis.call('ZADD', KEYS[3], created, ARGV[1])
return {'ok', redis.call('HINCRBY', KEYS[1], 'live_keys', 1)}
