"""Recovery: put backup lists back into their queues, and bury poison jobs.

A node's backup lists hold the jobs it fetched and has not acked. They go back
to the front of their queues, order kept, at a start (``recover_backup``,
counted), at a graceful stop (``requeue_backup``, not counted), or for a dead
node (``recover_dead_node_backup``, ``recover_registered_backup``, guarded by
the node's heartbeat or registry entry). ``RecoveryPolicy`` counts how often a
job was recovered; one recovered too often goes to the poison list, and
``bury_poison`` moves it to the dead set with its reason.

Contract: the recovery functions loop, one round trip per page of
``RECOVERY_BATCH`` jobs, each page atomic (a crash between pages leaves each
job in exactly one list: the backup, its queue or the poison list), until the
backup list is empty; a guarded recovery stops at the first page whose guard
fails. ``backup_queues`` is a SCAN (several round trips, nothing atomic).
``bury_poison`` reads the poison list once, then makes one atomic round trip
per job; ``settle`` runs it after a recovery and reports the counts.
``mark_started`` is one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from .. import scripts
from ..background import RecoveredHook
from ..config import Config
from ..connection import text
from ..job import InvalidJob, decode, now_seconds
from ..keys import Keys
from ..outcome import wrap_invalid
from ..retry import dead_payload

logger = logging.getLogger("exq_fast")

RECOVERY_BATCH = 100
"""Jobs moved per script call when re-enqueueing a backup list."""


RECOVERY_TTL = 7 * 24 * 3600
"""Seconds a suspect is remembered (with its started mark and recovery count) after
its last recovery."""


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

    def args(self) -> list[int | float]:
        """The recovery scripts' arguments after the batch size: ``max, ttl, now``."""
        return [self.max_recoveries, self.counter_ttl, time.time()]

    @staticmethod
    def keys(keys: Keys) -> list[str]:
        """The recovery scripts' last KEYS: ``suspects, started, recoveries, poison``."""
        return [keys.suspects, keys.started, keys.recoveries, keys.poison]

    @staticmethod
    def started_commands(keys: Keys, raw: bytes) -> list[tuple[str, ...]]:
        """What a suspect job's ack clears: it is a suspect no more."""
        digest = job_digest(raw)
        return [("ZREM", keys.suspects, digest), ("HDEL", keys.started, digest),
                ("HDEL", keys.recoveries, digest)]


def recover_backup(client: redis.Redis, keys: Keys, node_id: str, queue: str,
                   policy: RecoveryPolicy = RecoveryPolicy()) -> tuple[int, int]:
    """Move ``node_id``'s backup of ``queue`` back to the front of the queue.

    Order is kept: the oldest fetched job is popped first again (Exq 0.15+).
    A job recovered ``policy.max_recoveries`` times goes to the poison list
    instead (see ``bury_poison``). Returns ``(moved, poisoned)``.
    """
    return _drain(lambda: scripts.mlpop_rpush(
        client, [keys.backup(node_id, queue), keys.queue(queue), *policy.keys(keys)],
        [RECOVERY_BATCH, *policy.args()],
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
        [keys.backup(dead_node, queue), keys.queue(queue), keys.heartbeats,
         *policy.keys(keys)],
        [dead_node, expected_score, RECOVERY_BATCH, *policy.args()],
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
        [keys.backup(dead_node, queue), keys.queue(queue), keys.nodes, *policy.keys(keys)],
        [dead_node, entry, RECOVERY_BATCH, *policy.args()],
    ))


def _drain(move_batch: Callable[[], Sequence[int]]) -> tuple[int, int]:
    """Call a recovery script until the backup list is empty (or it moves nothing)."""
    moved = poisoned = 0
    while True:
        remaining, count, bad = (int(n) for n in move_batch())
        moved, poisoned = moved + count, poisoned + bad
        if remaining == 0 or count + bad == 0:
            return moved, poisoned


def mark_started(client: redis.Redis, keys: Keys, raw: bytes) -> None:
    """Mark a suspect as started, just before it runs (one round trip): if its
    process dies during this run, the next recovery counts against it."""
    client.hset(keys.started, job_digest(raw), repr(time.time()))


def settle(client: redis.Redis, keys: Keys, policy: RecoveryPolicy, queue: str,
           counts: tuple[int, int], reason: str, on_recovered: RecoveredHook | None) -> None:
    """After a recovery of ``queue`` moved ``counts`` = (jobs back in the queue, jobs
    to the poison list): bury the poison jobs, and tell ``on_recovered`` of both
    (``reason``, and ``"poison"``). The jobs have moved already: a hook that raises
    is logged and changes nothing."""
    moved, poisoned = counts
    if poisoned:
        logger.warning("%d job(s) of %r recovered %d times go to the dead set (poison)",
                       poisoned, queue, policy.max_recoveries)
        bury_poison(client, keys, policy)
    if on_recovered is None:
        return
    for count, why in ((moved, reason), (poisoned, "poison")):
        if count:
            try:
                on_recovered(queue, why, count)
            except Exception:
                logger.exception("on_recovered hook failed")


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
        return wrap_invalid(raw, None, POISON_CLASS, f"{message}; {exc.reason}")
