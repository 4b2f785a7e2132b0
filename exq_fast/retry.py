"""Retry, death and snooze: Exq's rules, and the Redis writes they make.

The writes are returned as commands, not sent: the worker puts them into the
stats batch *before* the job's ack (the LREM from the backup list), so a crash
between the two re-runs the job rather than losing it (at-least-once).

Failure backtraces (Sidekiq's ``error_backtrace``, docs/wire-format.md §3.5.1):
``backtrace_lines`` turns an exception's traceback into Ruby-style lines,
innermost frame first; ``compress_backtrace`` stores them as Sidekiq does
(Base64 of zlib-deflated JSON), ``decode_backtrace`` reads them back.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import traceback
import zlib
from collections.abc import Callable, Sequence
from types import CodeType, TracebackType
from typing import Any

from .job import Job, encode, now_seconds
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

BACKTRACE_MAX_LINES = 50
"""Lines of ``error_backtrace`` kept at most, even when a job asks for all of them."""
BACKTRACE_LINE_MAX = 500
"""Characters of one ``error_backtrace`` line kept at most (the rest is cut)."""

_INFLATED_MAX = 4 << 20  # bytes a stored backtrace may inflate to when read back
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


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


def backtrace_limit(option: bool | int | None) -> int:
    """How many lines a ``backtrace`` option asks for (0: none), within the cap."""
    if option is None or option is False:
        return 0
    if option is True:
        return BACKTRACE_MAX_LINES
    return max(0, min(option, BACKTRACE_MAX_LINES))


def backtrace_lines(tb: TracebackType | None, limit: int) -> list[str]:
    """The ``limit`` innermost frames of ``tb`` as Ruby prints them, innermost first:
    ``<file>:<line>:in `<function>'``, each cut to ``BACKTRACE_LINE_MAX`` characters.

    The frames exq_fast went through to call the job's code (its dispatch) are
    left out: every frame up to the first exq_fast frame whose callee lies outside
    the package. A traceback with no such hand-over is kept whole.
    """
    if limit <= 0:
        return []
    frames: list[tuple[CodeType, int]] = [
        (frame.f_code, line) for frame, line in traceback.walk_tb(tb)]
    frames = frames[_job_code_start(frames):]
    lines = [f"{code.co_filename}:{line}:in `{code.co_qualname}'"
             for code, line in reversed(frames)]
    return [line[:BACKTRACE_LINE_MAX] for line in lines[:limit]]


def _job_code_start(frames: Sequence[tuple[CodeType, int]]) -> int:
    """Index of the first frame of the job's own code: the frame after the first
    exq_fast frame that calls out of the package (0 when there is none)."""
    for index in range(len(frames) - 1):
        if _in_package(frames[index][0]) and not _in_package(frames[index + 1][0]):
            return index + 1
    return 0


def _in_package(code: CodeType) -> bool:
    return os.path.abspath(code.co_filename).startswith(_PACKAGE_DIR)


def compress_backtrace(lines: Sequence[str]) -> str:
    """``error_backtrace`` as Sidekiq (6.x, 7, 8) stores it: Base64 of the zlib-deflated
    JSON array of lines (strict Base64: no line breaks, which every reader accepts)."""
    return base64.b64encode(zlib.compress(encode(list(lines)))).decode("ascii")


def decode_backtrace(value: object) -> list[str] | None:
    """The lines of a stored ``error_backtrace``: Sidekiq's compressed string (line
    breaks in the Base64 allowed, as Sidekiq 6 writes them) or a plain JSON array
    (Sidekiq before 6.0). None when absent or unreadable."""
    if isinstance(value, list):
        return [str(line) for line in value]
    if not isinstance(value, str):
        return None
    try:
        inflated = zlib.decompressobj().decompress(base64.b64decode(value), _INFLATED_MAX)
        lines = json.loads(inflated)
    except (binascii.Error, zlib.error, ValueError, RecursionError):
        return None
    return [str(line) for line in lines] if isinstance(lines, list) else None


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
             now: float, drop: tuple[str, ...] = ()) -> bytes:
    """``job`` re-encoded with the failure fields, then ``changes``, without ``drop``
    (never a field of ``changes``)."""
    def edit(data: dict[str, Any]) -> None:
        _failure_fields(data, message, error_class, now)
        for name in drop:
            data.pop(name, None)
    return job.reencode(changes, edit)


def _failure_payload(job: Job, retry_count: int, message: str, error_class: str,
                     now: float, backtrace: Sequence[str] | None) -> bytes:
    """A retry or dead entry: ``error_backtrace`` set from ``backtrace``, or dropped
    (a stale one from an earlier failure must not describe this one)."""
    changes: dict[str, Any] = {"retry_count": retry_count}
    if backtrace:
        changes["error_backtrace"] = compress_backtrace(backtrace)
        return _payload(job, changes, message, error_class, now)
    return _payload(job, changes, message, error_class, now, drop=("error_backtrace",))


def retry_commands(keys: Keys, job: Job, error_class: str, message: str, delay: float,
                   now: float | None = None,
                   backtrace: Sequence[str] | None = None) -> list[Command]:
    """The retry-set entry for a failed job with attempts left; ``backtrace``: the
    ``error_backtrace`` lines, or None to write (and keep) none."""
    at = now_seconds() if now is None else now
    payload = _failure_payload(job, job.retry_count + 1, message, error_class, at, backtrace)
    return [("ZADD", keys.retry, repr(at + delay), payload)]


def snooze_commands(keys: Keys, job: Job, seconds: float,
                    now: float | None = None) -> list[Command]:
    """A snoozed job back in the retry set, ``retry_count`` unchanged (Exq 0.21+).

    ``error_class`` and any ``error_backtrace`` are left as they were: a snooze
    is not a failure and writes no backtrace."""
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


def dead_payload(job: Job, error_class: str, message: str, now: float | None = None,
                 backtrace: Sequence[str] | None = None) -> bytes:
    """A job's dead-set entry: retry_count kept (null becomes 0), error fields set,
    ``error_backtrace`` as in ``retry_commands``."""
    at = now_seconds() if now is None else now
    return _failure_payload(job, job.retry_count, message, error_class, at, backtrace)
