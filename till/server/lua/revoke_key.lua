-- revoke_key: mark a key revoked (once) and free its place in the tenant's plan.
--
-- KEYS[1] tenant hash     {t:<tenant>}:tenant
-- KEYS[2] key hash        {t:<tenant>}:k:<key_id>
-- ARGV[1] revocation time, ms since the epoch
--
-- Returns 1 when this call revoked the key, 0 when it was revoked already, -1 when there is no
-- such key. Held requests still settle against a revoked key; new ones are refused.

local status = redis.call('HGET', KEYS[2], 'status')
if not status then
  return -1
end
if status == 'revoked' then
  return 0
end
redis.call('HSET', KEYS[2], 'status', 'revoked', 'revoked_at', ARGV[1])
-- An expired key gave its place in the plan back already (expire_keys.lua).
if redis.call('HGET', KEYS[2], 'freed') ~= '1' then
  redis.call('HINCRBY', KEYS[1], 'live_keys', -1)
end
return 1
