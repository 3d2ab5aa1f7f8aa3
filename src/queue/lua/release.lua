-- Hands a held job back to the front of its priority without counting the attempt (a worker shutting down).
-- A job whose cancel was asked is cancelled instead, since nobody runs it any more.
-- KEYS: job, checkpoints, log, active, wait, marker, events, seq, fseq, meta, cancelled, ikeys, trash.
-- ARGV: id, token, max_events, keep_ms, keep_count (the cancelled retention).
-- Returns {1} (waiting), {2, trash size} (cancelled) or {fencing code}.
local job, cp, log, active, wait, marker, events, seq, fseq, meta, cancelled, ikeys, trash = KEYS[1], KEYS[2],
  KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local id, token, max_events = ARGV[1], ARGV[2], ARGV[3]
local keep_ms, keep_n = tonumber(ARGV[4]), tonumber(ARGV[5])
local now, refused = end_lease(job, active, id, token)
if not now then
  return { refused }
end
redis.call('HINCRBY', job, 'attempts', -1)
if redis.call('HGET', job, 'cancel') == '1' then
  redis.call('HDEL', job, 'cancel')
  finish(job, cp, log, ikeys, cancelled, id, 'cancelled', now, keep_ms)
  emit(events, max_events, id, now, state_event('cancelled', 'cancelled on request'))
  return { 2, retain(cancelled, trash, now, keep_ms, keep_n) }
end
redis.call('HSET', job, 'state', 'queued')
redis.call('HDEL', job, 'token')
local priority = redis.call('HGET', job, 'prio') or '0'
redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, priority, true)), id)
emit(events, max_events, id, now, state_event('waiting', 'released by its worker'))
wake(marker, meta)
return { 1 }
