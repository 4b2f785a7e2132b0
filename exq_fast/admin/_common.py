"""What the admin views share: ``Entry``, argument checks, tolerant decoding, the
search by jid, and ``Members`` (the base of ``Queue`` and ``JobSet``: removals).

Private to ``exq_fast.admin``. Only ``Members`` talks to Redis: ``remove`` is
one pipeline (not a transaction: each member is removed or not on its own),
plus one compare-and-delete per unique lock released. Raw members are always
handled as the exact bytes stored: a removal names the member it means, never
a re-encoded copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.client import Pipeline

from ..job import InvalidJob, Job, decode
from ..keys import Keys
from ..store.enqueue import unlock

PAGE_SIZE = 1000
"""Members read per round trip when a whole list or set is scanned."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One member of a queue list or of the retry/schedule/dead set."""

    raw: bytes
    """The member exactly as stored: what ``remove`` and ``requeue`` take."""
    job: Job | None = dataclasses.field(compare=False)
    """The decoded job, or None when the bytes are not a job."""
    score: float | None = None
    """The zset score (float seconds); None for a queue list member."""

    @property
    def jid(self) -> str | None:
        """The job id, or None."""
        return self.job.jid if self.job is not None else None

    def to_dict(self) -> dict[str, Any] | None:
        """Every field of the payload (error fields included), or None if not a job."""
        return self.job.to_dict() if self.job is not None else None


# -- values ----------------------------------------------------------------------------


def as_bytes(value: bytes | str) -> bytes:
    """``value`` as bytes (text as UTF-8)."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def as_int(value: object) -> int:
    """A counter as stored (bytes, str, int or None) as an int; junk reads as 0."""
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def check_name(what: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def check_page(offset: object, size: object) -> None:
    """Raise ``ValueError`` unless ``offset`` and ``size`` are non-negative integers."""
    for name, value in (("offset", offset), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def raw_list(raws: object) -> list[bytes]:
    """A list of raw members as bytes; ``ValueError`` for a single value or a non-member."""
    if isinstance(raws, str | bytes | bytearray) or not isinstance(raws, Iterable):
        raise ValueError("raws must be a list of raw members, not a single value")
    members = list(raws)
    for raw in members:
        if not isinstance(raw, str | bytes):
            raise ValueError(f"a raw member must be bytes or str, got {raw!r}")
    return [as_bytes(raw) for raw in members]


# -- entries ---------------------------------------------------------------------------


def entry(raw: bytes | str, score: float | None = None) -> Entry:
    """The ``Entry`` of a stored member (``job`` None when it is not a job)."""
    data = as_bytes(raw)
    try:
        job: Job | None = decode(data)
    except InvalidJob:
        job = None
    return Entry(data, job, score)


def entries(reply: object) -> list[Entry]:
    """The entries of a ``WITHSCORES`` reply."""
    pairs = cast(list[tuple[bytes | str, float]], reply)
    return [entry(member, float(score)) for member, score in pairs]


def _plain(needle: str) -> bool:
    """True if ``needle`` is written the same inside any JSON string (no escapes)."""
    return needle.isascii() and needle.isprintable() and not any(c in needle for c in '"\\/')


def first_with_jid(items: Iterable[Entry | bytes], jid: str) -> Entry | None:
    """The first item whose job has ``jid``, or None (decodes only likely members)."""
    plain = _plain(jid)
    needle = jid.encode("utf-8")
    for item in items:
        raw = item.raw if isinstance(item, Entry) else item
        if plain and needle not in raw:
            continue  # cheap filter: the jid's bytes must be in the member
        found = item if isinstance(item, Entry) else entry(raw)
        if found.jid == jid:
            return found
    return None


def find_in_pages(pages: Iterable[Iterable[Entry | bytes]], jid: str) -> Entry | None:
    """The first member with ``jid`` of the first page that has one, or None: pages
    are read (one round trip each) only until it is found."""
    for page in pages:
        found = first_with_jid(page, jid)
        if found is not None:
            return found
    return None


# -- removals --------------------------------------------------------------------------


class Members:
    """Base of the views over one key of raw job members (a queue list, a sorted set):
    ``remove`` is the same for both, only the command removing one member differs."""

    def __init__(self, client: redis.Redis, keys: Keys, key: str) -> None:
        self.key = key
        """The Redis key of the list or set."""
        self._redis = client
        self._keys = keys

    def remove(self, raws: Sequence[bytes | str], *, clear_unique_tokens: bool = False) -> int:
        """Remove each raw member (exact bytes; one copy of a list member) in one
        pipeline; return how many went.

        With ``clear_unique_tokens`` the unique lock of each removed job is then
        released if that job still holds it (one compare-and-delete each).
        """
        members = raw_list(raws)
        if not members:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for raw in members:
            self._remove_one(pipe, raw)
        removed = [raw for raw, n in zip(members, pipe.execute(), strict=True) if int(n)]
        if clear_unique_tokens:
            self._unlock(removed)
        return len(removed)

    def _remove_one(self, pipe: Pipeline, raw: bytes) -> object:
        raise NotImplementedError

    def _unlock(self, raws: Iterable[bytes]) -> None:
        # Only the jobs actually removed: a job no longer there may be running,
        # and its lock is still its own.
        for raw in raws:
            job = entry(raw).job
            if job is not None and job.unique_token and job.jid:
                unlock(self._redis, self._keys, job.unique_token, job.jid)
