-- A sliding-window rate limit shared by every worker process: at most ARGV[2] request starts in any
-- ARGV[1] milliseconds, counted on the Redis server's clock so that machines need not agree on the time.
-- KEYS[1]: a sorted set of start times (ms). ARGV[3]: a unique member for this start.
-- Returns 0 when the caller may start now (the start is recorded), else the milliseconds to wait.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now_ms)
