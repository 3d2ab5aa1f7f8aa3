-- Reads (changes nothing) jobs by id. KEYS: delayed, trash, then one job hash per id. ARGV: the ids.
-- Returns per id: {} when gone, else {state, fields} with waiting and delayed told apart.
local delayed, trash = KEYS[1], KEYS[2]
local out = {}
for i = 1, #ARGV do
  local id = ARGV[i]
  local fields = redis.call('HGETALL', KEYS[2 + i])
  if #fields == 0 or redis.call('SISMEMBER', trash, id) == 1 then
    out[i] = {}
  else
    local state = redis.call('HGET', KEYS[2 + i], 'state')
    if state == 'queued' then
      if redis.call('ZSCORE', delayed, id) then
        state = 'delayed'
      else
        state = 'waiting'
      end
    end
    out[i] = { state, fields }
  end
end
return out
