"""Job time limits: one watchdog thread for every job of a node that has one.

A job's limit is, first found: its payload's ``timeout`` field (the enqueue
option), its worker's ``@worker(timeout=)``, the config's ``job_timeout``;
none means no limit (the job is never put on the watchdog).

When a limit passes, the watchdog fires the job's ``Deadline`` once:

* ``current_job().cancelled`` turns true first, so cooperative code that polls
  it can stop cleanly;
* a sync job then gets ``JobTimeout`` raised in its thread
  (``PyThreadState_SetAsyncExc``, as dramatiq's time limit), delivered at the
  thread's next Python bytecode;
* an async job's task is cancelled.

Either way the job fails with ``error_class`` ``JobTimeout`` and follows the
retry rule (the worker server maps the outcome, see ``worker``).

The exception may only land inside the job. ``Deadline.leave()``, called by
the worker thread as the job's function returns, takes the same lock as the
watchdog's fire: after it, no exception is raised into the thread, and one
raised but not yet delivered is withdrawn (or absorbed by the caller's retry
loop, see ``WorkerServer``).

The same guard serves a node's stop: every job run on a thread has a
``Deadline`` (with no limit when it has none), and ``Deadline.interrupt``
raises ``NodeStopped`` through the same window in the jobs still running once
they are back in their queues (see ``WorkerServer.interrupt_running``).

A job that ignores its timeout (a C call that never returns, a coroutine that
swallows the cancellation) keeps its slot -- Python cannot take the thread
back -- but ``STUCK_AFTER`` seconds after the fire it is reported: a warning,
the ``exq_jobs_stuck`` gauge, and the ``stuck`` count of the node's record
that ``exq-fast processes`` shows. When it does end, it fails as a timeout.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("exq_fast")

__all__ = ["STUCK_AFTER", "Deadline", "JobTimeout", "NodeStopped", "Watchdog"]

STUCK_AFTER = 2.0
"""Seconds after its timeout fired that a job still running is reported as stuck."""


class JobTimeout(Exception):
    """A job ran longer than its time limit."""

    def __init__(self, seconds: float | None = None) -> None:
        text = "job timed out" if seconds is None else f"job timed out after {seconds:g} s"
        super().__init__(text)
        self.seconds = seconds


class NodeStopped(Exception):
    """Raised in a job still running when its node has stopped (after the shutdown
    timeout): the job was put back at the front of its queue, so it must not
    run on to its end here -- as Sidekiq raises ``Sidekiq::Shutdown``."""

    def __init__(self) -> None:
        super().__init__("the node stopped while the job ran: it was put back in its queue")


INTERRUPTS = (JobTimeout, NodeStopped)
"""What a job's thread may receive from outside while it runs."""


