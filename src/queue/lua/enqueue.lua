-- Adds jobs, or finds the live job holding each one's idempotency key.
-- KEYS: meta, wait, delayed, marker, events, ikeys, prio, seq, fseq, then one job hash per job.
-- ARGV: max_events, count, then per job: id, ikey ('' for none), priority, delay_ms, max_attempts, pipeline, spec.
-- Returns per job: 1 (created) or 0 (existing), then the id.
local meta, wait, delayed, marker, events, ikeys, prio, seq, fseq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local max_events = ARGV[1]
local count = tonumber(ARGV[2])
local now = now_ms()
local out = {}
local added = false
local first_ready = nil
for i = 1, count do
  local a = 2 + (i - 1) * 7
  local id, ikey, priority, delay = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local existing = false
  if ikey ~= '' then
    existing = redis.call('HGET', ikeys, ikey)
  end
  if existing then
    out[#out + 1] = 0
    out[#out + 1] = existing
  else
    local job = KEYS[9 + i]
    redis.call('HSET', job, 'id', id, 'state', 'queued', 'prio', priority, 'max', ARGV[a + 5], 'ikey', ikey,
      'pipeline', ARGV[a + 6], 'spec', ARGV[a + 7], 'attempts', 0, 'stalls', 0, 'created', int(now), 'fresh', 1)
    if ikey ~= '' then
      redis.call('HSET', ikeys, ikey, id)
    end
    if delay > 0 then
      local ready = now + delay
      redis.call('HSET', job, 'ready', int(ready))
      redis.call('HSET', prio, id, priority)
      redis.call('ZADD', delayed, int(ready), id)
      emit(events, max_events, id, now, state_event('delayed'))
    else
      redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, priority, false)), id)
      emit(events, max_events, id, now, state_event('waiting'))
      first_ready = first_ready or id
    end
    added = true
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
if added then
  wake(marker, meta, first_ready)
end
return out
