-- Records a failed attempt of a held job: delayed for a retry while attempts are left and the failure is
-- retryable, failed for good otherwise.
-- KEYS: job, checkpoints, log, active, delayed, failed, events, ikeys, prio, trash, per-minute failed, marker, meta.
-- ARGV: id, token, message, retryable (1/0), retry_after_ms (-1: the backoff), backoff_ms, max_backoff_ms,
-- keep_ms, keep_count, max_events.
-- Returns {1, 1, ready_at} (retrying), {1, 0, trash size} (failed), or {fencing code}.
local job, cp, log, active, delayed, failed, events, ikeys, prio, trash, metrics, marker, meta = KEYS[1], KEYS[2],
  KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local id, token, message, retryable = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local retry_after, backoff, max_backoff = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local keep_ms, keep_n, max_events = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local now, refused = end_lease(job, active, id, token)
if not now then
  return { refused }
end
redis.call('HSET', job, 'error', message)
local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
local max_attempts = tonumber(redis.call('HGET', job, 'max') or '1')
if retryable and attempts < max_attempts then
  local wait_ms = retry_after
  if wait_ms < 0 then
    wait_ms = math.min(backoff * 2 ^ math.min(math.max(attempts - 1, 0), 40), max_backoff)
  end
  local ready = now + math.floor(wait_ms)
  redis.call('HSET', job, 'state', 'queued', 'ready', int(ready))
  redis.call('HDEL', job, 'token', 'cancel')
  redis.call('HSET', prio, id, redis.call('HGET', job, 'prio') or '0')
  redis.call('ZADD', delayed, int(ready), id)
  emit(events, max_events, id, now, state_event('delayed', message))
  wake(marker, meta)
  return { 1, 1, ready }
end
redis.call('HDEL', job, 'cancel')
finish(job, cp, log, ikeys, failed, id, 'failed', now, keep_ms)
count_minute(metrics, now)
emit(events, max_events, id, now, state_event('failed', message))
return { 1, 0, retain(failed, trash, now, keep_ms, keep_n) }
