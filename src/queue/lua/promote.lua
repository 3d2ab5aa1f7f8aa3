-- Makes a delayed job waiting now. KEYS: job, wait, delayed, events, marker, prio, seq, fseq, meta, trash.
-- ARGV: id, max_events. Returns {1}, {-1} (no such job) or {-4, state}.
local job, wait, delayed, events, marker, prio, seq, fseq, meta, trash = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local id, max_events = ARGV[1], ARGV[2]
local state = redis.call('HGET', job, 'state')
if not state or redis.call('SISMEMBER', trash, id) == 1 then
  return { -1 }
end
if not redis.call('ZSCORE', delayed, id) then
  if state == 'queued' then
    state = 'waiting'
  end
  return { -4, state }
end
local now = now_ms()
redis.call('ZREM', delayed, id)
redis.call('HDEL', prio, id)
redis.call('HSET', job, 'ready', int(now))
redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, redis.call('HGET', job, 'prio') or '0', false)), id)
emit(events, max_events, id, now, state_event('waiting', 'promoted'))
wake(marker, meta)
return { 1 }
