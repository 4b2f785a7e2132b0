"""``AckWriter``: the ack of every job, with its retry/dead writes and the counters,
in one atomic batch at a time.

This is where the at-least-once guarantee is kept. A job is **acked** when the
batch holding its ``LREM`` from this node's backup list is applied in Redis;
until then it is in the backup list and runs again after a crash.

Worker threads never talk to Redis on the success path. They hand their
``InFlight`` records over (``job_started``, ``job_done``: a deque append); the
``exq-stats`` thread turns what accumulated into one batch -- at most
``stats_batch_size`` finished jobs, flushed ``stats_flush_interval`` ms after
work appears -- sent as one ``APPLY_BATCH`` script call. A batch holds, in
order:

1. ``HSET <node>:workers`` for jobs still running that are not recorded yet
   (a job that starts and ends between two flushes needs no record at all);
2. every finished job's ``Outcome.writes`` (retry/dead/snooze entries), then
   the **acks** (``ACK``: ``LREM -1`` of the exact fetched bytes, one command
   per backup list), then one ``HDEL`` of the in-progress records of the jobs
   that ended. A job whose outcome is not acked (terminated, or an internal
   error) gets neither writes nor an ack;
3. the counters, aggregated: ``INCRBY`` of ``stat:processed|failed``, the
   per-day key and the per-second ``_rt`` key (``EXPIRE 120``).

A crash before the batch is applied (process killed between the end of the job
and the flush) leaves the job in the backup list: it runs again at the next
start, or through a live node's heartbeat monitor.

A failed flush (Redis down, OOM, timeout) keeps the batch and retries it with
backoff; the batch id makes a retry after a lost reply a no-op, so the counts
in Redis converge exactly once Redis is back. Meanwhile finished jobs pile up
behind it, unacked: the fetcher, told of every batch that lands (a
``BatchListener``), stops fetching once ``batch_size`` of them wait (see
``fetcher.Fetcher._held_back``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import redis

from . import scripts
from .background import ErrorHook
from .inflight import InFlight
from .job import encode, now_seconds
from .keys import RT_STAT_TTL, Keys, StatKind
from .store.fetch import ack_command

logger = logging.getLogger("exq_fast")

T = TypeVar("T")

FIELDS_PER_COMMAND = 1000
"""Most fields in one HSET or HDEL of a batch: Lua's unpack() takes 8000 values,
and the batch script unpacks each command's arguments."""

_json_str: Callable[[str], str] = json.encoder.encode_basestring
"""A str as a JSON string, non-ASCII left raw (``json.dumps(ensure_ascii=False)``)."""


class BatchListener(Protocol):
    """Told of every batch that reached Redis (the fetcher and the metrics)."""

    def batch_applied(self, done: Sequence[InFlight], seconds: float) -> None:
        """``done``: the finished jobs the batch held; ``seconds``: the flush's duration."""


class _Batch:
    """One batch under construction or awaiting a retry."""

    def __init__(self, batch_id: str, marker: str) -> None:
        self._keys = scripts.ScriptKeys(marker)  # APPLY_BATCH's KEYS: the marker, each key
        self.args: list[Any] = [batch_id]  # APPLY_BATCH's ARGV: the id, then the commands
        self.counts: dict[StatKind, int] = {"processed": 0, "failed": 0}
        self.done: list[InFlight] = []

    @property
    def keys(self) -> list[str]:
        """APPLY_BATCH's KEYS."""
        return self._keys.keys

    def add(self, command: Sequence[Any]) -> None:
        """Add ``(name, key, arg...)``: its one key goes to KEYS, its position in ARGV."""
        self.args += (len(command), command[0], self._keys.position(command[1]))
        self.args.extend(command[2:])


