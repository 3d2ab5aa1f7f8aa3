-- Reads (changes nothing) one page of a state's zset: ids with their scores, limit + 1 of them so that the
-- caller knows whether more follow. A cursor is the score and id of the last entry of the previous page.
-- KEYS: the zset. ARGV: reverse (1: highest score first), cursor score ('' for the start), cursor id, limit.
local zset, reverse, score, id, limit = KEYS[1], ARGV[1] == '1', ARGV[2], ARGV[3], tonumber(ARGV[4])
local start = 0
if score ~= '' then
  local rank
  if redis.call('ZSCORE', zset, id) == score then
    if reverse then
      rank = redis.call('ZREVRANK', zset, id)
    else
      rank = redis.call('ZRANK', zset, id)
    end
  end
  if rank then
    start = rank + 1
  elseif reverse then
    start = redis.call('ZCOUNT', zset, '(' .. score, '+inf')
  else
    start = redis.call('ZCOUNT', zset, '-inf', '(' .. score)
  end
end
if reverse then
  return redis.call('ZREVRANGE', zset, start, start + limit, 'WITHSCORES')
end
return redis.call('ZRANGE', zset, start, start + limit, 'WITHSCORES')
