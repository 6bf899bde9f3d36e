-- create_key: add a scoped key to a tenant if its plan has room for one more live key.
--
-- KEYS[1] tenant hash     {t:<tenant>}:tenant
-- KEYS[2] key hash        {t:<tenant>}:k:<key_id>
-- KEYS[3] keys zset       {t:<tenant>}:keys   (member key id, score creation ms)
-- ARGV[1] key id
-- ARGV[2] creation time, ms since the epoch
-- ARGV[3..] field, value pairs of the key hash
--
-- Returns {"ok", live_keys} or {"refused", code, limit, used}.

local t = redis.call('HMGET', KEYS[1], 'status', 'max_keys', 'live_keys')
if not t[1] then
  return {'refused', 'unauthorized', 0, 0}
end
if t[1] ~= 'active' then
  return {'refused', 'tenant_suspended', 0, 0}
end
local max_keys, live = tonumber(t[2]), tonumber(t[3]) or 0
if live >= max_keys then
  return {'refused', 'max_keys_reached', max_keys, live}
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

redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('ZADD', KEYS[3], created, ARGV[1])
return {'ok', redis.call('HINCRBY', KEYS[1], 'live_keys', 1)}
