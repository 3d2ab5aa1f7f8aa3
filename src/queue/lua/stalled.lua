-- Reads (changes nothing): active jobs whose lease deadline has passed on the server's clock.
-- KEYS: active. ARGV: limit. Returns their ids, oldest deadline first.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now_ms()), 'LIMIT', 0, tonumber(ARGV[1]))
