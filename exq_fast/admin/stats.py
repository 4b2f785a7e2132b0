"""``Counters``: the processed / failed counters, per day and per second, and the
dashboard summary ``Stats``.

Owns the ``P(stat:*)`` keys (docs/wire-format.md §7) for reading, and writes
one thing: ``clear_failed`` (Exq's), which zeroes ``P(stat:failed)`` and
deletes the dead set in one MULTI. A counter never written reads 0; junk reads
0. Round trips: one per call, except ``realtime`` (a SCAN, then one MGET per
kind) and ``summary`` (one pipeline for counters and set sizes, then what
``Queues.sizes``, ``Processes.nodes`` and ``Processes.backups`` read; not a
snapshot: the numbers are read one after the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import cast

import redis

from ..connection import text
from ..keys import Keys, StatKind
from ._common import as_bytes, as_int
from .processes import Processes
from .queues import Queues

__all__ = ["Counters", "Stats"]

_KINDS: tuple[StatKind, ...] = ("processed", "failed")


@dataclass(frozen=True, slots=True)
class Stats:
    """The dashboard numbers (Sidekiq's ``Stats``)."""

    processed: int
    failed: int
    retry_size: int
    scheduled_size: int
    dead_size: int
    enqueued: int
    """Jobs waiting in every known queue."""
    busy: int
    """Jobs running, summed over the nodes."""
    processes: int
    """Live nodes (Exq and Sidekiq processes, Exq 0.13 hosts)."""
    in_flight: int = 0
    """Jobs in every node's backup list: running, or left by a node that is gone."""


class Counters:
    """The counters of ``P(stat:*)`` and the summary. See the module doc."""

    def __init__(self, client: redis.Redis, keys: Keys, queues: Queues,
                 processes: Processes) -> None:
        self._redis = client
        self._keys = keys
        self._queues = queues
        self._processes = processes

    def total(self, kind: str) -> int:
        """The all-time counter ``"processed"`` or ``"failed"`` (0 if never written)."""
        return as_int(cast(bytes | None, self._redis.get(self._keys.stat(_kind(kind)))))

    def for_dates(self, kind: str, dates: Sequence[date | str]) -> list[int]:
        """The per-day counters of ``kind`` for each UTC date (``YYYY-MM-DD`` or a date)."""
        names = [self._keys.stat_day(_kind(kind), _day_start(day)) for day in dates]
        if not names:
            return []
        return [as_int(v) for v in cast(list[bytes | None], self._redis.mget(names))]

    def daily(self, kind: str, days: int = 7, *, today: date | None = None) -> dict[str, int]:
        """``{"YYYY-MM-DD": count}`` for the last ``days`` UTC days, newest first."""
        if isinstance(days, bool) or not isinstance(days, int) or days < 1:
            raise ValueError(f"days must be a positive integer, got {days!r}")
        last = today if today is not None else datetime.now(UTC).date()
        dates = [last - timedelta(days=n) for n in range(days)]
        counts = self.for_dates(kind, dates)
        return {day.isoformat(): count for day, count in zip(dates, counts, strict=True)}

    def realtime(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Exq's per-second counters: ``(failures, successes)``, each a time-sorted list
        of ``("YYYY-MM-DD HH:MM:SSZ", count)``."""
        return self._realtime("failed"), self._realtime("processed")

    def summary(self) -> Stats:
        """The dashboard numbers, like Sidekiq's ``Stats`` (a few pipelined round trips)."""
        pipe = self._redis.pipeline(transaction=False)
        for kind in _KINDS:
            pipe.get(self._keys.stat(kind))
        for key in (self._keys.retry, self._keys.schedule, self._keys.dead):
            pipe.zcard(key)
        processed, failed, retry, scheduled, dead = pipe.execute()
        nodes = self._processes.nodes()
        return Stats(as_int(processed), as_int(failed), int(retry), int(scheduled), int(dead),
                     sum(self._queues.sizes().values()), sum(n.busy for n in nodes),
                     len(nodes), sum(b.size for b in self._processes.backups()))

    def clear_failed(self) -> int:
        """Exq's ``clear_failed``: ``stat:failed`` to 0 and the dead set deleted, in one
        MULTI. Returns how many dead entries there were."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._keys.stat("failed"), 0)
        pipe.zcard(self._keys.dead)
        pipe.delete(self._keys.dead)
        return int(pipe.execute()[1])

    def _realtime(self, kind: StatKind) -> list[tuple[str, int]]:
        found = [as_bytes(k) for k in self._redis.scan_iter(
            match=self._keys.stat_rt_pattern(kind), count=1000)]
        if not found:
            return []
        values = cast(list[bytes | None], self._redis.mget(found))
        head = self._keys.stat_rt_prefix(kind).encode("utf-8")
        pairs = [(text(k[len(head):]), as_int(v)) for k, v in zip(found, values, strict=True)
                 if v is not None and k.startswith(head)]
        return sorted(pairs)


def _kind(kind: object) -> StatKind:
    if kind == "processed":
        return "processed"
    if kind == "failed":
        return "failed"
    raise ValueError(f"unknown stat kind {kind!r}: expected 'processed' or 'failed'")


def _day_start(day: object) -> float:
    """Unix time of 00:00 UTC of ``day`` (a date, or ``YYYY-MM-DD`` text)."""
    if isinstance(day, str):
        try:
            day = date.fromisoformat(day)
        except ValueError:
            raise ValueError(f"not a date: {day!r} (expected YYYY-MM-DD)") from None
    if not isinstance(day, date):
        raise ValueError(f"not a date: {day!r}")
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
