"""The Lua scripts exq-fast runs, each called by EVALSHA with an EVAL fallback.

One script per operation, and each piece of Lua written once: the pieces
several scripts share (``_HELD_BY``, the unique lock; ``_MOVE_MEMBER``;
``_MOVE_FRONT``) are prepended to them. The scripts follow Exq's
(docs/wire-format.md §10) where Exq has one, so the keys touched and the
bytes written are the same; ``fetch`` is exq-fast's own: it moves up to N jobs
of every queue into this node's backup lists in one round trip. Redis runs
each script atomically; the comment above each one states its keys,
arguments, reply and what it guards.

``load_all`` registers every script once at start; ``Script.__call__`` falls
back to EVAL when Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH),
which also puts the script back in Redis's cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis
import redis.cluster

# Take a job's unique lock, shared by the three enqueue scripts: SET key jid PX ms NX
# when a lock is asked for (a key, and ms a number). Returns the jid holding the
# lock when it is taken already, else false.
_HELD_BY = """
local function held_by(key, jid, unlocks_in)
  if key and unlocks_in then
    if not redis.call('SET', key, jid, 'PX', unlocks_in, 'NX') then
      return redis.call('GET', key)
    end
  end
  return false
end
"""

# Exq's enqueue (now): KEYS [queues, queue, lock?], ARGV [queue, json, jid, lock ms or ''].
# The lock, then SADD queues + LPUSH, atomically: a job whose lock is held is not
# written. Returns 0, or {1, holder jid}.
ENQUEUE = _HELD_BY + """
local holder = held_by(KEYS[3], ARGV[3], tonumber(ARGV[4]))
if holder then return {1, holder} end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
return 0
"""

# Exq's enqueue_at: KEYS [schedule, lock?], ARGV [json, score, jid, lock ms or ''].
# The lock, then ZADD schedule, atomically; returns as ENQUEUE.
ENQUEUE_AT = _HELD_BY + """
local holder = held_by(KEYS[2], ARGV[3], tonumber(ARGV[4]))
if holder then return {1, holder} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 0
"""

# Exq's enqueue_all: KEYS [schedule, queues, then per job: its queue, and its lock
# key only when it has one], ARGV per job [jid, queue, score or "0" for now, json,
# lock ms or '' (no lock: no key)]. Every KEYS entry is a real key of the
# namespace, so an ACL user limited to it may run this.
# Per job, as ENQUEUE (score "0") or ENQUEUE_AT, all in one atomic call; a job
# whose lock is held is not written and does not undo the others. Returns per
# job {0, jid} or {1, holder jid}.
ENQUEUE_ALL = _HELD_BY + """
local out, k = {}, 3
for i = 0, (#ARGV / 5) - 1 do
  local jid, queue, score, job = ARGV[i*5+1], ARGV[i*5+2], ARGV[i*5+3], ARGV[i*5+4]
  local unlocks_in = tonumber(ARGV[i*5+5])
  local queue_key, lock = KEYS[k], false
  k = k + 1
  if unlocks_in then
    lock = KEYS[k]
    k = k + 1
  end
  local holder = held_by(lock, jid, unlocks_in)
  if holder then
    out[i+1] = {1, holder}
  else
    if score == '0' then
      redis.call('SADD', KEYS[2], queue)
      redis.call('LPUSH', queue_key, job)
    else
      redis.call('ZADD', KEYS[1], score, job)
    end
    out[i+1] = {0, jid}
  end
end
return out
"""

# Release a unique lock: KEYS [lock], ARGV [jid]; DEL only while it holds jid.
COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Move given members of a zset to the front of their queues: KEYS [zset, queues,
# then the queue keys], ARGV per member [queue name, position of its queue key in
# KEYS, member]. A member is moved only if this call's ZREM removed it, so
# concurrent movers (schedulers, the admin's requeue) push each member once. The
# caller read each member's queue from its JSON (the fallback queue for one that
# is not JSON), so every key the script touches is in KEYS. Returns how many moved.
MOVE_MEMBERS = """
local moved = 0
for i = 1, #ARGV, 3 do
  if redis.call('ZREM', KEYS[1], ARGV[i + 2]) == 1 then
    redis.call('SADD', KEYS[2], ARGV[i])
    redis.call('LPUSH', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2])
    moved = moved + 1
  end
