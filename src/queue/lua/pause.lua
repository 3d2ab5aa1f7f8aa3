-- Pauses or resumes handing out jobs; resuming wakes the blocked workers.
-- KEYS: meta, marker. ARGV: 1 to pause, 0 to resume.
redis.call('HSET', KEYS[1], 'paused', ARGV[1])
if ARGV[1] == '0' then
  redis.call('ZADD', KEYS[2], 0, '0')
end
return 1