class Cancellable(Protocol):
    """The job a deadline guards: ``cancelled`` is what cooperative code polls."""

    cancelled: bool


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in thread ``thread_id`` at its next bytecode; ``None`` withdraws
    one not yet delivered. Returns how many thread states were changed."""
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None))


class Deadline:
    """The guard of one job run on a thread: its time limit if it has one, and the
    window in which an exception may be raised into that thread (see the module
    doc). Made in the job's thread; a limit is armed with ``Watchdog.arm``."""

    __slots__ = ("_lock", "at", "cancel_async", "done", "fired", "inside", "interrupted", "job",
                 "seconds", "stuck", "thread_id")

    def __init__(self, seconds: float | None, job: Cancellable) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds if seconds is not None else float("inf")
        self.job = job
        self.thread_id = threading.get_ident()
        self.inside = True
        """The job's thread is inside the job's function (a sync exception may land)."""
        self.cancel_async: Callable[[], None] | None = None
        """Set once the job runs as a coroutine: cancels its task."""
        self.fired = False
        """The time limit passed."""
        self.interrupted = False
        """The node stopped while the job ran (see ``interrupt``)."""
        self.done = False
        self.stuck = False
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        """The job, for log lines."""
        return repr(self.job)

    def leave(self) -> None:
        """The job's function returned: no exception is raised into the thread from
        now on, and a pending one is withdrawn. May itself raise that pending
        exception once: call it until it returns (see the module doc)."""
        with self._lock:
            self.inside = False
            if self.fired or self.interrupted:
                _set_async_exc(self.thread_id, None)

    def interrupt(self) -> bool:
        """Raise ``NodeStopped`` in the job's thread if it is inside the job (its
        ``cancelled`` turns true first). True if it was."""
        with self._lock:
            if not self.inside or self.done or self.fired or self.interrupted:
                return False
            self.interrupted = True
            self.job.cancelled = True
            _set_async_exc(self.thread_id, NodeStopped)
            return True

    def attach(self, cancel: Callable[[], None]) -> None:
        """The job runs on as a coroutine: ``cancel`` cancels its task (at once when
        the limit passed already)."""
        with self._lock:
            self.cancel_async = cancel
            fired = self.fired
        if fired:
            cancel()

    def fire(self) -> None:
        """The limit passed: mark the job cancelled, then interrupt it (once)."""
        with self._lock:
            if self.fired or self.done or self.interrupted:
                return
            self.fired = True
            self.job.cancelled = True
            if self.inside:
                _set_async_exc(self.thread_id, JobTimeout)
            cancel = self.cancel_async
        if cancel is not None:
            cancel()
        # Else: between the sync call and its coroutine's start; ``attach`` cancels.


class Watchdog:
    """Fires deadlines when due and reports the jobs that outlive them."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stuck: set[Deadline] = set()
        """Jobs that ignored their timeout and still run."""

    def arm(self, deadline: Deadline) -> None:
        """Watch ``deadline``, made by the thread about to run its job."""
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._loop, name="exq-watchdog",
                                                daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            self._cond.notify()

    def finish(self, deadline: Deadline) -> None:
        """The job ended (however): its deadline is void, it is no longer stuck."""
        deadline.done = True
        if deadline.stuck:
            with self._cond:
                self.stuck.discard(deadline)
            logger.warning("%s ended %.1f s after its timeout", deadline.description,
                           time.monotonic() - deadline.at)

    def stuck_count(self) -> int:
        """Jobs running now that ignored their timeout."""
        return len(self.stuck)

    def stop(self) -> None:
        """Stop the thread; deadlines left never fire."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
                if due is None:
                    return
            self._handle(*due)

    def _next_due(self) -> tuple[Deadline, bool] | None:
        """Wait for the next due entry: (deadline, is it the stuck check)."""
        while not self._stopping:
            now = time.monotonic()
            while self._heap and self._heap[0][2].done:
                heapq.heappop(self._heap)  # ended in time: dropped when it surfaces
            if self._heap and self._heap[0][0] <= now:
                at, _, deadline = heapq.heappop(self._heap)
                return deadline, at > deadline.at
            self._cond.wait(self._heap[0][0] - now if self._heap else None)
        return None

    def _handle(self, deadline: Deadline, stuck_check: bool) -> None:
        if stuck_check:
            self._report_stuck(deadline)
            return
        try:
            deadline.fire()
        except Exception:  # the watchdog must outlive any single job
            logger.exception("could not interrupt %s at its timeout", deadline.description)
        with self._cond:
            heapq.heappush(self._heap, (deadline.at + STUCK_AFTER, next(self._seq), deadline))

    def _report_stuck(self, deadline: Deadline) -> None:
        with self._cond:
            if deadline.done:
                return
            deadline.stuck = True
            self.stuck.add(deadline)
            count = len(self.stuck)
        # Python cannot take the thread back: the slot stays taken until it ends.
        logger.warning("%s ignored its timeout of %g s and still runs (its slot stays "
                       "taken; %d such job(s) on this node)", deadline.description,
                       deadline.seconds, count)
