"""Rendering for the operator CLI: aligned tables, ISO times, truncation, JSON records.

Pure functions: nothing here talks to Redis or prints. Tables are for people
(times to the second, long text cut with an ellipsis, one line per row); the
JSON records are for programs (every field, times as ISO 8601 with microseconds,
zset scores as the exact float stored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .admin import Entry, NodeInfo, ProcessInfo, Stats
from .config import scrub
from .nodes import Backup
from .retry import decode_backtrace

ARGS_WIDTH = 40
"""Characters of a job's args shown in a table."""
MESSAGE_WIDTH = 50
"""Characters of an error message shown in a table."""
BACKTRACE_INDENT = "    "
"""What a backtrace line is indented by under its job's row (``--backtrace``)."""
ELLIPSIS = "…"


# -- text ------------------------------------------------------------------------------


def iso_time(seconds: float | None, *, precise: bool = False) -> str | None:
    """``seconds`` (Unix time) as ISO 8601 UTC with a ``Z``: to the second, or to the
    microsecond when ``precise``. None stays None; a value no calendar holds is
    returned as its number."""
    if seconds is None:
        return None
    try:
        when = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return repr(seconds)
    spec = "microseconds" if precise else "seconds"
    return when.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def truncate(text: str, width: int) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space),
    cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + ELLIPSIS


def duration(seconds: float) -> str:
    """A short human duration: ``0.4s``, ``12s``, ``5m02s``, ``3h07m``, ``2d04h``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size}{unit}{(whole % size) // sub_size:02d}{sub}"
    return f"{whole}s"


def mask_url(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@`` or ``?password=``) replaced by ***,
    the rest of the text as given."""
    return scrub(url)


def one_line(text: str) -> str:
    """``text`` with its line breaks turned into spaces."""
    return " ".join(text.splitlines()) if text else text


# -- tables ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its title, and whether its cells are right-aligned (numbers)."""

    title: str
    right: bool = False


def cell(value: object) -> str:
    """How a value reads in a table cell: None and "" as ``-``, bools as yes/no."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return one_line(str(value))


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[object]]) -> str:
    """Rows under their column titles, each column as wide as its widest cell, two
    spaces apart; ``(none)`` under the titles when there is no row."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c.title)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [_line([c.title for c in columns], columns, widths)]
    lines += [_line(r, columns, widths) for r in cells] or ["(none)"]
    return "\n".join(lines)


def _line(values: Sequence[str], columns: Sequence[Column], widths: Sequence[int]) -> str:
    padded = (v.rjust(w) if c.right else v.ljust(w)
              for v, c, w in zip(values, columns, widths, strict=True))
    return "  ".join(padded).rstrip()


def render_pairs(pairs: Sequence[tuple[str, object]]) -> str:
    """``label  value`` lines, labels padded to one width and values right-aligned."""
    label_width = max((len(label) for label, _ in pairs), default=0)
    value_width = max((len(cell(value)) for _, value in pairs), default=0)
    return "\n".join(f"{label.ljust(label_width)}  {cell(value).rjust(value_width)}"
                     for label, value in pairs)


