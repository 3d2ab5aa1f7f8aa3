-- Writes the notes a worker held back about a held job: stage and progress events, the progress to store, log
-- lines (see write_notes), then the stage checkpoints held back, as checkpoint.lua would save them.
-- KEYS: job, events, active, log, checkpoints. ARGV: id, token, max_events, max_log_lines, the notes, the number
-- of checkpoints, then key and output (JSON) of each. Returns {1} or {fencing code}.
local job, events, active, log, cp = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, token, max_events, max_lines = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local held = check_lease(job, active, id, token, now)
if held ~= 1 then
  return { held }
end
local at = write_notes(job, log, events, max_events, max_lines, id, now, 5)
local saves = tonumber(ARGV[at])
for i = 1, saves do
  redis.call('HSET', cp, ARGV[at + 2 * i - 1], ARGV[at + 2 * i])
end
if saves > 0 then
  redis.call('HDEL', job, 'fresh')
end
return { 1 }
