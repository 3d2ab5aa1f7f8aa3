-- Deletes jobs for good, each re-checked here: members of `trash` (over the count retention), or, when a
-- cutoff is given, members of a final-state zset that ended before it (clean).
-- KEYS: trash, the state zset, then per job: job, checkpoints, log. ARGV: cutoff (-1: trash only), count, ids.
-- Returns how many it deleted.
local trash, zset = KEYS[1], KEYS[2]
local cutoff, count = tonumber(ARGV[1]), tonumber(ARGV[2])
local removed = 0
for i = 1, count do
  local id = ARGV[2 + i]
  local job, cp, log = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local go = false
  if redis.call('SREM', trash, id) == 1 then
    go = true
  elseif cutoff >= 0 then
    local ended = redis.call('ZSCORE', zset, id)
    if ended and tonumber(ended) <= cutoff then
      redis.call('ZREM', zset, id)
      go = true
    end
  end
  if go then
    redis.call('DEL', job, cp, log)
    removed = removed + 1
  end
end
return removed
