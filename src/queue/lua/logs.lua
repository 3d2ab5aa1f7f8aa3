-- Reads (changes nothing) a job's log. KEYS: job, log, trash. ARGV: id.
-- Returns {} when the job is gone, else {lines}.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  return {}
end
return { redis.call('LRANGE', KEYS[2], 0, -1) }
