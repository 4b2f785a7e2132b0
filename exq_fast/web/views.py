"""What the web UI's pages show, as plain data for the templates: a job's fields
(``JobView``), times, job references, filters and the history chart.

Nothing here renders HTML: the templates do, with autoescape on, so a job's
bytes reach the page only as escaped text. A member that is not a job is
shown as its raw bytes (``JobView.raw_text``); nothing about it can break a
page.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..admin import Entry, JobSet, ProcessInfo
from ..job import to_seconds
from ..retry import decode_backtrace

__all__ = ["PAGE_SIZE", "Bar", "JobView", "Paging", "ago", "digest_of", "filtered_page",
           "history_bars", "iso", "job_view", "parse_ref", "running_view", "score_text"]

PAGE_SIZE = 25
"""Entries per page (Sidekiq Web's default)."""
MATCH_LIMIT = 10_000
"""Matches a filtered listing collects at most (the rest are not shown)."""
RAW_SHORT = 300
"""Characters of a member that is not a job shown in a listing (all on its page)."""
_SHORT = 120
_TIME_FIELDS = ("created_at", "enqueued_at", "failed_at", "retried_at")
_SCORE = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_INFINITE = re.compile(r"[-+]?inf")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class JobView:
    """One job (or one member that is not a job) as the pages show it."""

    member: str
    """What actions post to name this member: ``<digest>@<score>`` (a set) or
    ``<digest>@<index>`` (a queue); the server finds the exact bytes from it."""
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

    @property
    def raw_short(self) -> str:
        """``raw_text`` cut for a listing."""
        return _cut(self.raw_text, RAW_SHORT)

    @property
    def error_short(self) -> str:
        """``error_message`` cut for a listing."""
        return _cut(self.error_message, RAW_SHORT)

    @property
    def class_short(self) -> str:
        """``display_class`` cut for a listing."""
        return _cut(self.display_class, _SHORT)


def parse_ref(ref: str) -> tuple[str, str]:
    """``(digest, where)`` of a member reference; ``ValueError`` when it is not one."""
    digest, sep, where = ref.partition("@")
    if not sep or len(digest) != 16 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a job reference: {ref[:80]!r}")
    return digest, where


def score_text(text: str) -> str:
    """A score from a URL or a form, as Redis reads it; ``ValueError`` unless it is a
    number or +/-inf (``nan``, ``1_000``, ``0x10``, ``1e999`` are refused here, not
    by Redis)."""
    if _INFINITE.fullmatch(text):
        return text  # Redis keeps and finds entries scored +/-inf
    if not _SCORE.fullmatch(text) or not math.isfinite(float(text)):
        raise ValueError(f"not a score: {text[:40]!r}")
    return text


def digest_of(raw: bytes) -> str:
    """What names a member in a detail URL."""
    return hashlib.sha256(raw).hexdigest()[:16]


def job_view(entry: Entry, index: int | None = None) -> JobView:
    """The ``JobView`` of a set entry, or of the queue member at ``index``. A payload
    that cannot be shown as a job (a field no page can render) is shown as bytes."""
    raw = entry.raw
    digest = digest_of(raw)
    where = repr(entry.score) if entry.score is not None else str(index or 0)
    base: dict[str, Any] = {
        "member": f"{digest}@{where}", "digest": digest,
        "score": repr(entry.score) if entry.score is not None else None, "at": entry.score,
        "raw_text": raw.decode("utf-8", "backslashreplace")}
    payload = entry.to_dict()
    if entry.job is None or payload is None:
        return JobView(is_job=False, **base)
    try:
        return JobView(is_job=True, **base, **_payload_fields(payload, entry.job.job_class))
    except (ValueError, TypeError, RecursionError):
        return JobView(is_job=False, **base)


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
        "args_short": _cut(_json(args), _SHORT), "args_pretty": _json(args, indent=2),
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


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


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
        return cls(min(max(page, 1), cls(1, total).pages), total)


def matches(entry: Entry, needle: str) -> bool:
    """True if the entry's class (or wrapped class) contains ``needle`` (any case), or
    its jid contains it; a member that is not a job matches on its raw text."""
    # ASCII case only, as the ZSCAN glob: both find the same entries.
    low = needle.translate(_ASCII_LOWER)
    if entry.job is None:
        return low in entry.raw.decode("utf-8", "replace").translate(_ASCII_LOWER)
    payload = entry.to_dict() or {}
    names = [entry.job.job_class, payload.get("wrapped")]
    if any(isinstance(n, str) and low in n.translate(_ASCII_LOWER) for n in names):
        return True
    return entry.jid is not None and needle in entry.jid


def glob_for(needle: str) -> str | None:
    """A ZSCAN pattern the raw bytes of every match of ``needle`` match (any ASCII
    case), so Redis skips the rest; None (every entry is read) when the needle may be
    written escaped in JSON (``"``, ``\\``, ``/``, and ``<>&'``, which some writers
    escape). A class written with ``\\u`` escapes for plain letters is not found."""
    if not (needle.isascii() and needle.isprintable()) or any(
            c in needle for c in '"\\/<>&\''):
        return None
    parts = []
    for char in needle:
        if char.isalpha():
            parts.append(f"[{char.lower()}{char.upper()}]")
        elif char in "*?[]^-":
            parts.append("\\" + char)
        else:
            parts.append(char)
    return "*" + "".join(parts) + "*"


def filtered_page(jobset: JobSet, needle: str, page: str | None
                  ) -> tuple[list[Entry], Paging, bool]:
    """The requested page of the entries matching ``needle`` in listing order, their
    paging, and whether more than ``MATCH_LIMIT`` matched (then only that many are
    listed). Redis tests the glob; only what it returns is decoded here."""
    found: list[Entry] = []
    seen: set[bytes] = set()  # ZSCAN may return a member twice
    for candidate in jobset.scan(glob_for(needle)):
        if candidate.raw not in seen and matches(candidate, needle):
            seen.add(candidate.raw)
            found.append(candidate)
            if len(found) > MATCH_LIMIT:
                break
    capped = len(found) > MATCH_LIMIT
    found.sort(key=lambda e: e.score or 0.0, reverse=jobset.newest_first)
    found = found[:MATCH_LIMIT]
    paging = Paging.parse(page, len(found))
    return found[paging.offset:paging.offset + paging.size], paging, capped


# -- time ------------------------------------------------------------------------------


def iso(seconds: float | None) -> str:
    """UTC time to the second, ``2026-12-06 14:03:58 UTC`` ("" for None; a number no
    date can hold is shown as it is)."""
    if seconds is None:
        return ""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return repr(seconds)


def ago(seconds: float | None, now: float | None = None) -> str:
    """``3 min ago`` / ``in 2 h`` ("" for None)."""
    if seconds is None:
        return ""
    delta = (time.time() if now is None else now) - seconds
    if not math.isfinite(delta) or abs(delta) > 1e11:
        return "never" if delta < 0 else "long ago"
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
