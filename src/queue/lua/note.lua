-- Writes the notes a worker held back about a held job: stage and progress events, the progress to store, log
-- lines (see write_notes). KEYS: job, events, active, log. ARGV: id, token, max_events, max_log_lines, the notes.
-- Returns {1} or {fencing code}.
local job, events, active, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, token, max_events, max_lines = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local held = check_lease(job, active, id, token, now)
if held ~= 1 then
  return { held }
end
write_notes(job, log, events, max_events, max_lines, id, now, 5)
return { 1 }
