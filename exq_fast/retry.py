"""Retry, death and snooze: Exq's rules, and the Redis writes they make.

The writes are returned as commands, not sent: the worker puts them into the
stats batch *before* the job's ack (the LREM from the backup list), so a crash
between the two re-runs the job rather than losing it (at-least-once).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .job import Job, encode, normalize_timestamps, now_seconds
from .keys import Keys

Command = tuple[Any, ...]
"""One Redis command for the stats batch: ``("ZADD", key, score, member)``."""

Backoff = Callable[[Job], float]
"""Seconds to wait before the next attempt of a job that just failed."""

REENCODED_FIELDS = (
    "args", "class", "enqueued_at", "error_class", "error_message", "failed_at",
    "retried_at", "finished_at", "jid", "processor", "queue", "retry", "retry_count",
)
"""The 13 fields Exq always writes when it re-encodes a job (null when missing)."""


def is_dead(job: Job, max_retries: int) -> bool:
    """Exq's rule: is a job that just failed out of retries? (docs/wire-format.md §6.2)."""
    attempt = job.retry_count + 1
    retry = job.retry
    if retry is True:
        return attempt > max_retries
    if isinstance(retry, int) and not isinstance(retry, bool) and retry > 0:
        return attempt > retry
    return True  # false, 0, negative, null, strings: dead at once


def sidekiq_backoff(job: Job) -> float:
    """Exq's ``SidekiqDefault``: ``n^4 + 15 + rand(0..30) * (n + 1)`` for the new count n."""
    count = job.retry_count + 1
    return float(count) ** 4 + 15 + random.randint(0, 30) * (count + 1)


def _failure_fields(data: dict[str, Any], message: str, error_class: str | None,
                    now: float) -> None:
    for name in REENCODED_FIELDS:
        data.setdefault(name, None)
    data["error_message"] = message
    if error_class is not None:
        data["error_class"] = error_class
    if data["failed_at"] is None:
        data["failed_at"] = now
    data["retried_at"] = now


def _payload(job: Job, changes: dict[str, Any], message: str, error_class: str | None,
             now: float) -> bytes:
    data = normalize_timestamps(job.to_dict())
    _failure_fields(data, message, error_class, now)
    data.update(changes)
    return encode(data)


def retry_commands(keys: Keys, job: Job, error_class: str, message: str, delay: float,
                   now: float | None = None) -> list[Command]:
    """The retry-set entry for a failed job with attempts left."""
    at = now_seconds() if now is None else now
    payload = _payload(job, {"retry_count": job.retry_count + 1}, message, error_class, at)
    return [("ZADD", keys.retry, repr(at + delay), payload)]


def snooze_commands(keys: Keys, job: Job, seconds: float,
                    now: float | None = None) -> list[Command]:
    """A snoozed job back in the retry set, ``retry_count`` unchanged (Exq 0.21+)."""
    at = now_seconds() if now is None else now
    payload = _payload(job, {}, f"Snoozed for {seconds!r} seconds", None, at)
    return [("ZADD", keys.retry, repr(at + seconds), payload)]


def dead_commands(keys: Keys, payload: bytes, max_jobs: int, timeout_s: int,
                  now: float | None = None) -> list[Command]:
    """Add ``payload`` to the dead set, then trim it by age and size (docs/wire-format.md §6.4)."""
    at = now_seconds() if now is None else now
    return [
        ("ZADD", keys.dead, repr(at), payload),
        ("ZREMRANGEBYSCORE", keys.dead, "-inf", repr(at - timeout_s)),
        ("ZREMRANGEBYRANK", keys.dead, 0, -max_jobs - 1),
    ]


def dead_payload(job: Job, error_class: str, message: str, now: float | None = None) -> bytes:
    """A job's dead-set entry: retry_count kept (null becomes 0), error fields set."""
    at = now_seconds() if now is None else now
    return _payload(job, {"retry_count": job.retry_count}, message, error_class, at)
