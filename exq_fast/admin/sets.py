"""``JobSet``: the retry, schedule and dead sets, one view type for the three.

Owns the sorted sets ``P(retry)``, ``P(schedule)`` and ``P(dead)``
(docs/wire-format.md §2), scored by float seconds. The retry and schedule
sets are read soonest first, the dead set newest death first; that order is
the only difference between the three views.

Round trips: one per call, except ``find`` without a score (one per page of
``PAGE_SIZE`` members until found), ``remove`` (one pipeline, plus one
compare-and-delete per unique lock released), the requeues and the kills (one
script call per ``REQUEUE_CHUNK`` members). A requeue is the scheduler's move
(docs/wire-format.md §6.1) on the given members: atomic per member, so of
concurrent callers exactly one moves it, byte for byte (error fields kept),
to the front of its own queue (``default`` when it names none). A kill
(retry or schedule set only) is the same kind of move to the dead set, byte
for byte, scored now, then the dead set trimmed by ``DeadLimits`` as a job's
death trims it (docs/wire-format.md §6.4). ``clear`` is one MULTI. Members
are always the exact bytes stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import redis
from redis.client import Pipeline

from .. import scripts
from ..job import now_seconds
from ..keys import Keys
from ..store.scheduled import move_members
from ._common import (
    PAGE_SIZE,
    Entry,
    Members,
    as_bytes,
    check_name,
    check_page,
    entries,
    entry,
    find_in_pages,
    first_with_jid,
    raw_list,
)

__all__ = ["FALLBACK_QUEUE", "REQUEUE_CHUNK", "DeadLimits", "JobSet", "SetName"]

SetName = Literal["retry", "schedule", "dead"]
"""The sorted sets, by their key's name."""

REQUEUE_CHUNK = 500
"""Members moved per call of the requeue script."""
FALLBACK_QUEUE = "default"
"""Queue a requeued member goes to when it names none (or is not JSON)."""


@dataclass(frozen=True, slots=True)
class DeadLimits:
    """How the dead set is trimmed after a kill: Config's ``dead_max_jobs`` and
    ``dead_timeout_in_seconds`` (the same trim a job's death applies)."""

    max_jobs: int = 10000
    timeout_s: int = 15552000


