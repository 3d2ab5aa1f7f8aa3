-- Shared by every queue script (prepended by redis.rs). Times come from the Redis server's clock only.
-- Job hash fields: id, state (queued|active|completed|failed|cancelled; waiting vs delayed is membership of
-- the `wait` or `delayed` zset), spec (the NewJob as JSON), prio, max, ikey, pipeline, attempts, stalls,
-- created, started, finished, ready, worker, token, progress, result, error, cancel.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers up to 2^53 as exact decimal text (tostring would round them).
local function int(n)
  return string.format('%.0f', n)
end

local TWO32 = 4294967296
local TWO31 = 2147483648
local PRIORITY_OFFSET = 1048576 -- -MIN_PRIORITY

-- The wait score of a job of `priority`: (priority - MIN_PRIORITY) * 2^32 + sequence, so lower priorities run
-- first and jobs of one priority run in order. Ordinary jobs take sequences upward from 2^31, jobs handed back
-- (release, stall) downward from 2^31 - 1, so they go before every ordinary job of their priority. Both
-- counters restart whenever the wait set is empty, which keeps them far below 2^31.
local function wait_score(wait_key, seq_key, fseq_key, priority, front)
  if redis.call('ZCARD', wait_key) == 0 then
    redis.call('DEL', seq_key, fseq_key)
  end
  local base = (tonumber(priority) + PRIORITY_OFFSET) * TWO32
  if front then
    return base + TWO31 - 1 - (redis.call('INCR', fseq_key) % TWO31)
  end
  return base + TWO31 + (redis.call('INCR', seq_key) % TWO31)
end

local function emit(events_key, max_events, id, now, kind)
  redis.call('XADD', events_key, 'MAXLEN', '~', max_events, '*', 'j', id, 't', int(now), 'e', cjson.encode(kind))
end

local function state_event(state, reason)
  if reason then
    return { type = 'state', state = state, reason = reason }
  end
  return { type = 'state', state = state }
end

-- Wakes one blocked worker, unless the queue is paused (resuming wakes them).
local function wake(marker_key, meta_key)
  if redis.call('HGET', meta_key, 'paused') ~= '1' then
    redis.call('ZADD', marker_key, 0, '0')
  end
end

-- Fencing: 1 when `token` holds the active job and its lease has not expired, else a negative code the caller
-- maps to a distinct error: -1 no such job, -2 not active (it ended or went back to waiting), -3 another token
-- holds it, -4 the lease expired (the job waits for recovery; its old holder may write nothing more).
local function check_lease(job_key, active_key, id, token, now)
  local fields = redis.call('HMGET', job_key, 'state', 'token')
  if not fields[1] then
    return -1
  end
  if fields[1] ~= 'active' then
    return -2
  end
  if fields[2] ~= token then
    return -3
  end
  local deadline = redis.call('ZSCORE', active_key, id)
  if not deadline or tonumber(deadline) <= now then
    return -4
  end
  return 1
end

-- Keeps a final-state zset within its age and count; jobs over the count go to `trash`, whose keys the caller
-- deletes with purge.lua (their keys are not this script's to touch). Jobs over the age need nothing more:
-- their keys expire on their own (finish sets the TTL). Returns the trash size.
local function retain(zset_key, trash_key, now, keep_ms, keep_n)
  redis.call('ZREMRANGEBYSCORE', zset_key, '-inf', int(now - keep_ms))
  local extra = redis.call('ZCARD', zset_key) - keep_n
  if extra > 0 then
    if extra > 1000 then
      extra = 1000
    end
    local old = redis.call('ZRANGE', zset_key, 0, extra - 1)
    redis.call('ZREMRANGEBYRANK', zset_key, 0, extra - 1)
    for i = 1, #old, 100 do
      redis.call('SADD', trash_key, unpack(old, i, math.min(i + 99, #old)))
    end
  end
  return redis.call('SCARD', trash_key)
end

-- Moves a job to a final state: its idempotency key is free again, and the job, its checkpoints and its log
-- expire after the retention age.
local function finish(job_key, cp_key, log_key, ikeys_key, zset_key, id, state, now, keep_ms)
  redis.call('HSET', job_key, 'state', state, 'finished', int(now))
  redis.call('HDEL', job_key, 'token')
  local ikey = redis.call('HGET', job_key, 'ikey')
  if ikey and ikey ~= '' and redis.call('HGET', ikeys_key, ikey) == id then
    redis.call('HDEL', ikeys_key, ikey)
  end
  redis.call('ZADD', zset_key, int(now), id)
  local ttl = math.max(1, keep_ms)
  redis.call('PEXPIRE', job_key, ttl)
  redis.call('PEXPIRE', cp_key, ttl)
  redis.call('PEXPIRE', log_key, ttl)
end

-- Counts one job in the per-minute zset (member: the minute, zero-padded so that text order is time order),
-- keeping the last hour, and lets the whole zset expire when nothing happens for two hours.
local function count_minute(metrics_key, now)
  local minute = math.floor(now / 60000)
  redis.call('ZINCRBY', metrics_key, 1, string.format('%012d', minute))
  redis.call('ZREMRANGEBYLEX', metrics_key, '-', '(' .. string.format('%012d', minute - 60))
  redis.call('PEXPIRE', metrics_key, 7200000)
end

