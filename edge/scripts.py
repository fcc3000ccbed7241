"""The Lua steps that keep the queue's invariants, each one atomic and one round trip.

Every script names its KEYS and ARGV in a header. The first line is a Redis 7 shebang: a script
without `allow-oom` is refused whole when Redis is past `maxmemory` (a script without a shebang
would be let through once it had written anything, so a full Redis could not stop it);
`allow-oom` marks the steps that must go on when Redis is full because they settle work already
accepted (answers, feeding queued jobs to workers) and free memory as they go.

Fair queueing. In front of each RQ queue (one task on one device kind) every device has its own
list of waiting job ids (`C.FAIR_PREFIX` + device id) and a ring (`C.RING_KEY`) holds the
devices that have any; `C.WAITING_KEY` counts them. RQ's own list holds at most `FEED_DEPTH`
jobs: whenever it is shorter, `feed` moves the first job of the next device in the ring onto it
and puts that device at the back of the ring. So a device's job waits behind the job(s) running,
the few on RQ's list and at most one job of each other waiting device, however many the others
sent. `C.QUOTA_KEY` (per task and device) holds every job of the device not answered yet.
"""

from __future__ import annotations

# feed(rq_key, ring_key, waiting_key, fair_prefix, depth): top RQ's list up from the ring.
_FEED_FN = """
local function feed(rq_key, ring_key, waiting_key, fair_prefix, depth)
  local moved = 0
  while redis.call('LLEN', rq_key) < depth do
    local dev = redis.call('LPOP', ring_key)
    if not dev then break end
    local fair = fair_prefix .. dev
    local jid = redis.call('LPOP', fair)
    if jid then
      redis.call('DECR', waiting_key)
      redis.call('RPUSH', rq_key, jid)
      moved = moved + 1
    end
    if redis.call('LLEN', fair) > 0 then redis.call('RPUSH', ring_key, dev) end
  end
  return moved
end
"""

# Store and route one job: RQ's unique enqueue (rq.scripts' UNIQUE_ENQUEUE_SCRIPT: refuse an
# existing job hash, write it, set its TTL, push its id) with the device's quota, the routing
# (the task's devices in order: the first with a live worker and room takes it), the payload
# blob, the reaper's index and the fair queue folded in.
ENQUEUE = "#!lua\n" + _FEED_FN + """
-- KEYS: 1 job hash, 2 blob, 3 unanswered index, 4 RQ's set of queues, 5 the device's quota
--       zset, then per candidate (nq of each, in the task's device order): RQ queue lists,
--       alive sets, rings, waiting counters
-- ARGV: 1 job id, 2 queue limit, 3 device limit, 4 blob TTL, 5 job TTL (-1: none),
--       6 alive window (s), 7 quota entries older than this (s) are stale, 8 feed depth,
--       9 device id, 10 nblob, blob field/values, per candidate: queue name, fair prefix;
--       then the job hash field/values; last: the share of maxmemory (percent) past which
--       new jobs are refused, leaving the rest to the work already accepted
-- Returns {code, count}: code = the chosen candidate (1-based), 0 a duplicate, -1 every live
-- queue is full, -2 no candidate has a live worker, -3 the device is at its quota, -4 Redis
-- is too full for new jobs; count = the device's jobs of this task not answered yet (for -4:
-- used memory in percent of maxmemory).
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local info = redis.call('INFO', 'memory')
local cap = tonumber(string.match(info, 'maxmemory:(%d+)'))
if cap and cap > 0 then
  local used = tonumber(string.match(info, 'used_memory:(%d+)'))
  if used * 100 >= cap * tonumber(ARGV[#ARGV]) then return {-4, math.floor(used * 100 / cap)} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local nq = (#KEYS - 5) / 4
local nblob = tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[7]))
local held = redis.call('ZCARD', KEYS[5])
if held >= tonumber(ARGV[3]) then return {-3, held} end
local live, chosen = 0, nil
for i = 1, nq do
  if redis.call('ZCOUNT', KEYS[5 + nq + i], now - tonumber(ARGV[6]), '+inf') > 0 then
    live = live + 1
    local depth = redis.call('LLEN', KEYS[5 + i])
      + tonumber(redis.call('GET', KEYS[5 + 3 * nq + i]) or '0')
    if depth < tonumber(ARGV[2]) then chosen = i break end
  end
end
if chosen == nil then
  if live > 0 then return {-1, held} end
  return {-2, held}
end
local qname = ARGV[10 + nblob + 2 * chosen - 1]
local fair = ARGV[10 + nblob + 2 * chosen] .. ARGV[9]
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 11, 10 + nblob))
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], 'NX', now, ARGV[1])
redis.call('ZADD', KEYS[5], now, ARGV[1])
redis.call('SADD', KEYS[4], KEYS[5 + chosen])
redis.call('HSET', KEYS[1], unpack(ARGV, 11 + nblob + 2 * nq, #ARGV - 1))
redis.call('HSET', KEYS[1], 'origin', qname)
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
local ring = KEYS[5 + 2 * nq + chosen]
if redis.call('RPUSH', fair, ARGV[1]) == 1 then redis.call('RPUSH', ring, ARGV[9]) end
redis.call('INCR', KEYS[5 + 3 * nq + chosen])
feed(KEYS[5 + chosen], ring, KEYS[5 + 3 * nq + chosen], ARGV[10 + nblob + 2 * chosen],
     tonumber(ARGV[8]))
return {chosen, held + 1}
"""

# Top an RQ queue's list up from its fair lists (workers call it as they take a job, and on
# every heartbeat, so nothing waits in a fair list while a worker idles).
FEED = "#!lua flags=allow-oom\n" + _FEED_FN + """
-- KEYS: RQ queue list, ring, waiting counter
-- ARGV: fair prefix, feed depth
-- Returns how many jobs moved.
return feed(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]))
"""

