"""Lua scripts for state transitions that must read and write a record atomically.

Every write that targets an existing record checks that the record still exists, so a
late worker never resurrects an expired or deleted record as a partial hash; and a
record in a terminal state is never moved again, so `cancelled` sticks.
"""

from __future__ import annotations

_TERMINAL = "st == 'succeeded' or st == 'failed' or st == 'cancelled'"

# KEYS: job, jobs zset, queued set, idem key, the owner's jobs zset
# ARGV: job id, created score, idem value ('' = none), idem ttl, max queued (0 = no limit),
#       '1' to index the job under its owner, field, value, ...
CREATE_JOB = """
if ARGV[3] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'idem', existing} end
end
local limit = tonumber(ARGV[5])
if limit > 0 and redis.call('SCARD', KEYS[3]) >= limit then return {'full', ''} end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1]) end
redis.call('SADD', KEYS[3], ARGV[1])
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4]) end
return {'ok', ''}
"""

# KEYS: job, queued set. ARGV: job id, now. Returns the new delivery count, 0 if gone or finished.
START_DELIVERY = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
"""

# KEYS: job, queued set. ARGV: job id, status, now, ttl, field, value, ... Returns 1 if finished now.
FINISH = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], unpack(ARGV, 5))
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: job, queued set. ARGV: job id, now, ttl.
REQUEST_CANCEL = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2], 'cancel_requested', '1')
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 'cancelled'
end
if {_TERMINAL} then return 'finished' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
return 'requested'
"""

# KEYS: hash. ARGV: field, value, ... Returns 1 if written, 0 if the hash does not exist.
HSET_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: hash. ARGV: field, by. Returns the new value, or false if the hash does not exist.
HINCR_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: idem key. ARGV: job id. Deletes the key only while it still names that job; returns 1 if it did.
RELEASE_IDEM = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['job_id'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: job, the shard's items list, the done set. ARGV: shard, ttl, items count, item, ...
# Stores one dataset shard's items once (a shard done twice keeps its first items, which are the
# same) and counts them on the record; returns how many shards are stored, -1 if the job is gone
# or over (a finished job's results no longer change).
STORE_SHARD_ITEMS = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local st = redis.call('HGET', KEYS[1], 'status')
if {_TERMINAL} then return -1 end
if redis.call('SADD', KEYS[3], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  if tonumber(ARGV[3]) > 0 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 4)) end
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'result_count', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'done', ARGV[3])
end
redis.call('EXPIRE', KEYS[3], ARGV[2])
return redis.call('SCARD', KEYS[3])
"""

# KEYS: job. ARGV: field, value, ... Records a dataset job's split once: a coordinator delivered
# again (or twice at once) must not reset the counts of shards already stored. 1 if written.
SPLIT_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'result_shards') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