end
return moved
"""

# LPOP from KEYS[1], RPUSH to KEYS[2], up to `limit` jobs: the moved jobs keep
# their order and are popped next (front of the queue).
#
# Poison jobs (`max` > 0): each recovery of a job may count against it (a field
# per job digest of the `recoveries` hash); at `max` the job goes to the `poison`
# list, from which the caller moves it to the dead set with a reason. A job's
# first recovery always counts (nothing tells whether it had started). It then
# becomes a suspect (zset `suspects`, digest -> time of its last recovery): the
# fetch flags it, the worker marks it started (`started` hash) just before
# running it, and a later recovery counts only if that mark is there -- so jobs
# that merely waited beside a job that kills its process at once are not buried
# with it. A suspect not recovered again within `ttl` seconds is forgotten with
# its mark and its count.
# `move_front(a, k)` reads limit, max, ttl, now from ARGV[a..a+3] and the keys
# suspects, started, recoveries, poison from KEYS[k..k+3]: every key it touches
# is in KEYS.
_MOVE_FRONT = """
local function move_front(a, k)
  local limit, max, ttl, now = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2]),
    tonumber(ARGV[a+3])
  local suspects, started, recoveries, poison = KEYS[k], KEYS[k+1], KEYS[k+2], KEYS[k+3]
  local moved, poisoned = 0, 0
  if max > 0 then
    for _, digest in ipairs(redis.call('ZRANGEBYSCORE', suspects, '-inf', now - ttl)) do
      redis.call('HDEL', started, digest)
      redis.call('HDEL', recoveries, digest)
    end
    redis.call('ZREMRANGEBYSCORE', suspects, '-inf', now - ttl)
  end
  for i = 1, limit do
    local job = redis.call('LPOP', KEYS[1])
    if not job then break end
    local bury = false
    if max > 0 then
      local digest = redis.sha1hex(job)
      local seen = redis.call('ZSCORE', suspects, digest)
      if (not seen) or redis.call('HDEL', started, digest) == 1 then
        bury = redis.call('HINCRBY', recoveries, digest, 1) >= max
      end
      redis.call('ZADD', suspects, now, digest)
    end
    if bury then
      redis.call('RPUSH', poison, job)
      poisoned = poisoned + 1
    else
      redis.call('RPUSH', KEYS[2], job)
      moved = moved + 1
    end
  end
  return {redis.call('LLEN', KEYS[1]), moved, poisoned}
end
"""

# KEYS [backup, queue, suspects, started, recoveries, poison], ARGV [limit, max, ttl, now]
MLPOP_RPUSH = _MOVE_FRONT + "return move_front(1, 3)"

# KEYS [backup, queue, heartbeats, suspects, started, recoveries, poison],
# ARGV [node, expected_score, limit, max, ttl, now]: moves only while the node's
# heartbeat is expected_score.
HEARTBEAT_RE_ENQUEUE_BACKUP = _MOVE_FRONT + """
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return {0, 0, 0}
end
return move_front(3, 4)
"""

# KEYS [backup, queue, nodes, suspects, started, recoveries, poison],
# ARGV [node, expected_entry, limit, max, ttl, now]: moves only while the node's
# registry entry is expected_entry, so a process that claimed the id again (a
# restart) keeps what it fetches.
REGISTERED_RE_ENQUEUE_BACKUP = _MOVE_FRONT + """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return {0, 0, 0}
end
return move_front(3, 4)
"""

# Claim a node id: KEYS [nodes], ARGV [node, expected ('' = no entry), entry].
# Replaces the entry only if it is still the one the caller judged stale.
CLAIM_NODE = """
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# Refresh a node's registry entry at a ping: KEYS [nodes], ARGV [node, entry].
# Written when absent or still ours; 0 when another process claimed the id since
# (this one was taken for dead while cut off): it must not overwrite that claim.
REFRESH_NODE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Forget a node: KEYS [nodes, heartbeats, processes, sidekiq processes, then keys
# to delete], ARGV [node, entry]; only while its registry entry is ``entry``
# (this process's own at a stop, or the dead node's as judged by a monitor).
RELEASE_NODE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

# Move one job from the poison list to the dead set, once: only the caller
# whose LREM removed it writes the dead entry.
# KEYS [poison, dead], ARGV [raw, payload, now, cutoff, max_jobs]
BURY = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[5]) - 1)
return 1
"""

# The admin's kill: move the given members of a zset (KEYS[1], the retry or
# schedule set) to the dead set (KEYS[2]) byte for byte, scored `now`, then trim
# the dead set by age and size as a job's death does. Only the caller whose ZREM
# removed a member writes its dead entry. ARGV [now, cutoff, max_jobs, raw...]
KILL = """
local moved = 0
for i = 4, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[1], ARGV[i])
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[3]) - 1)
end
return moved
"""

# exq-fast's batched fetch: KEYS are the suspects zset, the recoveries hash, then
# (queue, backup) pairs; ARGV = [quarantine_at, then the number of jobs to take
# from each queue]. RPOP with a count takes the oldest first and LPUSH of the batch
# leaves the backup list as N single RPOPLPUSHes would. Each queue's reply is
# {jobs, positions of the suspects, positions of the quarantined} (suspects:
# recovered before; quarantined: their recovery count reached quarantine_at,
# one counted crash from the dead set). Suspects are looked for only while
# there are any, so the common case costs one ZCARD per call.
FETCH = """
local out = {}
local look = redis.call('ZCARD', KEYS[1]) > 0
local quarantine_at = tonumber(ARGV[1])
for i = 2, #ARGV do
  local q = i - 1
  local n = tonumber(ARGV[i])
  local jobs = false
  if n > 0 then jobs = redis.call('RPOP', KEYS[2*q+1], n) end
  local suspects, quarantined = {}, {}
  if jobs then
    redis.call('LPUSH', KEYS[2*q+2], unpack(jobs))
    if look then
      for j, job in ipairs(jobs) do
        local digest = redis.sha1hex(job)
        if redis.call('ZSCORE', KEYS[1], digest) then
          table.insert(suspects, j)
          local count = tonumber(redis.call('HGET', KEYS[2], digest) or '0')
          if count >= quarantine_at then table.insert(quarantined, j) end
        end
      end
    end
  else
    jobs = {}
  end
  out[q] = {jobs, suspects, quarantined}
