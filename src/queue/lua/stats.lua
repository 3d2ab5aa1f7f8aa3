-- The queue at a glance. Drops final jobs past their retention age first (their keys have expired).
-- KEYS: wait, delayed, active, completed, failed, cancelled, meta, workers, worker info, per-minute completed,
-- per-minute failed. ARGV: keep_completed_ms, keep_failed_ms, stale_ms.
-- Returns {now, {counts in that order}, paused, {worker JSON, last beat, ...}, {minute, n, ...}, {minute, n, ...}}.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', int(now - tonumber(ARGV[1])))
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', int(now - tonumber(ARGV[2])))
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', int(now - tonumber(ARGV[2])))
local counts = {}
for i = 1, 6 do
  counts[i] = redis.call('ZCARD', KEYS[i])
end
local paused = 0
if redis.call('HGET', KEYS[7], 'paused') == '1' then
  paused = 1
end
local workers = {}
local live = redis.call('ZRANGEBYSCORE', KEYS[8], int(now - tonumber(ARGV[3])), '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  local info = redis.call('HGET', KEYS[9], live[i])
  if info then
    workers[#workers + 1] = info
    workers[#workers + 1] = live[i + 1]
  end
end
return { now, counts, paused, workers, redis.call('ZRANGE', KEYS[10], 0, -1, 'WITHSCORES'),
  redis.call('ZRANGE', KEYS[11], 0, -1, 'WITHSCORES') }