class JobSet(Members):
    """One of the retry / schedule / dead sets; ``remove`` is ZREM. See the module doc."""

    def __init__(self, client: redis.Redis, keys: Keys, name: SetName,
                 dead_limits: DeadLimits | None = None) -> None:
        super().__init__(client, keys, {"retry": keys.retry, "schedule": keys.schedule,
                                        "dead": keys.dead}[name])
        self.name: SetName = name
        self._limits = dead_limits if dead_limits is not None else DeadLimits()
        self.newest_first = name == "dead"
        """Listing order: newest score first (dead), else soonest first."""

    def size(self) -> int:
        """Members of the set."""
        return int(self._redis.zcard(self.key))

    def page(self, *, offset: int = 0, size: int = 100) -> list[Entry]:
        """A page of the set in its listing order, with scores."""
        check_page(offset, size)
        if size == 0:
            return []
        if self.newest_first:
            reply = self._redis.zrevrangebyscore(self.key, "+inf", "-inf", start=offset,
                                                 num=size, withscores=True)
        else:
            reply = self._redis.zrangebyscore(self.key, "-inf", "+inf", start=offset,
                                              num=size, withscores=True)
        return entries(reply)

    def at_score(self, score: float | str) -> list[Entry]:
        """Every entry scored exactly ``score`` (a float, or its text as Redis reads it)."""
        at = float(_score_arg(score))
        return [entry(raw, at) for raw in self.raw_at_score(score)]

    def raw_at_score(self, score: float | str) -> list[bytes]:
        """The raw members scored exactly ``score``, not decoded."""
        bound = _score_arg(score)
        members = cast(list[bytes | str], self._redis.zrangebyscore(self.key, bound, bound))
        return [as_bytes(m) for m in members]

    def scan(self, match: str | None = None) -> Iterator[Entry]:
        """Every entry (ZSCAN, in no order), or those whose raw bytes match the glob
        ``match``, tested by Redis: a filter reads only what matches."""
        for member, score in self._redis.zscan_iter(self.key, match=match, count=PAGE_SIZE):
            yield entry(member, float(score))

    def find(self, jid: str, score: float | str | None = None) -> Entry | None:
        """The entry of ``jid`` (at ``score`` if given, else the first in listing
        order), or None."""
        check_name("jid", jid)
        if score is not None:
            return first_with_jid(self.at_score(score), jid)
        return find_in_pages(self._pages(), jid)

    def requeue(self, raws: Sequence[bytes | str]) -> int:
        """Move the raw members, byte for byte, to their queues now; return how many
        moved. Atomic per member: of concurrent callers exactly one moves it."""
        return self._requeue(raw_list(raws))

    def requeue_all(self, jobs_only: bool = False) -> int:
        """Move every member (in listing order) to its queue; return how many moved.
        With ``jobs_only``, members that are not a job stay (else they go to the
        fallback queue, where a node buries them again).

        Bounded by the size at the start: members added meanwhile wait for a
        later call, so a set that keeps filling cannot keep this looping.
        """
        keep = (lambda raw: entry(raw).job is not None) if jobs_only else None
        return self._each_chunk(self._requeue, keep)

    def requeue_jid(self, jid: str) -> int:
        """Move the entry of ``jid`` (its exact bytes) to its queue now; on the retry
        set this is Exq's ``retry_job``. Returns 1, or 0 when no entry has that jid."""
        found = self.find(jid)
        return 0 if found is None else self.requeue([found.raw])

    def kill(self, raws: Sequence[bytes | str]) -> int:
        """Move the raw members, byte for byte, to the dead set now (Sidekiq's kill),
        then trim it as a death does; return how many moved. Atomic per member: of
        concurrent callers exactly one moves it. ``ValueError`` on the dead set."""
        members = raw_list(raws)
        if self.name == "dead":
            raise ValueError("the dead set's entries are already dead")
        return _by_chunk(members, self._kill)

    def kill_all(self) -> int:
        """Move every member (bounded by the size at the start) to the dead set."""
        return self._each_chunk(self.kill)

    def clear(self) -> int:
        """Delete the set; return how many entries it had."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.zcard(self.key)
        pipe.delete(self.key)
        return int(pipe.execute()[0])

    def _remove_one(self, pipe: Pipeline, raw: bytes) -> object:
        return pipe.zrem(self.key, raw)

    def _each_chunk(self, move: Callable[[list[bytes]], int],
                    keep: Callable[[bytes], bool] | None = None) -> int:
        """``move`` every member (those ``keep`` accepts), a chunk at a time in listing
        order, bounded by the size at the start (members added meanwhile wait for a
        later call). Members left in place are stepped over."""
        budget, moved, skip = self.size(), 0, 0
        while budget > 0:
            page = [as_bytes(m) for m in cast(list[bytes], self._redis.zrange(
                self.key, skip, skip + min(budget, REQUEUE_CHUNK) - 1,
                desc=self.newest_first))]
            if not page:
                break
            chosen = page if keep is None else [m for m in page if keep(m)]
            moved += move(chosen) if chosen else 0
            skip += len(page) - len(chosen)
            budget -= len(page)
        return moved

    def _pages(self) -> Iterator[list[Entry]]:
        start = 0
        while page := entries(self._redis.zrange(self.key, start, start + PAGE_SIZE - 1,
                                                 desc=self.newest_first, withscores=True)):
            yield page
            start += PAGE_SIZE

    def _requeue(self, members: list[bytes]) -> int:
        return _by_chunk(members, lambda chunk: move_members(
            self._redis, self._keys, self.key, chunk, FALLBACK_QUEUE))

    def _kill(self, chunk: list[bytes]) -> int:
        now = now_seconds()
        return int(scripts.kill(self._redis, [self.key, self._keys.dead], [
            repr(now), repr(now - self._limits.timeout_s), self._limits.max_jobs, *chunk]))


def _by_chunk(members: list[bytes], move: Callable[[list[bytes]], int]) -> int:
    """``move`` the members ``REQUEUE_CHUNK`` at a time (one script call each); the
    sum of what each call moved."""
    return sum(move(members[start:start + REQUEUE_CHUNK])
               for start in range(0, len(members), REQUEUE_CHUNK))


def _score_arg(score: float | str) -> str:
    """A score bound for ZRANGEBYSCORE: Redis's own text as given, or a float's repr."""
    try:
        value = float(score) if not isinstance(score, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise ValueError(f"not a score: {score!r}")
    return score if isinstance(score, str) else repr(value)
