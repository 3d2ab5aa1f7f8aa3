-- Saves one checkpoint of a held job, and notes on the job that it has some (a job enqueued with `fresh` set
-- has none, so its worker need not read them). KEYS: job, checkpoints, active. ARGV: id, token, key, output
-- (JSON). Returns {1} or {fencing code}.
local held = check_lease(KEYS[1], KEYS[3], ARGV[1], ARGV[2], now_ms())
if held ~= 1 then
  return { held }
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[1], 'fresh')
return { 1 }
