"""``StatsWriter``: acks, stat counters and in-progress records, one batch at a time.

Worker threads never talk to Redis on the success path. They append events to
a deque; a flusher thread turns what accumulated into one atomic, idempotent
batch (``scripts.apply_batch``), at most ``stats_batch_size`` finished jobs per
batch, flushed ``stats_flush_interval`` ms after work appears. A batch holds,
in order:

1. ``HSET <node>:workers`` for jobs still running that are not recorded yet
   (a job that starts and ends between two flushes needs no record at all);
2. per finished job: its retry/dead/snooze writes, then its **ack**
   (``LREM`` of the exact fetched bytes from the backup list), then ``HDEL``
   of its in-progress record if one was written;
3. the counters, aggregated: ``INCRBY`` of ``stat:processed|failed``, the
   per-day key and the per-second ``_rt`` key (``EXPIRE 120``).

When a job is acked: when the batch holding its LREM is applied. A crash
before that (process killed between the end of ``perform`` and the flush)
leaves the job in the backup list: it runs again at the next start, or through
a live node's heartbeat monitor.

A failed flush (Redis down, OOM, timeout) keeps the batch and retries it with
backoff; the batch id makes a retry after a lost reply a no-op, so the counts
in Redis converge exactly once Redis is back. Meanwhile finished jobs pile up
behind it, unacked: the manager, told of every batch that lands (a
``BatchListener``), stops fetching once ``batch_size`` of them wait, so a
crash re-runs at most ``batch_size`` + the node's concurrency jobs
(``Manager._held_back``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

from . import scripts
from .job import encode, now_seconds
from .keys import RT_STAT_TTL, Keys, StatKind
from .retry import Command

logger = logging.getLogger("exq_fast")

ErrorHook = Callable[[str, BaseException], None]


class InFlight:
    """A job this node is running: what its in-progress record and ack need."""

    __slots__ = ("backup", "field", "jid", "queue", "raw", "run_at", "written")

    def __init__(self, field: str, queue: str, backup: str, raw: bytes, run_at: float) -> None:
        self.field = field
        self.queue = queue
        self.backup = backup
        self.raw = raw
        self.run_at = run_at
        self.jid: str | None = None
        self.written = False

    def record(self, host: str) -> bytes:
        """Exq's in-progress JSON (docs/wire-format.md §8.3); ``payload`` is the job as fetched."""
        return encode({
            "host": host,
            "payload": self.raw.decode("utf-8", "replace"),
            "pid": self.field,
            "queue": self.queue,
            "run_at": self.run_at,
        })


class Done:
    """A finished job: its writes (before the ack), whether to ack, which counter.

    ``job_class``, ``fate`` (``"retried"``, ``"dead"`` or None), ``duration``
    and ``latency`` are for the metrics, which move when the batch is applied.
    """

    __slots__ = ("ack", "duration", "fate", "flight", "job_class", "latency", "stat", "writes")

    def __init__(self, flight: InFlight, writes: Sequence[Command], ack: bool,
                 stat: StatKind | None, *, job_class: str = "unknown", fate: str | None = None,
                 duration: float = 0.0, latency: float | None = None) -> None:
        self.flight = flight
        self.writes = writes
        self.ack = ack
        self.stat = stat
        self.job_class = job_class
        self.fate = fate
        self.duration = duration
        self.latency = latency


class BatchListener(Protocol):
    """Told of every batch that reached Redis (the metrics mirror it)."""

    def batch_applied(self, done: Sequence[Done], seconds: float) -> None:
        """``done``: the finished jobs the batch held; ``seconds``: the flush's duration."""


class _Batch:
    """One batch under construction or awaiting a retry."""

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        self.args: list[Any] = [batch_id]
        self.counts: dict[StatKind, int] = {"processed": 0, "failed": 0}
        self.done: list[Done] = []

    @property
    def jobs(self) -> int:
        """Finished jobs in this batch."""
        return len(self.done)

    def add(self, command: Sequence[Any]) -> None:
        self.args.append(len(command))
        self.args.extend(command)


