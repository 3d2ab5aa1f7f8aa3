-- Progress or a stage event of a held job: stored on the job (progress) and appended to the event stream.
-- KEYS: job, events, active. ARGV: id, token, event (JSON), progress (JSON, '' for a stage event), max_events.
-- Returns {1} or {fencing code}.
local job, events, active = KEYS[1], KEYS[2], KEYS[3]
local id, token, event, progress, max_events = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = now_ms()
local held = check_lease(job, active, id, token, now)
if held ~= 1 then
  return { held }
end
if progress ~= '' then
  redis.call('HSET', job, 'progress', progress)
end
redis.call('XADD', events, 'MAXLEN', '~', max_events, '*', 'j', id, 't', int(now), 'e', event)
return { 1 }
