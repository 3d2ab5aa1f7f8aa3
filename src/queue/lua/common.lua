-- Shared by every queue script (prepended by redis.rs). Times come from the Redis server's clock only.
-- Job hash fields: id, state (queued|active|completed|failed|cancelled; waiting vs delayed is membership of
-- the `wait` or `delayed` zset), spec (the NewJob as JSON), prio, max, ikey, pipeline, attempts, stalls,
-- created, started, finished, ready, worker, token, progress, result, error, cancel, fresh (set at enqueue,
-- cleared by the first checkpoint: nothing to restore while it is there).

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

-- Appends an event already encoded as JSON.
local function emit_json(events_key, max_events, id, now, json)
  redis.call('XADD', events_key, 'MAXLEN', '~', max_events, '*', 'j', id, 't', int(now), 'e', json)
end

local function emit(events_key, max_events, id, now, kind)
  emit_json(events_key, max_events, id, now, cjson.encode(kind))
end

-- The `active` state event, the one written for every job taken.
local ACTIVE_EVENT = '{"type":"state","state":"active"}'

local function state_event(state, reason)
  if reason then
    return { type = 'state', state = state, reason = reason }
  end
  return { type = 'state', state = state }
end

-- Wakes one blocked worker, unless the queue is paused (resuming wakes them). `hint`, when given, is the id of a
-- job that just became ready: the process woken by it offers that id to its take (see take_jobs), so a job
-- enqueued into an idle queue is taken in one call. At most 64 hints wait in the marker (a hint is only a hint:
-- a stale one costs a take that finds the head elsewhere); the member '0' wakes without one.
local function wake(marker_key, meta_key, hint)
  if redis.call('HGET', meta_key, 'paused') ~= '1' then
    redis.call('ZADD', marker_key, 0, hint or '0')
    if hint and redis.call('ZCARD', marker_key) > 64 then
      redis.call('ZREMRANGEBYRANK', marker_key, 64, -1)
    end
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

-- The fenced start of every script that ends a holder's lease (complete, fail, cancelled, release): the server's
-- time when `token` holds the job, with the job out of `active`; else nil and the fencing code.
local function end_lease(job_key, active_key, id, token)
  local now = now_ms()
  local held = check_lease(job_key, active_key, id, token, now)
  if held ~= 1 then
    return nil, held
  end
  redis.call('ZREM', active_key, id)
  return now
end

-- Writes the notes a worker held back about a held job, read from ARGV from index `at`: the number of events,
-- the events (JSON), the progress to store ('' for none), the number of log lines, the lines. Returns the index
-- after them.
local function write_notes(job_key, log_key, events_key, max_events, max_lines, id, now, at)
  local count = tonumber(ARGV[at])
  for i = 1, count do
    emit_json(events_key, max_events, id, now, ARGV[at + i])
  end
  at = at + count + 1
  if ARGV[at] ~= '' then
    redis.call('HSET', job_key, 'progress', ARGV[at])
  end
  local lines = tonumber(ARGV[at + 1])
  if lines > 0 then
    local stamped = {}
    for i = 1, lines do
      stamped[i] = int(now) .. ' ' .. ARGV[at + 1 + i]
    end
    redis.call('RPUSH', log_key, unpack(stamped))
    redis.call('LTRIM', log_key, -max_lines, -1)
  end
  return at + 2 + lines
end

-- Moves due delayed jobs (at most 100 per call) to the back of waiting.
local function promote_due(delayed, wait, prio, seq, fseq, events, max_events, now)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', int(now), 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    local priority = redis.call('HGET', prio, id) or '0'
    redis.call('HDEL', prio, id)
    redis.call('ZREM', delayed, id)
    redis.call('ZADD', wait, int(wait_score(wait, seq, fseq, priority, false)), id)
    emit(events, max_events, id, now, state_event('waiting'))
  end
end

-- When the first delayed job is due, or -1.
local function next_due(delayed)
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] then
    return tonumber(first[2])
  end
  return -1