end
return out
"""

# exq-fast's stats batch: every ack, retry/dead write, in-progress record and
# stat increment of a batch, applied atomically and at most once. KEYS[1] holds
# the id of the last batch applied for this node: a batch retried after a lost
# reply is recognised and skipped, so counts converge exactly after an outage.
# KEYS[2..] are every key the commands touch (each command names exactly one, its
# first argument: a Redis Cluster sees every key the script reaches).
# ARGV = [batch_id, n, cmd, key index, arg..., n, cmd, key index, arg..., ...]
# (n counts cmd, the key index and the args); the command ACK key raw... (not a
# Redis command) runs LREM key -1 raw for each raw: the acks of one backup list
# in one command.
# A transient error (OOM at maxmemory, READONLY after a failover, LOADING...)
# aborts the batch: a job's ack must not land when its retry/dead write did
# not. What ran before the abort stays applied, and the whole batch is sent
# again: that is safe because each job's writes are idempotent (ZADD of the
# same member and score, LREM, HSET, HDEL), every job's writes come before any
# ack, and the counters come last. Any other error (WRONGTYPE on a key a user broke) skips that one
# command and is counted in the reply, so it cannot block every later ack.
APPLY_BATCH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return -1 end
local transient = {OOM = true, READONLY = true, LOADING = true, MASTERDOWN = true,
                   NOREPLICAS = true, BUSY = true, TRYAGAIN = true}
local i, failed = 2, 0
local function check(reply)
  if type(reply) == 'table' and reply.err then
    if transient[string.match(reply.err, '^(%u+)')] then return reply end
    failed = failed + 1
  end
end
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local command, key = ARGV[i + 1], KEYS[tonumber(ARGV[i + 2])]
  if command == 'ACK' then
    for j = i + 3, i + n do
      local abort = check(redis.pcall('LREM', key, -1, ARGV[j]))
      if abort then return abort end
    end
  else
    local abort = check(redis.pcall(command, key, unpack(ARGV, i + 3, i + n)))
    if abort then return abort end
  end
  i = i + n + 1
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', 3600)
return failed
"""

FETCH_BATCH_LIMIT = 1000
"""Most jobs ``FETCH`` takes from one queue in one call (bounded by Lua's unpack)."""


class ScriptKeys:
    """The KEYS of one script call, each key once; a command names a key by its
    1-based position (``position``), as ``apply_batch`` and ``move_members`` do."""

    __slots__ = ("_positions", "keys")

    def __init__(self, *keys: str) -> None:
        self.keys: list[str] = []
        self._positions: dict[str, int] = {}
        for key in keys:
            self.position(key)

    def position(self, key: str) -> int:
        """``key``'s position in KEYS, added at the end the first time."""
        found = self._positions.get(key)
        if found is None:
            self.keys.append(key)
            found = self._positions[key] = len(self.keys)
        return found


class Script:
    """One Lua script, identified by the SHA1 of its source."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run on ``client`` (not a pipeline): EVALSHA, or EVAL on NOSCRIPT."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


enqueue = Script(ENQUEUE)
enqueue_at = Script(ENQUEUE_AT)
enqueue_all = Script(ENQUEUE_ALL)
compare_and_delete = Script(COMPARE_AND_DELETE)
move_members = Script(MOVE_MEMBERS)
mlpop_rpush = Script(MLPOP_RPUSH)
heartbeat_re_enqueue_backup = Script(HEARTBEAT_RE_ENQUEUE_BACKUP)
registered_re_enqueue_backup = Script(REGISTERED_RE_ENQUEUE_BACKUP)
claim_node = Script(CLAIM_NODE)
release_node = Script(RELEASE_NODE)
fetch = Script(FETCH)
apply_batch = Script(APPLY_BATCH)
bury = Script(BURY)
kill = Script(KILL)

ALL = (
    enqueue,
    enqueue_at,
    enqueue_all,
    compare_and_delete,
    move_members,
    mlpop_rpush,
    heartbeat_re_enqueue_backup,
    registered_re_enqueue_backup,
    claim_node,
    release_node,
    fetch,
    apply_batch,
    bury,
    kill,
)


def load_all(client: redis.Redis) -> None:
    """Register every script with SCRIPT LOAD (once per process start)."""
    if isinstance(client, redis.cluster.RedisCluster):
        for script in ALL:  # a cluster client sends each to every master; no pipeline
            client.script_load(script.source)
        return
    pipe = client.pipeline(transaction=False)
    for script in ALL:
        pipe.script_load(script.source)
    pipe.execute()
