-- Marks a held job cancelled after its worker stopped it on request.
-- KEYS: job, checkpoints, log, active, cancelled, events, ikeys, trash.
-- ARGV: id, token, keep_ms, keep_count, max_events.
-- Returns {1, trash size} or {fencing code}.
local job, cp, log, active, cancelled, events, ikeys, trash = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6], KEYS[7], KEYS[8]
local id, token = ARGV[1], ARGV[2]
local keep_ms, keep_n, max_events = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local now, refused = end_lease(job, active, id, token)
if not now then
  return { refused }
end
redis.call('HDEL', job, 'cancel')
finish(job, cp, log, ikeys, cancelled, id, 'cancelled', now, keep_ms)
emit(events, max_events, id, now, state_event('cancelled', 'cancelled on request'))
return { 1, retain(cancelled, trash, now, keep_ms, keep_n) }
