-- Finishes a held job with its result. Its checkpoints go: a completed job never runs again.
-- KEYS: job, checkpoints, log, active, completed, events, ikeys, trash, per-minute completed.
-- ARGV: id, token, result (JSON), keep_ms, keep_count, max_events.
-- Returns {1, trash size} or {fencing code}.
local job, cp, log, active, completed, events, ikeys, trash, metrics = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local id, token, result = ARGV[1], ARGV[2], ARGV[3]
local keep_ms, keep_n, max_events = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local now = now_ms()
local held = check_lease(job, active, id, token, now)
if held ~= 1 then
  return { held }
end
redis.call('ZREM', active, id)
redis.call('HSET', job, 'result', result)
redis.call('HDEL', job, 'cancel')
redis.call('DEL', cp)
finish(job, cp, log, ikeys, completed, id, 'completed', now, keep_ms)
count_minute(metrics, now)
emit(events, max_events, id, now, state_event('completed'))
return { 1, retain(completed, trash, now, keep_ms, keep_n) }
