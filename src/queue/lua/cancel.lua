-- Cancels a job in any state: a waiting or delayed one at once, an active one by asking its worker (renew
-- tells it). KEYS: job, checkpoints, log, wait, delayed, cancelled, events, ikeys, prio, trash, active.
-- ARGV: id, keep_ms, keep_count, max_events.
-- Returns {1, trash size} (cancelled), {2} (asked), {3, state} (already final), {-1} (no such job).
local job, cp, log, wait, delayed, cancelled, events, ikeys, prio, trash, active = KEYS[1], KEYS[2], KEYS[3],
  KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local id, keep_ms, keep_n, max_events = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local state = redis.call('HGET', job, 'state')
if not state or redis.call('SISMEMBER', trash, id) == 1 then
  return { -1 }
end
if state == 'completed' or state == 'failed' or state == 'cancelled' then
  return { 3, state }
end
local now = now_ms()
if state == 'active' and redis.call('ZSCORE', active, id) then
  redis.call('HSET', job, 'cancel', '1')
  return { 2 }
end
redis.call('ZREM', wait, id)
redis.call('ZREM', delayed, id)
redis.call('HDEL', prio, id)
redis.call('HDEL', job, 'token')
finish(job, cp, log, ikeys, cancelled, id, 'cancelled', now, keep_ms)
emit(events, max_events, id, now, state_event('cancelled', 'cancelled before it ran'))
return { 1, retain(cancelled, trash, now, keep_ms, keep_n) }
