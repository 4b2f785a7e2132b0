"""One record per job in flight, and the tracking of fetched jobs until their ack.

``InFlight`` is the one record of a job this node has fetched and not yet seen
acked. The fetcher creates it with the exact fetched bytes; the worker fills in
what it learns while running the job (its decoded ``Job``, its worker, its time
guard, its task, its ``Outcome``); the ack writer puts its ack in a batch; the
node pinger, ``cancel``, the metrics and the stop read it. Nothing else
describes a running job.

``InFlightJobs`` remembers which fetched jobs have not been acked yet, per
queue, so that:

* the fetcher can pause while too many finished jobs wait for their ack
  (``unacked``, read by ``Fetcher.finished_unacked``; the bound is stated in
  ``fetcher.Fetcher._held_back``);
* a fetch whose reply was lost can be reconciled (``orphans``): whatever sits in
  the backup list and is not tracked was moved there by the lost call;
* a re-subscribe recovers a queue's backup list only while none of its jobs is
  in flight (Exq #310).

``Quarantine`` runs the quarantined suspects (one crash from the dead set, see
``store.recovery.RecoveryPolicy``) one at a time.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    from .job import Job
    from .outcome import Outcome
    from .registry import WorkerSpec
    from .timeouts import Deadline


class InFlight:
    """A job this node fetched, from the fetch to the batch holding its ack."""

    __slots__ = ("backup", "deadline", "duration", "ended", "job", "job_class", "latency",
                 "outcome", "quarantined", "queue", "raw", "run_at", "seq", "spec", "started",
                 "suspect", "task", "written")

    def __init__(self, raw: bytes, queue: str, backup: str) -> None:
        self.raw = raw
        """The job exactly as fetched: what the ack removes from the backup list."""
        self.queue = queue
        self.backup = backup
        """The backup list the fetch moved it to (``queue:backup::<node>::<queue>``)."""
        self.suspect = False
        """Recovered from a backup list before (poison detection; the fetcher sets it)."""
        self.quarantined = False
        """One crash from the dead set: run alone (see ``Quarantine``)."""
        self.seq = 0
        """Its number on this node, from 1, given when it starts (0 before)."""
        self.run_at = 0.0
        """When it started, float seconds since the epoch."""
        self.started = 0.0
        """When it started, ``time.perf_counter()``."""
        self.duration = 0.0
        """Seconds from start to end (set when it ends)."""
        self.job: Job | None = None
        """The decoded job (None until decoded, or for a payload that is not a job).
        ``job``, ``spec``, ``deadline`` and ``task`` are let go when the job ends:
        a finished record keeps only what its ack and the metrics need."""
        self.spec: WorkerSpec | None = None
        """The worker that runs it (None until resolved, or when no worker knows it)."""
        self.job_class = "unknown"
        """The worker's name for the metrics (set when resolved), ``"unknown"`` when
        no worker here knows the job."""
        self.latency: float | None = None
        """Seconds from enqueue to start, for a first attempt only (set when decoded)."""
        self.deadline: Deadline | None = None
        """Its time guard while its worker runs (see ``timeouts``)."""
        self.task: asyncio.Task[Any] | None = None
        """Its task on the node's event loop (an async job, once started)."""
        self.outcome: Outcome | None = None
        """What became of it (None while it runs; still None after an internal error)."""
        self.ended = False
        """Set when the job has ended and its record went to the ack writer."""
        self.written = False
        """Whether the ack writer wrote its in-progress record (``<node>:workers``)."""

    @property
    def field(self) -> str:
        """Exq's pid field ``#PID<0.N.0>`` (N: ``seq``), unique on this node; empty
        before the job starts. Made when read: only jobs that outlive a flush and
        the node pings need it."""
        return f"#PID<0.{self.seq}.0>" if self.seq else ""

    @property
    def jid(self) -> str | None:
        """The job's jid, once decoded."""
        return self.job.jid if self.job is not None else None

    def release(self) -> None:
        """The job has ended: let go of what only its run needed (the decoded job
        and its args, the worker, the time guard, the task), so that a record
        waiting for its batch holds little (fewer objects for the garbage
        collector to promote while acks are in flight)."""
        self.job = self.spec = self.deadline = self.task = None


