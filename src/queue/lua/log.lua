-- Appends a line to a job's log, keeping the last max_lines; nothing for a job that is gone. The log expires
-- with the job. KEYS: job, log, trash. ARGV: id, line, max_lines. Returns 1, or 0 when the job is gone.
local job, log, trash = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', job) == 0 or redis.call('SISMEMBER', trash, ARGV[1]) == 1 then
  return 0
end
local now = now_ms()
redis.call('RPUSH', log, int(now) .. ' ' .. ARGV[2])
redis.call('LTRIM', log, -tonumber(ARGV[3]), -1)
local ttl = redis.call('PTTL', job)
if ttl > 0 then
  redis.call('PEXPIRE', log, ttl)
end
return 1
