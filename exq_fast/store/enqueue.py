"""Enqueue: push jobs into their queues or the schedule set, and release unique locks.

Contract: ``push`` (one job: Exq's ``enqueue`` or ``enqueue_at`` script) and
``push_all`` (any number: ``enqueue_all``) each make one round trip, atomic:
every job is written with its unique lock taken, or, when the lock is held,
not written at all (in ``push_all`` without undoing the other jobs).
``unlock`` is one round trip (``compare_and_delete``).

``PushCombiner`` makes concurrent single pushes share round trips: the jobs of
callers that arrive while a round trip is in flight go together in the next
``push_all``, each caller still getting its own result or error.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import redis

from .. import scripts
from ..keys import Keys


@dataclass(frozen=True, slots=True)
class Conflict:
    """An enqueue refused because a unique lock is held by ``existing_jid``."""

    existing_jid: str


EnqueueResult = str | Conflict
"""The jid of the enqueued job, or the ``Conflict`` that stopped it."""


class Push(NamedTuple):
    """One job ready to be written: its bytes and where they go."""

    queue: str
    payload: bytes
    jid: str
    score: float | None = None
    """Run time in float seconds for a scheduled job, None for now."""
    lock: tuple[str, int] | None = None
    """The unique lock's token and the milliseconds it is held, None for no lock."""


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
    """Enqueue many jobs, immediate and scheduled mixed, in one round trip.

    Returns one result per job, in order: its jid, or the ``Conflict`` that
    stopped it.
    """
    if not jobs:
        return []
    job_keys: list[str] = [keys.schedule, keys.queues]
    args: list[str | bytes | int] = []
    for job in jobs:
        lock, unlocks_in = _lock_args(keys, job)
        job_keys += [keys.queue(job.queue), *lock]  # the lock's key only if it has one
        score = "0" if job.score is None else repr(job.score)
        args += [job.jid, job.queue, score, job.payload, unlocks_in]
    replies = scripts.enqueue_all(client, job_keys, args)
    return [_result(r if r[0] == 1 else 0, job.jid) for r, job in zip(replies, jobs, strict=True)]


def _lock_args(keys: Keys, push: Push) -> tuple[list[str], str | int]:
    """The job's lock key (none, or one) and milliseconds (``""`` for no lock)."""
    if push.lock is None or push.lock[1] <= 0:
        # No lock, or one that would already have expired: nothing to hold.
        return [], ""
    token, unlocks_in = push.lock
    return [keys.unique(token)], unlocks_in


def _result(reply: object, jid: str) -> EnqueueResult:
    """The jid, or the ``Conflict`` of a ``[1, holder jid]`` reply."""
    if isinstance(reply, list):
        existing = reply[1]
        return Conflict(existing.decode() if isinstance(existing, bytes) else str(existing))
    return jid


def unlock(client: redis.Redis, keys: Keys, token: str, jid: str) -> bool:
    """Release a unique lock if ``jid`` still holds it (compare-and-delete)."""
    return bool(scripts.compare_and_delete(client, [keys.unique(token)], [jid]))


COMBINE_LIMIT = 500
"""Most jobs one coalesced round trip carries."""


class _Waiter:
    """One caller's job on its way through a ``PushCombiner``."""

    __slots__ = ("error", "job", "lead", "ready", "result")

    def __init__(self, job: Push) -> None:
        self.job = job
        self.result: EnqueueResult | None = None
        self.error: BaseException | None = None
        self.lead = False  # handed the next round trip
        # Made, held, only for a caller that waits: released when its result is in
        # (a bare lock wakes a thread more cheaply than an Event).
        self.ready: threading.Lock | None = None


class PushCombiner:
    """Coalesces concurrent ``push`` calls into ``push_all`` round trips (thread-safe).

    Flat combining, with no thread of its own: a caller that finds no round trip
    in flight sends its job at once (alone: ``push``, exactly as without the
    combiner). Callers that arrive meanwhile wait; when the round trip returns,
    the first of them sends every job that waits, up to ``COMBINE_LIMIT``, in one
    ``push_all``, and so on. Each caller gets its own jid or ``Conflict``; a
    Redis error reaches every caller of that round trip (their jobs may or may
    not have been written, as with a lost reply of ``push``).
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._lock = threading.Lock()
        self._pending: list[_Waiter] = []
        self._busy = False  # a round trip is in flight (then _pending may grow)

    def push(self, job: Push) -> EnqueueResult:
        """Enqueue ``job`` (see ``push``), sharing a round trip with concurrent calls."""
        waiter = _Waiter(job)
        with self._lock:
            self._pending.append(waiter)
            if self._busy:
                waiter.ready = threading.Lock()
                waiter.ready.acquire()
            else:
                self._busy = waiter.lead = True
        if waiter.ready is not None:
            waiter.ready.acquire()
        if waiter.lead:
            self._round_trip()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None  # set by the round trip that carried it
        return waiter.result

    def _round_trip(self) -> None:
        """Send the waiting jobs (the caller's first), hand results out, then hand
        the next round trip to the first caller still waiting."""
        with self._lock:
            batch = self._pending[:COMBINE_LIMIT]
            del self._pending[:COMBINE_LIMIT]
        try:
            self._send(batch)
        finally:
            # Whatever happened (an error, even an interrupt of this thread), every
            # caller of this batch is told and the next round trip has a sender.
            with self._lock:
                nxt = self._pending[0] if self._pending else None
                if nxt is None:
                    self._busy = False
                else:
                    nxt.lead = True
            for waiter in batch:
                if waiter.ready is not None:
                    waiter.ready.release()
            if nxt is not None and nxt.ready is not None:
                nxt.ready.release()

    def _send(self, batch: list[_Waiter]) -> None:
        try:
            if len(batch) == 1:
                batch[0].result = push(self.client, self.keys, batch[0].job)
                return
            results = push_all(self.client, self.keys, [w.job for w in batch])
        except BaseException as exc:
            for waiter in batch:
                waiter.error = exc
            raise
        for waiter, result in zip(batch, results, strict=True):
            waiter.result = result
