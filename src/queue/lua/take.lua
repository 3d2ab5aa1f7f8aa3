-- Hands up to `want` ready jobs to a worker, promoting due delayed jobs on the way (see take_jobs in common.lua).
-- KEYS: meta, wait, delayed, active, marker, events, prio, seq, fseq, then one job hash per candidate.
-- ARGV: lease_ms, worker, token, max_events, head_size, want, count, then the candidate ids.
-- Returns {1, remaining, head, fields...} when jobs were taken (fields: HGETALL of each job's hash),
-- {0, next_due, now} when nothing is ready, {2, next_due, now} while paused (next_due -1 when none),
-- {3, head} when the head was not among the candidates: call again with these.
local q = { meta = KEYS[1], wait = KEYS[2], delayed = KEYS[3], active = KEYS[4], marker = KEYS[5], events = KEYS[6],
  prio = KEYS[7], seq = KEYS[8], fseq = KEYS[9] }
local lease, worker, token, max_events = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local head_size, want, count = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
local status, taken = take_jobs(q, lease, worker, token, max_events, want, 8, count, 10, now)
if status == 1 then
  local out = { 1, redis.call('ZCARD', q.wait), redis.call('ZRANGE', q.wait, 0, head_size - 1) }
  for _, fields in ipairs(taken) do
    out[#out + 1] = fields
  end
  return out
end
if status == 3 then
  return { 3, redis.call('ZRANGE', q.wait, 0, head_size - 1) }
end
return { status, next_due(q.delayed), now }
