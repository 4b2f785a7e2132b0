"""The queues: their names, sizes and latency, and the jobs waiting in each.

Owns ``P(queues)`` and the lists ``P(queue:<q>)`` (docs/wire-format.md §2),
never the backup lists (see ``processes``). ``Queues`` is every known queue;
``Queue`` is one of them, by name, known or not: an unknown queue is simply
empty (it lists nothing, finds None, removes 0).

Round trips: one per call, except ``sizes`` (one pipeline), ``find`` (one per
page of ``PAGE_SIZE`` members until found) and ``remove`` (one pipeline, plus
one compare-and-delete per unique lock released). ``delete`` and ``clear``
are one MULTI each; nothing else needs to be atomic. Removals name the exact
bytes stored (``LREM … 1``: one copy each).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import cast

import redis
from redis.client import Pipeline

from ..connection import text
from ..keys import Keys
from ._common import (
    PAGE_SIZE,
    Entry,
    Members,
    as_bytes,
    as_int,
    check_name,
    check_page,
    entry,
    find_in_pages,
)

__all__ = ["Queue", "Queues"]


class Queue(Members):
    """One queue, ``P(queue:<name>)``, newest job first (LRANGE order); ``remove``
    takes one copy of each raw member (``LREM … 1``)."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str) -> None:
        check_name("queue", name)
        super().__init__(client, keys, keys.queue(name))
        self.name = name

    def size(self) -> int:
        """Jobs waiting (0 for an unknown queue)."""
        return int(self._redis.llen(self.key))

    def latency(self) -> float:
        """Seconds the oldest job has waited (0.0 when empty), as Sidekiq."""
        oldest = cast(bytes | None, self._redis.lindex(self.key, -1))
        job = entry(oldest).job if oldest is not None else None
        if job is None or job.enqueued_at is None:
            return 0.0
        return max(time.time() - job.enqueued_at, 0.0)

    def page(self, *, offset: int = 0, size: int = 100) -> list[Entry]:
        """A page of jobs, newest first (the oldest is popped next)."""
        return [entry(raw) for raw in self.raw_page(offset=offset, size=size)]

    def raw_page(self, *, offset: int = 0, size: int = 100) -> list[bytes]:
        """``page`` as the exact bytes stored, not decoded."""
        check_page(offset, size)
        if size == 0:
            return []
        return self._lrange(offset, offset + size - 1)

    def find(self, jid: str) -> Entry | None:
        """The first job (newest first) with ``jid``, or None."""
        check_name("jid", jid)
        return find_in_pages(self._pages(), jid)

    def clear(self) -> int:
        """Delete every job, keeping the name known; return how many were deleted."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.llen(self.key)
        pipe.delete(self.key)
        return int(pipe.execute()[0])

    def delete(self) -> int:
        """Forget the queue's name and delete its jobs; return how many jobs went."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.srem(self._keys.queues, self.name)
        pipe.llen(self.key)
        pipe.delete(self.key)
        return int(pipe.execute()[1])

    def _remove_one(self, pipe: Pipeline, raw: bytes) -> object:
        # redis-py types LREM's value as str; it sends bytes unchanged, as needed here.
        return pipe.lrem(self.key, 1, raw)  # type: ignore[arg-type]

    def _lrange(self, start: int, stop: int) -> list[bytes]:
        return [as_bytes(m) for m in self._redis.lrange(self.key, start, stop)]

    def _pages(self) -> Iterator[list[bytes]]:
        start = 0
        while page := self._lrange(start, start + PAGE_SIZE - 1):
            yield page
            start += PAGE_SIZE


class Queues:
    """Every queue named in ``P(queues)``; ``queue(name)`` is one of them."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def queue(self, name: str) -> Queue:
        """The queue ``name`` (known or not; ``ValueError`` for an empty name)."""
        return Queue(self._redis, self._keys, name)

    def names(self) -> list[str]:
        """The known queue names, sorted."""
        members = cast(Iterable[bytes | str], self._redis.smembers(self._keys.queues))
        return sorted(text(m) for m in members)

    def sizes(self) -> dict[str, int]:
        """Jobs waiting in each known queue, by name (sorted)."""
        names = self.names()
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(self._keys.queue(name))
        return dict(zip(names, map(as_int, pipe.execute(raise_on_error=False)), strict=True))

    def jobs_by_queue(self, *, size: int = 100) -> dict[str, list[Entry]]:
        """The first ``size`` jobs of every known queue (Exq's ``jobs/1``)."""
        return {name: self.queue(name).page(size=size) for name in self.names()}

