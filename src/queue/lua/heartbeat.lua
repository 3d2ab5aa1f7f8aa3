-- Records a worker's heartbeat and forgets workers silent for longer than stale_ms.
-- KEYS: workers (zset id -> last beat), worker info (hash id -> JSON). ARGV: id, info JSON, stale_ms.
local workers, info = KEYS[1], KEYS[2]
local now = now_ms()
redis.call('ZADD', workers, int(now), ARGV[1])
redis.call('HSET', info, ARGV[1], ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', workers, '-inf', '(' .. int(now - tonumber(ARGV[3])), 'LIMIT', 0, 100)
for _, id in ipairs(gone) do
  redis.call('ZREM', workers, id)
  redis.call('HDEL', info, id)
end
return now
