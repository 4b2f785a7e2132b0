"""The Redis operations on jobs: push (now, at a time, many at once).

Every function takes a client and a ``Keys`` and does one round trip. The
worker side (fetch, ack, retry, dead, scheduler moves, backup recovery) joins
this module with the runtime.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from . import scripts
from .config import Config
from .connection import text
from .job import InvalidJob, decode, encode, new_jid, now_seconds
from .keys import Keys
from .retry import dead_payload


@dataclass(frozen=True, slots=True)
class Conflict:
    """An enqueue refused because a unique lock is held by ``existing_jid``."""

    existing_jid: str


EnqueueResult = str | Conflict
"""The jid of the enqueued job, or the ``Conflict`` that stopped it."""


@dataclass(frozen=True, slots=True)
class Push:
    """One job ready to be written: its bytes and where they go."""

    queue: str
    payload: bytes
    jid: str
    score: float | None = None
    """Run time in float seconds for a scheduled job, None for now."""
    lock_token: str | None = None
    unlocks_in_ms: int | None = None


def _lock_args(keys: Keys, push: Push) -> tuple[list[str], str | int]:
    if push.lock_token is None or push.unlocks_in_ms is None or push.unlocks_in_ms <= 0:
        # No lock, or one that would already have expired: nothing to hold.
        return [], ""
    return [keys.unique(push.lock_token)], push.unlocks_in_ms


def _result(reply: object, jid: str) -> EnqueueResult:
    if isinstance(reply, list):
        existing = reply[1]
        return Conflict(existing.decode() if isinstance(existing, bytes) else str(existing))
    return jid


def push(client: redis.Redis, keys: Keys, job: Push) -> EnqueueResult:
    """Enqueue one job now or at ``job.score`` (Exq's enqueue / enqueue_at scripts)."""
    lock, unlocks_in = _lock_args(keys, job)
    if job.score is None:
        reply = scripts.enqueue(
            client,
            [keys.queues, keys.queue(job.queue), *lock],
            [job.queue, job.payload, job.jid, unlocks_in],
        )
    else:
        reply = scripts.enqueue_at(
            client, [keys.schedule, *lock], [job.payload, repr(job.score), job.jid, unlocks_in]
        )
    return _result(reply, job.jid)


def push_all(client: redis.Redis, keys: Keys, jobs: Sequence[Push]) -> list[EnqueueResult]:
    """Enqueue many jobs, immediate and scheduled mixed, in one round trip."""
    if not jobs:
        return []
    job_keys: list[str] = [keys.schedule, keys.queues]
    args: list[str | bytes | int] = []
    for job in jobs:
        lock, unlocks_in = _lock_args(keys, job)
        job_keys += [lock[0] if lock else "", keys.queue(job.queue)]
        score = "0" if job.score is None else repr(job.score)
        args += [job.jid, job.queue, score, job.payload, unlocks_in]
    replies = scripts.enqueue_all(client, job_keys, args)
    return [_result(r if r[0] == 1 else 0, job.jid) for r, job in zip(replies, jobs, strict=True)]


RECOVERY_BATCH = 100
"""Jobs moved per script call when re-enqueueing a backup list."""


RECOVERY_TTL = 7 * 24 * 3600
"""Seconds a job's recovery count and suspect mark are kept."""


def job_digest(raw: bytes) -> str:
    """The SHA1 hex digest naming a job's recovery marks (as Lua's redis.sha1hex)."""
    return hashlib.sha1(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """How recoveries are counted (``max_recoveries`` 0 = never dead-letter), and the
    dead-set limits a poison job is buried under."""

    max_recoveries: int = 3
    counter_ttl: int = RECOVERY_TTL
    dead_max_jobs: int = 10000
    dead_timeout_s: int = 15552000

    @classmethod
    def of(cls, config: Config) -> RecoveryPolicy:
        """The policy a node's configuration asks for."""
        return cls(config.max_recoveries, dead_max_jobs=config.dead_max_jobs,
                   dead_timeout_s=config.dead_timeout_in_seconds)

    @property
    def quarantine_at(self) -> int:
        """A suspect with this many counted recoveries runs alone: one more crash buries it."""
        return max(self.max_recoveries - 1, 1) if self.max_recoveries else 1 << 30

    def args(self, keys: Keys) -> list[str | int | float]:
        """The recovery scripts' arguments ``max, prefix, ttl, poison_list, now``."""
        return [self.max_recoveries, keys.prefix, self.counter_ttl, keys.poison, time.time()]

    @staticmethod
    def started_commands(keys: Keys, raw: bytes) -> list[tuple[str, ...]]:
        """What a suspect job's ack clears: it is a suspect no more."""
        digest = job_digest(raw)
        return [("ZREM", keys.suspects, digest),
                ("DEL", keys.started(digest), keys.recoveries(digest))]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A queue's fetched jobs (oldest first), and which of them were recovered before.

    ``suspects``: positions of jobs recovered from a backup before (their
    start is marked in Redis, see ``RecoveryPolicy``); ``quarantined``: the
    suspects one counted crash from the dead set, to be run one at a time.
    """

    jobs: list[bytes]
    suspects: frozenset[int] = frozenset()
    quarantined: frozenset[int] = frozenset()


def fetch(client: redis.Redis, keys: Keys, node_id: str, wanted: Sequence[tuple[str, int]],
          policy: RecoveryPolicy | None = None) -> list[Fetched]:
    """Move up to ``n`` jobs of each ``(queue, n)`` into this node's backup lists.

    One round trip for every queue. Returns each queue's jobs in the order of
    ``wanted``. The bytes are kept exactly as fetched: the ack removes those
    bytes from the backup list.
    """
    job_keys: list[str] = [keys.suspects]
    args: list[str | int] = [keys.prefix, (policy or RecoveryPolicy()).quarantine_at]
    for queue, count in wanted:
        job_keys += [keys.queue(queue), keys.backup(node_id, queue)]
        args.append(min(count, scripts.FETCH_BATCH_LIMIT))
    return [Fetched(jobs, _positions(suspects), _positions(quarantined))
            for jobs, suspects, quarantined in scripts.fetch(client, job_keys, args)]


def _positions(lua_indexes: Sequence[int]) -> frozenset[int]:
    return frozenset(int(n) - 1 for n in lua_indexes)


def recover_backup(client: redis.Redis, keys: Keys, node_id: str, queue: str,
                   policy: RecoveryPolicy = RecoveryPolicy()) -> tuple[int, int]:
    """Move ``node_id``'s backup of ``queue`` back to the front of the queue.

    Order is kept: the oldest fetched job is popped first again (Exq 0.15+).
    A job recovered ``policy.max_recoveries`` times goes to the poison list
    instead (see ``bury_poison``). Returns ``(moved, poisoned)``.
    """
    return _drain(lambda: scripts.mlpop_rpush(
        client, [keys.backup(node_id, queue), keys.queue(queue)],
        [RECOVERY_BATCH, *policy.args(keys)],
    ))


def recover_dead_node_backup(client: redis.Redis, keys: Keys, dead_node: str, queue: str,
                             expected_score: str | float,
                             policy: RecoveryPolicy = RecoveryPolicy()) -> tuple[int, int]:
    """Re-enqueue a dead node's backup of ``queue``, only while its heartbeat is unchanged.

    The heartbeat score check (inside the script) keeps a node that came back,
    or that another monitor already handled, from losing its jobs. Returns
    ``(moved, poisoned)`` as ``recover_backup``.
    """
    return _drain(lambda: scripts.heartbeat_re_enqueue_backup(
        client,
        [keys.backup(dead_node, queue), keys.queue(queue), keys.heartbeats],
        [dead_node, expected_score, RECOVERY_BATCH, *policy.args(keys)],
    ))


def backup_queues(client: redis.Redis, keys: Keys, node_id: str) -> set[str]:
    """The queues ``node_id`` holds a backup list of (a SCAN of its backup keys)."""
    names = (keys.backup_queue(node_id, text(key))
             for key in client.scan_iter(match=keys.backup_pattern(node_id), count=1000))
    return {name for name in names if name}


def requeue_backup(client: redis.Redis, keys: Keys, node_id: str, queue: str) -> int:
    """Put this node's unfinished jobs of ``queue`` back at the front, at a stop.

    Unlike ``recover_backup`` nothing is counted: a job interrupted by a
    graceful stop never moves towards the poison limit. Returns how many moved.
    """
    return recover_backup(client, keys, node_id, queue, RecoveryPolicy(max_recoveries=0))[0]


def recover_registered_backup(client: redis.Redis, keys: Keys, dead_node: str, queue: str,
                              entry: bytes, policy: RecoveryPolicy) -> tuple[int, int]:
    """Re-enqueue a dead node's backup of ``queue``, only while its registry entry is
    ``entry`` (a process that claimed the id since keeps its jobs); as ``recover_backup``."""
    return _drain(lambda: scripts.registered_re_enqueue_backup(
        client,
        [keys.backup(dead_node, queue), keys.queue(queue), keys.nodes],
        [dead_node, entry, RECOVERY_BATCH, *policy.args(keys)],
    ))


def _drain(move_batch: Callable[[], Sequence[int]]) -> tuple[int, int]:
    """Call a recovery script until the backup list is empty (or it moves nothing)."""
    moved = poisoned = 0
    while True:
        remaining, count, bad = (int(n) for n in move_batch())
        moved, poisoned = moved + count, poisoned + bad
        if remaining == 0 or count + bad == 0:
            return moved, poisoned


POISON_CLASS = "JobCrashedWorker"
"""``error_class`` of a job moved to the dead set by ``bury_poison``."""


def bury_poison(client: redis.Redis, keys: Keys, policy: RecoveryPolicy) -> int:
    """Move every job of the poison list to the dead set, with the reason. Returns how many.

    Safe with several callers at once: each job is written to the dead set by
    the one caller whose LREM removed it from the poison list.
    """
    buried = 0
    for raw in client.lrange(keys.poison, 0, -1):
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
        payload = _poison_payload(data, policy.max_recoveries)
        at = now_seconds()
        buried += int(scripts.bury(client, [keys.poison, keys.dead], [
            data, payload, repr(at), repr(at - policy.dead_timeout_s), policy.dead_max_jobs]))
    return buried


def _poison_payload(raw: bytes, times: int) -> bytes:
    message = (f"the job was in flight on a worker process that died {times} times; "
               "it is probably killing its process (poison job)")
    try:
        return dead_payload(decode(raw), POISON_CLASS, message)
    except InvalidJob as exc:
        return encode({"args": [raw.decode("utf-8", "replace")], "class": "ExqFast.InvalidPayload",
                       "error_class": POISON_CLASS, "error_message": f"{message}; {exc.reason}",
                       "jid": new_jid(), "queue": None, "retry": 0, "retry_count": 0})


def move_due(client: redis.Redis, keys: Keys, zset: str, now: float, page_size: int,
             fallback_queue: str = "default") -> int:
    """Move the members of ``zset`` due by ``now`` into their queues, a page per call.

    Safe with several processes at once: a member is pushed only by the
    caller whose ZREM removed it. Returns the number of members moved.
    """
    moved = 0
    while True:
        seen, count = scripts.scheduler_dequeue(
            client, [zset], [page_size, repr(now), keys.prefix, fallback_queue]
        )
        moved += int(count)
        if int(seen) < page_size:
            return moved


def unlock(client: redis.Redis, keys: Keys, token: str, jid: str) -> bool:
    """Release a unique lock if ``jid`` still holds it (compare-and-delete)."""
    return bool(scripts.compare_and_delete(client, [keys.unique(token)], [jid]))
