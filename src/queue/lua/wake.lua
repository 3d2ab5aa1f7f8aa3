-- Puts back a wake-up that a process took but no longer needs, for another process's idle workers.
-- KEYS: marker, meta.
wake(KEYS[1], KEYS[2])
return 1
