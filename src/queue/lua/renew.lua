-- Extends the leases of one worker's jobs, all in one call.
-- KEYS: active, then one job hash per lease. ARGV: lease_ms, count, then per lease: id, token.
-- Returns per lease: 1 held, 2 held and a cancel was asked, or the negative fencing code (lost).
local active = KEYS[1]
local lease, count = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 1, count do
  local id, token = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local job = KEYS[1 + i]
  local held = check_lease(job, active, id, token, now)
  if held == 1 then
    redis.call('ZADD', active, 'XX', int(now + lease), id)
    if redis.call('HGET', job, 'cancel') == '1' then
      held = 2
    end
  end
  out[i] = held
end
return out
