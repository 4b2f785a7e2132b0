"""Enqueue: push jobs into their queues or the schedule set, and release unique locks.

Contract: ``push`` (one job: Exq's ``enqueue`` or ``enqueue_at`` script) and
``push_all`` (any number: ``enqueue_all``) each make one round trip, atomic:
every job is written with its unique lock taken, or, when the lock is held,
not written at all (in ``push_all`` without undoing the other jobs).
``unlock`` is one round trip (``compare_and_delete``).
"""

from __future__ import annotations

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
