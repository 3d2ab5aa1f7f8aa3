-- Finishes a held job with its result, after writing the notes its worker held back; its checkpoints go (a
-- completed job never runs again). When a worker is named, takes the next ready job for it in the same call.
-- KEYS: job, checkpoints, log, active, completed, events, ikeys, trash, per-minute completed, then for the take:
-- meta, wait, delayed, marker, prio, seq, fseq, then one job hash per candidate.
-- ARGV: id, token, result (JSON), keep_ms, keep_count, max_events, max_log_lines, lease_ms, worker ('' to take
-- nothing), next token, head_size, the notes (see write_notes), count, then the candidate ids.
-- Returns {1, trash size, took, remaining, head, fields} (took: 1 with the taken job's fields, else the take
-- status of take_jobs), or {fencing code}.
local job, cp, log, active, completed, events, ikeys, trash, metrics = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local id, token, result = ARGV[1], ARGV[2], ARGV[3]
local keep_ms, keep_n, max_events, max_lines = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local lease, worker, next_token, head_size = tonumber(ARGV[8]), ARGV[9], ARGV[10], tonumber(ARGV[11])
local now, refused = end_lease(job, active, id, token)
if not now then
  return { refused }
end
local after = write_notes(job, log, events, max_events, max_lines, id, now, 12)
redis.call('DEL', cp)
finish(job, cp, log, ikeys, completed, id, 'completed', now, keep_ms, { 'result', result }, { 'cancel' })
count_minute(metrics, now)
emit(events, max_events, id, now, state_event('completed'))
local trash_size = retain(completed, trash, now, keep_ms, keep_n)
if worker == '' then
  return { 1, trash_size, 0 }
end
local q = { meta = KEYS[10], wait = KEYS[11], delayed = KEYS[12], active = active, marker = KEYS[13],
  events = events, prio = KEYS[14], seq = KEYS[15], fseq = KEYS[16] }
local count = tonumber(ARGV[after])
local status, taken = take_jobs(q, lease, worker, next_token, max_events, 1, after + 1, count, 17, now)
if status == 1 then
  return { 1, trash_size, 1, redis.call('ZCARD', q.wait), redis.call('ZRANGE', q.wait, 0, head_size - 1), taken[1] }
end
if status == 3 then
  return { 1, trash_size, 3, 0, redis.call('ZRANGE', q.wait, 0, head_size - 1) }
end
return { 1, trash_size, status }