class InFlightJobs:
    """The fetched jobs whose ack has not reached Redis, per queue (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: dict[str, Counter[bytes]] = {}
        self._count = 0

    def fetched(self, queue: str, jobs: Iterable[bytes]) -> None:
        """Track jobs just moved into this node's backup list of ``queue``."""
        jobs = list(jobs)
        with self._lock:
            self._raw.setdefault(queue, Counter()).update(jobs)
            self._count += len(jobs)

    def acked(self, records: Sequence[InFlight]) -> None:
        """Forget jobs whose batch reached Redis, acked or not (a terminated job
        stays in the backup list on purpose and is not waited for)."""
        with self._lock:
            self._count = max(self._count - len(records), 0)
            by_queue = self._raw
            for record in records:
                outcome = record.outcome
                if outcome is None or not outcome.ack:
                    continue  # its bytes stay in the backup list: still tracked
                tracked = by_queue.get(record.queue)
                if tracked is not None:
                    raw = record.raw
                    left = tracked.get(raw, 0) - 1
                    if left > 0:
                        tracked[raw] = left
                    else:
                        tracked.pop(raw, None)

    def unacked(self) -> int:
        """Jobs fetched whose batch has not reached Redis (running ones included)."""
        with self._lock:
            return self._count

    def any_of(self, queue: str) -> bool:
        """Whether a job of ``queue`` is tracked here (running, or awaiting its ack)."""
        with self._lock:
            return bool(self._raw.get(queue))

    def orphans(self, queue: str, read_backup: Callable[[], list[bytes]]) -> list[bytes]:
        """The jobs in the queue's backup list (``read_backup``, one Redis read) that
        are not tracked: moved there by a fetch whose reply was lost."""
        # Read under the lock: an ack landing between the read and the comparison
        # would make an acked job look lost (listed, no longer tracked) and run it
        # twice. The lock is held only after a failed fetch, for one LRANGE.
        with self._lock:
            present = Counter(read_backup())
            return list((present - self._raw.get(queue, Counter())).elements())


Submit = Callable[..., object]
"""Runs a callable with its arguments on a worker thread (``pool.WorkerPool.submit``)."""


class Pool(Protocol):
    """Threads that run calls (``pool.WorkerPool``)."""

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a thread of the pool."""

    def submit_all(self, fn: Callable[[Any], object], items: Sequence[Any]) -> None:
        """Run ``fn(item)`` for each item, each on a thread of the pool."""


Dispatch = Callable[[Sequence[InFlight]], None]
"""Hands the records of one fetch to worker threads (``WorkerServer.dispatch``)."""

JobHook = Callable[[InFlight], None]
"""Called with one job's record: ``run_job`` (runs the job on an executor thread;
``WorkerServer.run``) and ``on_end`` (the job has ended; ``Fetcher.job_ended``)."""


class Quarantine:
    """Runs quarantined jobs one at a time.

    A job that crashed its node on every recent run is run alone among the
    quarantined, so that if this node dies now, the next recovery counts only
    the job that was actually running -- not the ones that merely shared a
    fetch with it. The waiting ones sit fetched, in the backup list.
    """

    def __init__(self, submit: Submit, run_job: JobHook) -> None:
        self._submit = submit
        self._run_job = run_job
        self._held: deque[InFlight] = deque()
        self._lock = threading.Lock()
        self._busy = False

    def put(self, record: InFlight) -> None:
        """Run ``record`` once no other quarantined job runs."""
        with self._lock:
            self._held.append(record)
            if self._busy:
                return
            self._busy = True
        self.ended()

    def ended(self) -> None:
        """A quarantined job has ended (an async one after its coroutine): start the next."""
        with self._lock:
            if not self._held:
                self._busy = False
                return
            record = self._held.popleft()
        self._submit(self._run_job, record)
