-- Reads (changes nothing): jobs of a final-state zset that ended at least older_ms ago on the server's clock.
-- KEYS: the zset. ARGV: older_ms, limit. Returns {cutoff, ids}.
local cutoff = now_ms() - tonumber(ARGV[1])
return { cutoff, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(cutoff), 'LIMIT', 0, tonumber(ARGV[2])) }
