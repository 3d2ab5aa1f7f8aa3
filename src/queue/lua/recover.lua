-- Recovers jobs whose lease expired, each re-checked here so that every recovery happens exactly once however
-- many workers call this at the same time: back to the front of waiting with one more stall, or failed once
-- the stalls pass max_stalls (or cancelled, when a cancel was asked).
-- KEYS: active, wait, failed, cancelled, events, ikeys, trash, per-minute failed, marker, seq, fseq, meta,
-- then per job: job, checkpoints, log.
-- ARGV: max_stalls, keep_failed_ms, keep_failed_count, max_events, count, then the ids.
-- Returns {id, state it went to ('waiting', 'failed' or 'cancelled'), ...} for the jobs it recovered.
local active, wait, failed, cancelled, events, ikeys, trash, metrics, marker, seq, fseq, meta = KEYS[1], KEYS[2],
  KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local max_stalls, keep_ms, keep_n, max_events = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local count = tonumber(ARGV[5])
local now = now_ms()
local out = {}
local requeued = false
for i = 1, count do
  local id = ARGV[5 + i]
  local job, cp, log = KEYS[10 + 3 * i], KEYS[11 + 3 * i], KEYS[12 + 3 * i]
  local deadline = redis.call('ZSCORE', active, id)
  if deadline and tonumber(deadline) < now then
    redis.call('ZREM', active, id)
    local went = 'waiting'
    if redis.call('EXISTS', job) == 1 then
      local stalls = redis.call('HINCRBY', job, 'stalls', 1)
      redis.call('HINCRBY', job, 'attempts', -1)
      redis.call('HDEL', job, 'token')
      if redis.call('HGET', job, 'cancel') == '1' then
        redis.call('HDEL', job, 'cancel')
        finish(job, cp, log, ikeys, cancelled, id, 'cancelled', now, keep_ms)
        emit(events, max_events, id, now, state_event('cancelled', 'cancelled on request'))
        retain(cancelled, trash, now, keep_ms, keep_n)
        went = 'cancelled'
      elseif stalls > max_stalls then
        local message = 'job stalled more than ' .. max_stalls .. ' times (its worker stopped renewing the lease)'
        redis.call('HSET', job, 'error', message)
        finish(job, cp, log, ikeys, failed, id, 'failed', now, keep_ms)
        count_minute(metrics, now)
        emit(events, max_events, id, now, state_event('failed', message))
        retain(failed, trash, now, keep_ms, keep_n)
        went = 'failed'
      else
        redis.call('HSET', job, 'state', 'queued')
        local priority = redis.call('HGET', job, 'prio') or '0'
        redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, priority, true)), id)
        emit(events, max_events, id, now, state_event('waiting', 'stalled: lease expired'))
        requeued = true
      end
    end
    out[#out + 1] = id
    out[#out + 1] = went
  end
end
if requeued then
  wake(marker, meta)
end
return out
