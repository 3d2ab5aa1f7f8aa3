-- Hands the next ready job to a worker, promoting due delayed jobs on the way.
-- The caller passes the ids it believes are at the head of `wait` (and their hashes in KEYS); the head is
-- taken only when it is one of them, so this script touches only keys it was given.
-- KEYS: meta, wait, delayed, active, marker, events, prio, seq, fseq, then one job hash per candidate.
-- ARGV: lease_ms, worker, token, max_events, head_size, count, then the candidate ids.
-- Returns {1, remaining, fields, head} when a job was taken (fields: HGETALL of its hash),
-- {0, next_due, now} when nothing is ready, {2, next_due, now} while paused (next_due -1 when none),
-- {3, head} when the head was not among the candidates: call again with these.
local meta, wait, delayed, active, marker, events, prio, seq, fseq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local lease, worker, token, max_events = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local head_size, count = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()

local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', int(now), 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  local priority = redis.call('HGET', prio, id) or '0'
  redis.call('HDEL', prio, id)
  redis.call('ZREM', delayed, id)
  redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, priority, false)), id)
  emit(events, max_events, id, now, state_event('waiting'))
end

local function next_due()
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] then
    return tonumber(first[2])
  end
  return -1
end

if redis.call('HGET', meta, 'paused') == '1' then
  return { 2, next_due(), now }
end
local head = redis.call('ZRANGE', wait, 0, 0)[1]
if not head then
  return { 0, next_due(), now }
end
local index = nil
for i = 1, count do
  if ARGV[6 + i] == head then
    index = i
    break
  end
end
if not index then
  return { 3, redis.call('ZRANGE', wait, 0, head_size - 1) }
end
local job = KEYS[9 + index]
redis.call('ZREM', wait, head)
if redis.call('EXISTS', job) == 0 then
  -- A waiting id without its hash (removed by hand): drop it and let the caller go on.
  return { 3, redis.call('ZRANGE', wait, 0, head_size - 1) }
end
redis.call('ZADD', active, int(now + lease), head)
redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HSET', job, 'state', 'active', 'token', token, 'worker', worker, 'started', int(now))
redis.call('HDEL', job, 'cancel', 'finished', 'result')
emit(events, max_events, head, now, state_event('active'))
local remaining = redis.call('ZCARD', wait)
if remaining > 0 then
  redis.call('ZADD', marker, 0, '0')
end
return { 1, remaining, redis.call('HGETALL', job), redis.call('ZRANGE', wait, 0, head_size - 1) }
