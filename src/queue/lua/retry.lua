-- Sends failed (or cancelled) jobs back to waiting with fresh attempts, keeping their checkpoints.
-- KEYS: wait, failed, cancelled, events, ikeys, marker, seq, fseq, meta, trash, delayed, then per job: job,
-- checkpoints, log.
-- ARGV: max_events, only_failed (1: skip cancelled ones, as retry-all does), pipeline ('' any), count, ids.
-- Returns per id: {1} retried, {-1} no such job, {-4, state} not failed or cancelled (or not of the pipeline),
-- {-5, other id} its idempotency key is held by another live job.
local wait, failed, cancelled, events, ikeys, marker, seq, fseq, meta, trash, delayed = KEYS[1], KEYS[2], KEYS[3],
  KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local max_events, only_failed, pipeline, count = ARGV[1], ARGV[2] == '1', ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local out = {}
local any = false
for i = 1, count do
  local id = ARGV[4 + i]
  local job, cp, log = KEYS[9 + 3 * i], KEYS[10 + 3 * i], KEYS[11 + 3 * i]
  local fields = redis.call('HMGET', job, 'state', 'ikey', 'pipeline', 'prio')
  local state, ikey = fields[1], fields[2]
  if state == 'queued' then
    if redis.call('ZSCORE', delayed, id) then
      state = 'delayed'
    else
      state = 'waiting'
    end
  end
  local holder = false
  if ikey and ikey ~= '' then
    holder = redis.call('HGET', ikeys, ikey)
  end
  if not state or redis.call('SISMEMBER', trash, id) == 1 then
    out[i] = { -1 }
  elseif not (state == 'failed' or (state == 'cancelled' and not only_failed)) then
    out[i] = { -4, state }
  elseif pipeline ~= '' and fields[3] ~= pipeline then
    out[i] = { -4, state }
  elseif holder and holder ~= id then
    out[i] = { -5, holder }
  else
    redis.call('ZREM', failed, id)
    redis.call('ZREM', cancelled, id)
    redis.call('PERSIST', job)
    redis.call('PERSIST', cp)
    redis.call('PERSIST', log)
    redis.call('HSET', job, 'state', 'queued', 'attempts', 0, 'stalls', 0)
    redis.call('HDEL', job, 'finished', 'result', 'cancel', 'token', 'progress', 'ready')
    if ikey and ikey ~= '' then
      redis.call('HSET', ikeys, ikey, id)
    end
    redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, fields[4] or '0', false)), id)
    emit(events, max_events, id, now, state_event('waiting', 'retried'))
    any = true
    out[i] = { 1 }
  end
end
if any then
  wake(marker, meta)
end
return out