def to_json(value: object) -> str:
    """``value`` as indented JSON text (non-ASCII kept; anything odd as its str)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


# -- records ---------------------------------------------------------------------------


def _payload(entry: Entry | ProcessInfo) -> dict[str, Any] | None:
    if entry.job is None:
        return None
    try:
        return entry.job.to_dict()
    except (ValueError, AssertionError):
        return None


def _raw_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _time_field(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value / 1000 if value > 1e11 else float(value)  # Sidekiq 8 writes millis


def _str_field(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    return value if isinstance(value, str) else None


def backtrace_of(payload: Mapping[str, Any]) -> list[str] | None:
    """The lines of a payload's ``error_backtrace`` (Sidekiq's compressed form or a
    plain array), innermost first; None when it has none or it is unreadable."""
    return decode_backtrace(payload.get("error_backtrace"))


def entry_record(entry: Entry) -> dict[str, Any]:
    """A queue job or set entry for ``--json``: its main fields, the whole payload, and
    for a set entry the exact score and its ISO time. A member that is not a job has
    ``payload: null`` and its bytes as ``raw``."""
    payload = _payload(entry) or {}
    job = entry.job
    record: dict[str, Any] = {}
    if entry.score is not None:
        record.update(score=entry.score, at=iso_time(entry.score, precise=True))
    record.update({
        "jid": entry.jid, "class": job.job_class if job else None,
        "queue": job.queue if job else None, "args": payload.get("args"),
        "enqueued_at": iso_time(_time_field(payload, "enqueued_at"), precise=True)})
    if entry.score is not None:
        record.update({
            "retry_count": job.retry_count if job else None,
            "error_class": _str_field(payload, "error_class"),
            "error_message": _str_field(payload, "error_message"),
            "failed_at": iso_time(_time_field(payload, "failed_at"), precise=True),
            "error_backtrace": backtrace_of(payload)})
    record["payload"] = payload if job is not None else None
    if job is None:
        record["raw"] = _raw_text(entry.raw)
    return record


def node_record(node: NodeInfo) -> dict[str, Any]:
    """A node for ``--json``: every NodeInfo field, times as ISO 8601."""
    return {
        "identity": node.identity, "hostname": node.hostname, "pid": node.pid,
        "started_at": iso_time(node.started_at, precise=True), "queues": list(node.queues),
        "busy": node.busy, "quiet": node.quiet, "concurrency": node.concurrency,
        "beat": iso_time(node.beat, precise=True), "source": node.source,
        "labels": list(node.labels), "tag": node.tag, "version": node.version,
        "stuck": node.stuck,
    }


def process_record(process: ProcessInfo) -> dict[str, Any]:
    """A running job for ``--json``: node, record field, queue, start time and the job."""
    payload = _payload(process)
    return {
        "node": process.node, "field": process.field, "queue": process.queue,
        "run_at": iso_time(process.run_at, precise=True), "jid": process.jid,
        "class": process.job.job_class if process.job else None,
        "args": payload.get("args") if payload else None, "payload": payload,
    }


def stats_record(stats: Stats, processed: Mapping[str, int],
                 failed: Mapping[str, int]) -> dict[str, Any]:
    """The dashboard numbers and the per-day counts (newest day first) for ``--json``."""
    return {
        "processed": stats.processed, "failed": stats.failed, "retries": stats.retry_size,
        "scheduled": stats.scheduled_size, "dead": stats.dead_size,
        "enqueued": stats.enqueued, "busy": stats.busy, "processes": stats.processes,
        "in_flight": stats.in_flight,
        "days": [{"date": day, "processed": count, "failed": failed.get(day, 0)}
                 for day, count in processed.items()],
    }


# -- tables of records -----------------------------------------------------------------


def stats_table(stats: Stats, processed: Mapping[str, int], failed: Mapping[str, int]) -> str:
    """The dashboard numbers, then (if any days were asked) a per-day table."""
    text = render_pairs([
        ("processed", stats.processed), ("failed", stats.failed),
        ("retries", stats.retry_size), ("scheduled", stats.scheduled_size),
        ("dead", stats.dead_size), ("enqueued", stats.enqueued), ("busy", stats.busy),
        ("processes", stats.processes), ("in flight", stats.in_flight)])
    if not processed:
        return text
    days = render_table([Column("DATE"), Column("PROCESSED", True), Column("FAILED", True)],
                        [(day, n, failed.get(day, 0)) for day, n in processed.items()])
    return f"{text}\n\n{days}"


def queues_table(rows: Sequence[tuple[str, int, float, int]]) -> str:
    """``(name, size, latency seconds, jobs in flight)`` rows."""
    return render_table([Column("QUEUE"), Column("SIZE", True), Column("LATENCY", True),
                         Column("IN FLIGHT", True)],
                        [(name, size, duration(latency), flight)
                         for name, size, latency, flight in rows])


def backups_table(backups: Sequence[Backup]) -> str:
    """The backup lists: node, its state, queue, jobs in flight."""
    return render_table([Column("NODE"), Column("STATE"), Column("QUEUE"), Column("JOBS", True)],
                        [(b.node_id, b.state, b.queue, b.size) for b in backups])


def backup_record(backup: Backup) -> dict[str, Any]:
    """One backup list for ``--json``."""
    return {"node": backup.node_id, "state": backup.state, "queue": backup.queue,
            "jobs": backup.size}


def jobs_table(entries: Sequence[Entry]) -> str:
    """The jobs of a queue page: jid, class, args (truncated), enqueued_at."""
    rows = []
    for entry in entries:
        payload = _payload(entry) or {}
        args = payload.get("args")
        rows.append((
            entry.jid, entry.job.job_class if entry.job else _not_a_job(entry),
            truncate(json.dumps(args, ensure_ascii=False), ARGS_WIDTH) if entry.job else None,
            iso_time(_time_field(payload, "enqueued_at"))))
    return render_table([Column("JID"), Column("CLASS"), Column("ARGS"), Column("ENQUEUED AT")],
                        rows)


def set_table(entries: Sequence[Entry], time_title: str, backtrace: bool = False) -> str:
    """A page of the retry/schedule/dead set: score time, jid, class, retry count,
    error class and error message (truncated); with ``backtrace``, each job's
    ``error_backtrace`` lines indented under its row."""
    table = _set_rows(entries, time_title)
    if not backtrace or not entries:
        return table
    header, *rows = table.split("\n")
    lines = [header]
    for entry, row in zip(entries, rows, strict=True):
        lines.append(row)
        lines += [BACKTRACE_INDENT + one_line(line)
                  for line in backtrace_of(_payload(entry) or {}) or []]
    return "\n".join(lines)


def _set_rows(entries: Sequence[Entry], time_title: str) -> str:
    rows = []
    for entry in entries:
        payload = _payload(entry) or {}
        message = _str_field(payload, "error_message")
        rows.append((
            iso_time(entry.score), entry.jid,
            entry.job.job_class if entry.job else _not_a_job(entry),
            entry.job.retry_count if entry.job else None, _str_field(payload, "error_class"),
            truncate(message, MESSAGE_WIDTH) if message else None))
    return render_table([Column(time_title), Column("JID"), Column("CLASS"),
                         Column("RETRIES", True), Column("ERROR"), Column("MESSAGE")], rows)


def nodes_table(nodes: Sequence[NodeInfo]) -> str:
    """The live nodes: identity, pid, busy (with ``(N stuck)`` when some of its jobs
    ignored their timeout), quiet, queues, started."""
    return render_table(
        [Column("NODE"), Column("PID", True), Column("BUSY", True), Column("QUIET"),
         Column("QUEUES"), Column("STARTED")],
        [(n.identity, n.pid, busy_cell(n), n.quiet, ",".join(n.queues),
          iso_time(n.started_at)) for n in nodes])


def busy_cell(node: NodeInfo) -> str:
    """A node's busy count, and its stuck jobs when there are any: ``3 (2 stuck)``."""
    return f"{node.busy} ({node.stuck} stuck)" if node.stuck else str(node.busy)


def running_table(processes: Sequence[ProcessInfo]) -> str:
    """The jobs in progress: node, queue, jid, class, run_at."""
    return render_table(
        [Column("NODE"), Column("QUEUE"), Column("JID"), Column("CLASS"), Column("RUN AT")],
        [(p.node, p.queue, p.jid, p.job.job_class if p.job else None, iso_time(p.run_at))
         for p in processes])


def _not_a_job(entry: Entry) -> str:
    return "(not a job: " + truncate(_raw_text(entry.raw), 30) + ")"
