"""What the web UI's pages show, as plain data for the templates: a job's fields
(``JobView``), times, member tokens, filters and the history chart.

Nothing here renders HTML: the templates do, with autoescape on, so a job's
bytes reach the page only as escaped text. A member that is not a job is
shown as its raw bytes (``JobView.raw_text``); nothing about it can break a
page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..admin import Entry, JobSet, ProcessInfo
from ..job import to_seconds
from ..retry import decode_backtrace

__all__ = ["PAGE_SIZE", "Bar", "JobView", "Paging", "ago", "decode_member", "digest_of",
           "encode_member", "filtered_page", "history_bars", "iso", "job_view", "running_view"]

PAGE_SIZE = 25
"""Entries per page (Sidekiq Web's default)."""
SCAN_LIMIT = 100_000
"""Members a filtered listing reads at most before it stops looking."""
_SCAN_PAGE = 1000
_SHORT = 120
_TIME_FIELDS = ("created_at", "enqueued_at", "failed_at", "retried_at")


@dataclass(frozen=True, slots=True)
class JobView:
    """One job (or one member that is not a job) as the pages show it."""

    member: str
    """The exact bytes stored, as a URL-safe Base64 token (what actions post)."""
    digest: str
    """First 16 hex digits of the member's SHA-256 (names it in a detail URL)."""
    score: str | None
    """The zset score as Python's repr (exact), or None for a queue member."""
    at: float | None
    """The score as a time."""
    is_job: bool
    raw_text: str
    """The raw bytes as text (invalid UTF-8 as escapes), for a member that is not a job."""
    display_class: str = ""
    jid: str = ""
    queue: str = ""
    args_short: str = ""
    args_pretty: str = ""
    retry_count: int = 0
    retry: str = ""
    error_class: str = ""
    error_message: str = ""
    backtrace: list[str] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    """``created_at``, ``enqueued_at``, ``failed_at``, ``retried_at`` when present."""
    fields: list[tuple[str, str]] = field(default_factory=list)
    """Every payload field, its value as JSON."""


def encode_member(raw: bytes) -> str:
    """A member's bytes as a token for a form field."""
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_member(token: str) -> bytes:
    """The bytes of a member token; ``ValueError`` when it is not one."""
    try:
        return base64.urlsafe_b64decode(token.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not a member token") from None


def digest_of(raw: bytes) -> str:
    """What names a member in a detail URL."""
    return hashlib.sha256(raw).hexdigest()[:16]


def job_view(entry: Entry) -> JobView:
    """The ``JobView`` of a queue member or set entry."""
    raw = entry.raw
    base: dict[str, Any] = {
        "member": encode_member(raw), "digest": digest_of(raw),
        "score": repr(entry.score) if entry.score is not None else None, "at": entry.score,
        "raw_text": raw.decode("utf-8", "backslashreplace")}
    payload = entry.to_dict()
    if entry.job is None or payload is None:
        return JobView(is_job=False, **base)
    return JobView(is_job=True, **base, **_payload_fields(payload, entry.job.job_class))


def running_view(process: ProcessInfo) -> JobView:
    """The ``JobView`` of a job a node runs (its recorded payload)."""
    return job_view(Entry(process.payload_raw, process.job, None))


def _payload_fields(payload: Mapping[str, Any], job_class: str) -> dict[str, Any]:
    args = payload.get("args")
    wrapped = payload.get("wrapped")
    backtrace = decode_backtrace(payload.get("error_backtrace")) or []
    times = {name: t for name in _TIME_FIELDS
             if (t := to_seconds(payload.get(name))) is not None}
    retry = payload.get("retry")
    return {
        "display_class": wrapped if isinstance(wrapped, str) and wrapped else job_class,
        "jid": _text(payload.get("jid")), "queue": _text(payload.get("queue")),
        "args_short": _shorten(_json(args)), "args_pretty": _json(args, indent=2),
        "retry_count": payload.get("retry_count") if isinstance(
            payload.get("retry_count"), int) else 0,
        "retry": "" if retry is None else _json(retry),
        "error_class": _text(payload.get("error_class")),
        "error_message": _text(payload.get("error_message")),
        "backtrace": backtrace, "times": times,
        "fields": [(str(k), _json(v)) for k, v in payload.items()]}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ("" if value is None else _json(value))


def _json(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


def _shorten(text: str) -> str:
    return text if len(text) <= _SHORT else text[:_SHORT - 1] + "…"


# -- listing -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paging:
    """Which page of a listing is shown, 1-based."""

    page: int
    total: int
    """Entries in the listing (for a filtered one: the matches found)."""
    size: int = PAGE_SIZE

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def pages(self) -> int:
        return max((self.total + self.size - 1) // self.size, 1)

    @classmethod
    def parse(cls, value: str | None, total: int) -> Paging:
        """From ``?page=``: junk or out of range reads as the nearest page."""
        try:
            page = int(value or "1")
        except ValueError:
            page = 1
        last = max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1)
        return cls(min(max(page, 1), last), total)


def matches(entry: Entry, needle: str) -> bool:
    """True if the entry's class (or wrapped class) contains ``needle`` (any case), or
    its jid contains it; a member that is not a job matches on its raw text."""
    low = needle.lower()
    if entry.job is None:
        return low in entry.raw.decode("utf-8", "replace").lower()
    payload = entry.to_dict() or {}
    names = [entry.job.job_class, payload.get("wrapped")]
    if any(isinstance(n, str) and low in n.lower() for n in names):
        return True
    return entry.jid is not None and needle in entry.jid


def filtered_page(jobset: JobSet, needle: str, page: str | None
                  ) -> tuple[list[Entry], Paging, bool]:
    """The requested page of the entries matching ``needle``, their paging, and whether
    the scan stopped at ``SCAN_LIMIT`` members (then the matches are of those only)."""
    found: list[Entry] = []
    scanned = 0
    for chunk in _chunks(jobset):
        scanned += len(chunk)
        found += [e for e in chunk if matches(e, needle)]
        if scanned >= SCAN_LIMIT:
            break
    paging = Paging.parse(page, len(found))
    return found[paging.offset:paging.offset + paging.size], paging, scanned >= SCAN_LIMIT


def _chunks(jobset: JobSet) -> Iterator[list[Entry]]:
    offset = 0
    while chunk := jobset.page(offset=offset, size=_SCAN_PAGE):
        yield chunk
        offset += len(chunk)


# -- time ------------------------------------------------------------------------------


def iso(seconds: float | None) -> str:
    """UTC time to the second, ``2026-12-06 14:03:58 UTC`` ("" for None)."""
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float | None, now: float | None = None) -> str:
    """``3 min ago`` / ``in 2 h`` ("" for None)."""
    if seconds is None:
        return ""
    delta = (time.time() if now is None else now) - seconds
    text = _span(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def duration(seconds: float) -> str:
    """A queue's latency: ``0 s``, ``12 s``, ``3 min``."""
    return _span(max(seconds, 0.0))


# -- history chart ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    """One day of the history chart (SVG units; the template draws it)."""

    day: str
    processed: int
    failed: int
    x: float
    processed_height: float
    failed_height: float


CHART_HEIGHT = 160.0
CHART_BAR = 14.0


def history_bars(processed: Mapping[str, int], failed: Mapping[str, int]) -> list[Bar]:
    """Bars for each day, oldest first, scaled to the busiest day."""
    days = sorted(processed)
    top = max([1, *processed.values(), *failed.values()])
    scale = CHART_HEIGHT / top
    return [Bar(day, processed[day], failed.get(day, 0), index * (CHART_BAR + 4),
                processed[day] * scale, failed.get(day, 0) * scale)
            for index, day in enumerate(days)]


def realtime_points(series: Sequence[tuple[str, int]]) -> list[tuple[float, int]]:
    """Exq's per-second counters (``"YYYY-MM-DD HH:MM:SSZ"``) as (Unix seconds, count)."""
    points: list[tuple[float, int]] = []
    for stamp, count in series:
        try:
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue  # a key of another writer's form: not charted
        points.append((at.timestamp(), count))
    return points