end

-- Hands up to `want` jobs from the head of wait to `worker`, each under lease token `token`.<n>. The caller
-- passes the ids it believes are at the head of wait (ARGV[cand_arg ...], `count` of them, their hashes at
-- KEYS[cand_key ...]); a head id is taken only when it is one of them, so the script touches only keys it was
-- given. `q` holds the queue's keys: meta, wait, delayed, active, marker, events, prio, seq, fseq.
-- Returns a status and the taken jobs' fields (HGETALL): 1 with the jobs, 0 nothing ready, 2 paused, 3 the head
-- was not among the candidates (ask again with the head this returns).
local function take_jobs(q, lease, worker, token, max_events, want, cand_arg, count, cand_key, now)
  promote_due(q.delayed, q.wait, q.prio, q.seq, q.fseq, q.events, max_events, now)
  if redis.call('HGET', q.meta, 'paused') == '1' then
    return 2, {}
  end
  local heads = redis.call('ZRANGE', q.wait, 0, want - 1)
  if #heads == 0 then
    return 0, {}
  end
  local index = {}
  for i = 1, count do
    index[ARGV[cand_arg + i - 1]] = i
  end
  local taken = {}
  for n, id in ipairs(heads) do
    local i = index[id]
    if not i then
      break
    end
    local job = KEYS[cand_key + i - 1]
    redis.call('ZREM', q.wait, id)
    -- A waiting id without its hash (removed by hand) is dropped.
    if redis.call('EXISTS', job) == 1 then
      redis.call('ZADD', q.active, int(now + lease), id)
      redis.call('HINCRBY', job, 'attempts', 1)
      redis.call('HSET', job, 'state', 'active', 'token', token .. '.' .. n, 'worker', worker, 'started', int(now))
      redis.call('HDEL', job, 'cancel', 'finished', 'result')
      emit_json(q.events, max_events, id, now, ACTIVE_EVENT)
      taken[#taken + 1] = redis.call('HGETALL', job)
    end
  end
  if #taken == 0 then
    return 3, {}
  end
  if redis.call('ZCARD', q.wait) > 0 then
    redis.call('ZADD', q.marker, 0, '0')
  end
  return 1, taken
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
-- expire after the retention age. `set` and `drop` (optional) are more fields to write and to remove in the same
-- calls. A completed job's checkpoints are gone already (complete.lua deletes them).
local function finish(job_key, cp_key, log_key, ikeys_key, zset_key, id, state, now, keep_ms, set, drop)
  local fields = { 'state', state, 'finished', int(now) }
  for _, value in ipairs(set or {}) do
    fields[#fields + 1] = value
  end
  redis.call('HSET', job_key, unpack(fields))
  redis.call('HDEL', job_key, 'token', unpack(drop or {}))
  local ikey = redis.call('HGET', job_key, 'ikey')
  if ikey and ikey ~= '' and redis.call('HGET', ikeys_key, ikey) == id then
    redis.call('HDEL', ikeys_key, ikey)
  end
  redis.call('ZADD', zset_key, int(now), id)
  local ttl = math.max(1, keep_ms)
  redis.call('PEXPIRE', job_key, ttl)
  if state ~= 'completed' then
    redis.call('PEXPIRE', cp_key, ttl)
  end
  redis.call('PEXPIRE', log_key, ttl)
end

-- Counts one job in the per-minute zset (member: the minute, zero-padded so that text order is time order),
-- keeping the last hour, and lets the whole zset expire when nothing happens for two hours. The trim and the
-- expiry are renewed by the first job of each minute.
local function count_minute(metrics_key, now)
  local minute = math.floor(now / 60000)
  if tonumber(redis.call('ZINCRBY', metrics_key, 1, string.format('%012d', minute))) == 1 then
    redis.call('ZREMRANGEBYLEX', metrics_key, '-', '(' .. string.format('%012d', minute - 60))
    redis.call('PEXPIRE', metrics_key, 7200000)
  end
end