# Take every job waiting in a queue's fair lists (the reaper, when no worker serves the queue).
DRAIN = """#!lua flags=allow-oom
-- KEYS: ring, waiting counter
-- ARGV: fair prefix
-- Returns the job ids, in ring order.
local out = {}
local devs = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
for _, dev in ipairs(devs) do
  local fair = ARGV[1] .. dev
  for _, jid in ipairs(redis.call('LRANGE', fair, 0, -1)) do out[#out + 1] = jid end
  redis.call('DEL', fair)
end
redis.call('DECRBY', KEYS[2], #out)
if tonumber(redis.call('GET', KEYS[2]) or '0') <= 0 then redis.call('DEL', KEYS[2]) end
return out
"""

# The final answer of a job, once: append it to the outbox unless someone (a worker, the reaper
# of any agent) already did; release the device's quota; drop the blob. A job hash that no
# longer exists is answered without a mark (never recreate RQ's key).
ANSWER_ONCE = """#!lua flags=allow-oom
-- KEYS: 1 RQ job hash, 2 outbox stream, 3 unanswered index, 4 the device's quota zset,
--       5 (optional) blob
-- ARGV: 1 owner, 2 job id, 3 answered field, field, value, ... (the outbox entry)
-- Returns 1 when this call answered, 0 when the job was answered already.
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[1]) == 0 then return 0 end
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
if KEYS[5] then redis.call('DEL', KEYS[5]) end
return 1
"""

# An answer the agent gives itself (a refused job: bad request, busy...). Allowed when Redis is
# full: those answers are how devices learn that it is.
APPEND_ANSWER = """#!lua flags=allow-oom
-- KEYS: outbox stream
-- ARGV: field, value, ...
return redis.call('XADD', KEYS[1], '*', unpack(ARGV))
"""

# Read new outbox entries for a consumer, at most `count` and about `budget` bytes: one answer
# may carry up to MAX_ANSWER_BYTES of media, so a batch is bounded by size, not only by count.
READ_ANSWERS = """#!lua flags=allow-oom
-- KEYS: outbox stream
-- ARGV: group, consumer, max entries, byte budget
-- Returns the entries read ({id, {field, value, ...}} each): at least one when any is new.
local out, bytes = {}, 0
for i = 1, tonumber(ARGV[3]) do
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1],
                       '>')
  if not r then break end
  local entry = r[1][2][1]
  out[#out + 1] = entry
  for _, v in ipairs(entry[2]) do bytes = bytes + #v end
  if bytes >= tonumber(ARGV[4]) then break end
end
return out
"""

# A worker's beat (edge/alive.py). Allowed when Redis is full: a beat rewrites entries that
# already exist, and a gateway whose Redis is full must not believe all its workers dead.
BEAT = """#!lua flags=allow-oom
-- KEYS: 1 the worker's document, 2.. the alive set of each queue it serves
-- ARGV: 1 worker name, 2 document (JSON), 3 document TTL (s), 4 prune members older than (s)
-- Returns Redis' TIME {seconds, microseconds}: the stamp of this beat.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - tonumber(ARGV[4]))
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return t
"""

# A reaper pass's stamp (edge/alive.py).
WATCH = """#!lua flags=allow-oom
-- KEYS: 1 the reaper's watch stamp
-- Returns {seconds, microseconds, previous stamp or nil}: Redis' TIME, and when a reaper last
-- looked (the stamp becomes now).
local t = redis.call('TIME')
local prev = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
return {t[1], t[2], prev}
"""

# Take up to n more waiting jobs of a queue for a batch (workers/batching.py): first what is on
# RQ's list (already chosen fairly), then one job per device in ring order, round and round, the
# head job's device passing its first turn, so a batch holds one job of every waiting device
# before a second of any; then top RQ's list up (this replaces the feed of the job's start).
# The ids leave every list here; the worker marks them started right after (a worker that dies
# in between leaves them queued in no list: the reaper's lost-job scan pushes them back).
TAKE = "#!lua flags=allow-oom\n" + _FEED_FN + """
-- KEYS: RQ queue list, ring, waiting counter, then for each other queue of the worker: its
--       RQ list and its waiting counter
-- ARGV: fair prefix, how many at most, feed depth, the head job's device id, RQ's job key
--       prefix, how many at most while another queue of the worker has work (its priority
--       burst left: jobs of one queue in a row)
-- Returns {ids, hashes}: the job ids taken, in order, and each one's job hash (HGETALL), so
-- that the worker can start them in its next round trip.
local out = {}
local n = tonumber(ARGV[2])
local skip = ARGV[4]
for i = 4, #KEYS, 2 do
  if redis.call('LLEN', KEYS[i]) > 0 or tonumber(redis.call('GET', KEYS[i + 1]) or '0') > 0 then
    n = math.min(n, tonumber(ARGV[6]))
    break
  end
end
while #out < n do
  local jid = redis.call('LPOP', KEYS[1])
  if not jid then break end
  out[#out + 1] = jid
end
while #out < n do
  local dev = redis.call('LPOP', KEYS[2])
  if not dev then break end
  if dev == skip then
    skip = nil
    redis.call('RPUSH', KEYS[2], dev)
  else
    local fair = ARGV[1] .. dev
    local jid = redis.call('LPOP', fair)
    if jid then
      redis.call('DECR', KEYS[3])
      out[#out + 1] = jid
    end
    if redis.call('LLEN', fair) > 0 then redis.call('RPUSH', KEYS[2], dev) end
  end
end
feed(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[3]))
local hashes = {}
for i, jid in ipairs(out) do hashes[i] = redis.call('HGETALL', ARGV[5] .. jid) end
return {out, hashes}
"""
