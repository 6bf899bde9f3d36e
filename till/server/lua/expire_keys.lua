-- expire_keys: give the places in the plan of keys past their expiry back to their tenant, once
-- each. The keys stay (their records, their counters); only their count as live keys goes.
--
-- KEYS[1] tenant hash            {t:<tenant>}:tenant
-- KEYS[2] expiring keys zset     {t:<tenant>}:exp
-- KEYS[3..] the hashes of the keys due, as ARGV[2..] names them
-- ARGV[1] now, seconds since the epoch
-- ARGV[2..] the key ids due (read from the zset just before)
--
-- Returns how many keys gave their place back.

local now = tonumber(ARGV[1])
if now == nil or #KEYS ~= #ARGV + 1 then
  return redis.error_reply('ERR till expire_keys: bad arguments')
end
local freed = 0
for i = 2, #ARGV do
  local key = KEYS[i + 1]
  local k = redis.call('HMGET', key, 'status', 'expires', 'freed')
  local expires = tonumber(k[2])
  if not k[1] or not expires or expires <= now then
    if k[1] and k[1] ~= 'revoked' and k[3] ~= '1' then
      redis.call('HSET', key, 'freed', 1)
      redis.call('HINCRBY', KEYS[1], 'live_keys', -1)
      freed = freed + 1
    end
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return freed
