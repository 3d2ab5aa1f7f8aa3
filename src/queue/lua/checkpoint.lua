-- Saves one checkpoint of a held job. KEYS: job, checkpoints. ARGV: token, key, output (JSON).
-- Returns {1} or {fencing code}.
local held = check_lease(KEYS[1], ARGV[1])
if held ~= 1 then
  return { held }
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return { 1 }