class AckWriter:
    """The ``exq-stats`` thread and the records that feed it. See the module doc."""

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
        self.listeners = tuple(listeners)
        self.totals: dict[StatKind, int] = {"processed": 0, "failed": 0}
        # Each job comes twice: in _started when it starts, in _done when it ends
        # (record.ended set first). Plain deque appends: no lock on the workers' side.
        self._started: deque[InFlight] = deque()
        self._done: deque[InFlight] = deque()
        self._retry: _Batch | None = None
        self._ids = (f"{uuid.uuid4().hex[:12]}-{n}" for n in itertools.count())
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- called by worker threads --------------------------------------------

    def job_started(self, record: InFlight) -> None:
        """Note a running job (its record is written only if it outlives a flush)."""
        self._started.append(record)

    def job_done(self, record: InFlight) -> None:
        """Queue a finished job (its ``outcome`` set) for the next batch."""
        if self._closed:
            # Stopped already (the job outlived shutdown_timeout): no ack, so
            # the job stays in the backup list and runs again from there.
            return
        record.ended = True
        self._done.append(record)
        if not self._wake.is_set():  # one wake-up per batch, not per job
            self._wake.set()

    def pending(self) -> int:
        """Finished jobs whose batch is not yet applied in Redis (a gauge for metrics
        and tests)."""
        return len(self._done) + (len(self._retry.done) if self._retry else 0)

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
            if not self._done and not self._started and self._retry is None:
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
            skipped = scripts.apply_batch(self.client, batch.keys, batch.args)
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
        if self.on_error is not None:
            self.on_error("stats_flush", exc)

    def _applied(self, batch: _Batch, seconds: float = 0.0) -> None:
        """The batch is in Redis: its jobs are acked. Tell the listeners."""
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
        records = self._to_record()
        if not done and not records:
            return None
        batch = _Batch(next(self._ids), self.marker_key)
        for chunk in _chunks(records, FIELDS_PER_COMMAND):
            fields: list[Any] = ["HSET", self.workers_key]
            for record in chunk:
                fields += (record.field, _progress(record, self.node_id))
                record.written = True
            batch.add(fields)
        acks: dict[str, list[bytes]] = {}
        forget: list[str] = []
        for record in done:
            self._add_done(batch, record, acks)
            if record.written:
                forget.append(record.field)
        # Every job's writes went first; then the acks, one command per backup list,
        # and the records of the jobs that ended.
        for backup, raws in acks.items():
            batch.add(ack_command(backup, raws))
        for names in _chunks(forget, FIELDS_PER_COMMAND):
            batch.add(("HDEL", self.workers_key, *names))
        self._add_counts(batch, now_seconds())
        return batch

    def _to_record(self) -> list[InFlight]:
        """The jobs started since the last batch that still run: they outlived a flush
        and get their record now (one that ended already never gets one). Only the
        jobs started since then are looked at, not every running job."""
        started, records = self._started, []
        while started:
            record = started.popleft()
            if not record.ended:
                records.append(record)
        return records

    def _drain(self) -> list[InFlight]:
        """At most ``batch_size`` finished jobs, oldest first."""
        done, pop = self._done, self._done.popleft
        count = min(len(done), self.batch_size)
        return [pop() for _ in range(count)]

    def _add_done(self, batch: _Batch, record: InFlight, acks: dict[str, list[bytes]]) -> None:
        outcome = record.outcome
        # The decision to ack: an outcome that acks (every status but terminated).
        # No outcome (an internal error) or a terminated job: no write and no ack,
        # the job stays in the backup list and runs again.
        if outcome is not None and outcome.ack:
            for command in outcome.writes:
                batch.add(command)
            raws = acks.get(record.backup)
            if raws is None:
                raws = acks[record.backup] = []
            raws.append(record.raw)  # its ack, sent below
            stat = outcome.stat
            if stat is not None:
                batch.counts[stat] += 1
        batch.done.append(record)

    def _add_counts(self, batch: _Batch, at: float) -> None:
        for kind, count in batch.counts.items():
            if not count:
                continue
            rt = self.keys.stat_rt(kind, at)
            batch.add(("INCRBY", self.keys.stat(kind), count))
            batch.add(("INCRBY", rt, count))
            batch.add(("EXPIRE", rt, RT_STAT_TTL))
            batch.add(("INCRBY", self.keys.stat_day(kind, at), count))


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _progress(record: InFlight, host: str) -> bytes:
    """Exq's in-progress JSON (docs/wire-format.md §8.3); ``payload`` is the job as fetched.

    The same bytes as ``job.encode`` of the dict, put together by hand: one is
    written for every job that outlives a flush, and ``json.dumps`` of a dict
    costs several times as much."""
    try:
        return (f'{{"host":{_json_str(host)},'
                f'"payload":{_json_str(record.raw.decode("utf-8", "replace"))},'
                f'"pid":{_json_str(record.field)},"queue":{_json_str(record.queue)},'
                f'"run_at":{float(record.run_at)!r}}}').encode()
    except UnicodeEncodeError:  # a lone surrogate in a name: encode() escapes it
        return encode({"host": host, "payload": record.raw.decode("utf-8", "replace"),
                       "pid": record.field, "queue": record.queue, "run_at": record.run_at})