class StatsWriter:
    """The flusher thread and the events that feed it. See the module docstring."""

    def __init__(self, client: redis.Redis, keys: Keys, node_id: str, *,
                 flush_interval_ms: int = 5, batch_size: int = 2000,
                 on_error: ErrorHook | None = None,
                 listeners: Sequence[BatchListener] = ()) -> None:
        self.client = client
        self.keys = keys
        self.node_id = node_id
        self.workers_key = keys.workers(node_id)
        self.marker_key = keys.batch_marker(node_id)
        self.flush_interval = flush_interval_ms / 1000
        self.batch_size = batch_size
        self.on_error = on_error
        self.listeners = list(listeners)
        self.totals: dict[StatKind, int] = {"processed": 0, "failed": 0}
        self.errors = 0
        self._events: deque[InFlight | Done] = deque()
        self._running: dict[str, InFlight] = {}
        self._retry: _Batch | None = None
        self._ids = (f"{uuid.uuid4().hex[:12]}-{n}" for n in itertools.count())
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- called by worker threads --------------------------------------------

    def job_started(self, flight: InFlight) -> None:
        """Note a running job (its record is written only if it outlives a flush)."""
        self._events.append(flight)

    def job_done(self, done: Done) -> None:
        """Queue a finished job's writes, ack and counter for the next batch."""
        if self._closed:
            # Stopped already (the job outlived shutdown_timeout): no ack, so
            # the job stays in the backup list and runs again at next start.
            return
        self._events.append(done)
        self._wake.set()

    def pending(self) -> int:
        """Events not yet applied to Redis (a gauge for metrics and tests)."""
        return len(self._events) + (self._retry.jobs if self._retry else 0)

    # -- the flusher ---------------------------------------------------------

    def start(self) -> None:
        """Start the flusher thread."""
        self._thread = threading.Thread(target=self._loop, name="exq-stats", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread, then flush what is left, retrying until ``timeout``.

        Returns True when everything reached Redis.
        """
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            if not self.flush():
                time.sleep(0.05)
        self._closed = True
        if self.pending():
            return False
        self._forget_marker()
        return True

    def _forget_marker(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):  # it expires on its own
            self.client.delete(self.marker_key)

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            if not self._events and self._retry is None:
                self._wake.wait(0.25)
                self._wake.clear()
                continue
            time.sleep(backoff or self.flush_interval)
            backoff = 0.0 if self.flush() else min(max(backoff * 2, 0.01), 1.0)

    def flush(self) -> bool:
        """Send one batch (the one awaiting retry first). True on success or nothing to do."""
        batch = self._retry or self._build()
        if batch is None:
            return True
        started = time.perf_counter()
        try:
            skipped = scripts.apply_batch(self.client, [self.marker_key], batch.args)
        except Exception as exc:  # any failure: keep the batch, retry
            self._failed(batch, exc)
            return False
        if isinstance(skipped, int) and skipped > 0:
            logger.warning("stats batch: %d command(s) refused by Redis and skipped "
                           "(a key of the wrong type?)", skipped)
        self._applied(batch, time.perf_counter() - started)
        return True

    def _failed(self, batch: _Batch, exc: BaseException) -> None:
        if self._retry is None:
            logger.warning("stats flush failed, will retry: %s", exc)
        self._retry = batch
        self.errors += 1
        if self.on_error is not None:
            self.on_error("stats_flush", exc)

    def _applied(self, batch: _Batch, seconds: float = 0.0) -> None:
        if self._retry is not None:
            logger.warning("stats flush recovered")
        self._retry = None
        for kind, count in batch.counts.items():
            self.totals[kind] += count
        for listener in self.listeners:
            try:
                listener.batch_applied(batch.done, seconds)
            except Exception:  # a listener (metrics) must never stop acks
                logger.exception("batch listener failed")

    def _build(self) -> _Batch | None:
        done = self._drain()
        records = [f for f in self._running.values() if not f.written]
        if not done and not records:
            return None
        batch = _Batch(next(self._ids))
        for flight in records:
            batch.add(("HSET", self.workers_key, flight.field, flight.record(self.node_id)))
            flight.written = True
        for item in done:
            self._add_done(batch, item)
        self._add_counts(batch, now_seconds())
        return batch

    def _drain(self) -> list[Done]:
        done: list[Done] = []
        events = self._events
        while events and len(done) < self.batch_size:
            event = events.popleft()
            if isinstance(event, InFlight):
                self._running[event.field] = event
            else:
                # Started and ended within one flush: no record, no HDEL.
                self._running.pop(event.flight.field, None)
                done.append(event)
        return done

    def _add_done(self, batch: _Batch, item: Done) -> None:
        flight = item.flight
        for command in item.writes:
            batch.add(command)
        if item.ack:
            # Count -1: search from the tail, where the oldest fetched jobs sit.
            batch.add(("LREM", flight.backup, -1, flight.raw))
        if flight.written:
            batch.add(("HDEL", self.workers_key, flight.field))
        if item.stat is not None:
            batch.counts[item.stat] += 1
        batch.done.append(item)

    def _add_counts(self, batch: _Batch, at: float) -> None:
        for kind, count in batch.counts.items():
            if not count:
                continue
            rt = self.keys.stat_rt(kind, at)
            batch.add(("INCRBY", self.keys.stat(kind), count))
            batch.add(("INCRBY", rt, count))
            batch.add(("EXPIRE", rt, RT_STAT_TTL))
            batch.add(("INCRBY", self.keys.stat_day(kind, at), count))
