"""``WorkerServer``: the life of one job (Exq's ``Worker.Server`` contract).

``run(raw, queue)`` is what the executor runs for each fetched job:

1. note the job as running (the stats writer records it if it outlives a flush);
2. ``before_work`` of each middleware in order (Job decodes and resolves the
   worker; a halt skips the rest, a terminate stops everything);
3. dispatch: ``perform(*args)`` on this thread, with ``current_job()`` set and
   the job's time limit armed (see ``timeouts``). When it returns a coroutine
   (``async def``), the coroutine goes to the node's event loop (see ``aio``)
   and this thread is free; steps 4 and 5 run on an executor thread when the
   coroutine ends. Until then the job holds its concurrency slot;
4. ``after_processed_work`` or ``after_failed_work`` of each middleware;
5. hand the pipeline's writes, ack and counter to the stats writer.

``run`` never raises: an exception from a job -- ``BaseException``s such as
``SystemExit`` and ``KeyboardInterrupt`` included -- fails that job; an
exception from a middleware hook is logged and, before dispatch, fails the job.
A job over its time limit fails with ``JobTimeout``; a cancelled one (Exq's
``CANCEL:`` signal, or ``task.cancel()`` of an async job) with ``Cancelled``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis

from .aio import EventLoop, await_any
from .job import Job, now_seconds
from .middleware import Middleware, Pipeline, Services
from .middleware.job import error_text
from .middleware.manager import release
from .stats import Done, InFlight
from .store.recovery import RECOVERY_TTL, RecoveryPolicy, job_digest
from .timeouts import INTERRUPTS, Deadline, JobTimeout, NodeStopped, Watchdog

logger = logging.getLogger("exq_fast")

_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("exq_fast_job",
                                                                      default=None)

Submit = Callable[[Callable[[], None]], object]
"""Runs a callable on an executor thread (``ThreadPoolExecutor.submit``)."""


class Cancelled(Exception):  # Exq's word
    """Raised for a job whose cancellation was requested (Exq's ``CANCEL:`` signal)."""

    def __init__(self) -> None:
        super().__init__("Canceled")


def current_job() -> Job | None:
    """The job being run by the calling thread or task, or None outside a job."""
    return _current.get()


class Running:
    """A job in progress on this node: what heartbeats, cancel and timeouts need."""

    __slots__ = ("deadline", "flight", "job", "on_end", "started", "task")

    def __init__(self, flight: InFlight) -> None:
        self.flight = flight
        self.job: Job | None = None
        self.started = time.perf_counter()
        self.deadline: Deadline | None = None
        self.task: asyncio.Task[Any] | None = None
        """The job's task on the node's event loop (an async job, once started)."""
        self.on_end: Callable[[], None] | None = None


def _leave(deadline: Deadline) -> None:
    """Close the window in which an exception may be raised into this thread.

    A ``JobTimeout`` or ``NodeStopped`` raised just before may land in here (at
    any bytecode): it is absorbed and ``leave`` called again, which withdraws
    nothing more (one is raised per job at most)."""
    while True:
        try:
            deadline.leave()
            return
        except INTERRUPTS:
            continue


class WorkerServer:
    """Runs jobs through the middleware chain; shared by all executor threads."""

    def __init__(self, services: Services, middleware: Sequence[Middleware], *,
                 submit: Submit | None = None, loop: EventLoop | None = None,
                 watchdog: Watchdog | None = None) -> None:
        """``submit`` runs the end of an async job on an executor thread (default:
        on the loop thread); ``loop`` and ``watchdog`` default to new ones."""
        self.services = services
        self.middleware = tuple(middleware)
        self.node_id = services.config.node_id
        self.default_timeout = services.config.job_timeout
        self.submit = submit
        self.loop = loop if loop is not None else EventLoop()
        self.watchdog = watchdog if watchdog is not None else Watchdog()
        self.running: dict[str, Running] = {}
        self._ids = itertools.count(1)
        self._unmarked = 0  # recovered jobs whose start mark Redis refused, this outage
        self._marks_lock = threading.Lock()

    def run(self, raw: bytes, queue: str, suspect: bool = False,
            on_end: Callable[[], None] | None = None) -> None:
        """Run one fetched job to its end (an async job: to its hand-over to the
        loop). Never raises.

        ``suspect``: the job was recovered from a backup before; it is marked
        started in Redis first, so that if it kills this process the next
        recovery counts it (poison detection, see ``store.recovery.RecoveryPolicy``).
        ``on_end`` is called when the job has ended, async jobs included.
        """
        flight = InFlight(f"#PID<0.{next(self._ids)}.0>", queue,
                          self.services.keys.backup(self.node_id, queue), raw, now_seconds())
        if suspect:
            self._mark_started(raw)
        running = self.running[flight.field] = Running(flight)
        running.on_end = on_end
        self.services.stats.job_started(flight)
        pipeline = Pipeline({"job_serialized": raw, "queue": queue, "host": self.node_id,
                             "services": self.services, "flight": flight})
        handed_over = False
        try:
            handed_over = self._run(pipeline, running, suspect)
        except BaseException:  # a bug must not kill the thread
            logger.exception("internal error while running a job; it stays in the backup list")
            pipeline.assigns["ack"] = False
        finally:
            if not handed_over:  # else the coroutine's end finishes it
                self._finish(pipeline, running, suspect)

    def _mark_started(self, raw: bytes) -> None:
        services = self.services
        try:
            services.redis.set(services.keys.started(job_digest(raw)), 1, ex=RECOVERY_TTL)
        except redis.exceptions.RedisError as exc:
            # Only poison detection loses a count (a crash now is not blamed on
            # this job): the job itself runs. Logged once per outage, not per job.
            with self._marks_lock:
                self._unmarked += 1
                first = self._unmarked == 1
            if first:
                logger.warning("could not mark recovered jobs as started (poison detection "
                               "is blind to them until Redis takes writes again): %s", exc)
            return
        if self._unmarked:
            with self._marks_lock:
                missed, self._unmarked = self._unmarked, 0
            if missed:
                logger.warning("marking recovered jobs as started works again; %d were not "
                               "marked", missed)

    def interrupt_running(self) -> int:
        """At a stop, once the unfinished jobs are back in their queues and the stats
        writer is closed: raise ``NodeStopped`` in every sync job still inside its
        function, so that it does not run on to its end here while its queued copy
        runs elsewhere (async jobs are cancelled with the loop). Their outcome is
        not recorded (no ack, no retry entry). Returns how many were interrupted;
        one in a C call that never returns cannot be."""
        return sum(r.deadline.interrupt() for r in list(self.running.values())
                   if r.deadline is not None)

    def cancel(self, jid: str) -> bool:
        """Ask the running job ``jid`` to stop: its ``cancelled`` turns true (a sync
        job checks it), an async job's task is cancelled. True if it runs here."""
        for running in list(self.running.values()):
            if running.job is not None and running.job.jid == jid:
                running.job.cancelled = True
                self.loop.call_soon(functools.partial(_cancel_task, running))
                return True
        return False

    def _run(self, pipeline: Pipeline, running: Running, suspect: bool) -> bool:
        """Up to the end of the job, or to its hand-over to the event loop (True)."""
        if not self._before(pipeline):
            return False
        assigns = pipeline.assigns
        running.job = assigns.get("job")
        if "error" not in assigns:
            awaitable = self._dispatch(assigns, running)
            if awaitable is not None:
                self._hand_over(pipeline, running, suspect, awaitable)
                return True
        self._after(pipeline)
        return False

    def _after(self, pipeline: Pipeline) -> None:
        assigns = pipeline.assigns
        after = Pipeline(assigns, pipeline.writes)  # fresh, never halted
        failed = "error" in assigns
        for middleware in self.middleware:
            self._hook(middleware, after, failed)

    def _before(self, pipeline: Pipeline) -> bool:
        for middleware in self.middleware:
            try:
                middleware.before_work(pipeline)
            except Exception as exc:  # a broken hook fails the job
                _fail(pipeline.assigns, exc)
                return True
            if pipeline.terminated:
                return False
            if pipeline.halted:
                break
        return True

    def _timeout(self, assigns: dict[str, Any], job: Job) -> float | None:
        """The job's limit: its payload's, else its worker's, else the config's."""
        if job.timeout is not None:
            return job.timeout
        spec = assigns.get("worker_spec")
        if spec is not None and spec.timeout is not None:
            timeout: float = spec.timeout
            return timeout
        return self.default_timeout

    def _dispatch(self, assigns: dict[str, Any], running: Running) -> Awaitable[Any] | None:
        """Call the worker on this thread. Returns the awaitable an async worker
        gave back (to run on the loop), or None when the job is over."""
        job: Job = assigns["job"]
        seconds = self._timeout(assigns, job)
        # Every job gets a guard (a stop may interrupt it); only a limit is armed.
        deadline = running.deadline = Deadline(seconds, job)
        token = _current.set(job)
        result: Any = None
        error: BaseException | None = None
        try:
            if seconds is not None:
                self.watchdog.arm(deadline)  # from here a JobTimeout may land in this try
            result = assigns["worker"](*job.args)
        except BaseException as exc:  # SystemExit etc. fail the job only
            error = exc
        # No call between the except and _leave: an interrupt must land inside one.
        _leave(deadline)
        _current.reset(token)
        if error is None and inspect.isawaitable(result):
            if not (deadline.fired or deadline.interrupted):
                return result
            _close(result)
        self._outcome(assigns, running, result, error)
        return None

    def _outcome(self, assigns: dict[str, Any], running: Running, result: Any,
                 error: BaseException | None) -> None:
        """Record the job's result, or its failure (timeout and cancel come first)."""
        job: Job = assigns["job"]
        deadline = running.deadline  # set by _dispatch for every job it ran
        if deadline is not None:
            self.watchdog.finish(deadline)
        if deadline is not None and deadline.interrupted:
            _fail(assigns, NodeStopped())  # after the stop: not recorded, see interrupt_running
        elif deadline is not None and deadline.fired:
            timeout = JobTimeout(deadline.seconds)
            if isinstance(error, JobTimeout):  # raised in the job: keep where it was
                timeout = timeout.with_traceback(error.__traceback__)
            _fail(assigns, timeout)
        elif job.cancelled:
            assigns["job_canceled"] = True
            _fail(assigns, Cancelled())
        elif error is not None:
            _fail(assigns, error)
        else:
            assigns["result"] = result

    # -- async jobs -------------------------------------------------------------

    def _hand_over(self, pipeline: Pipeline, running: Running, suspect: bool,
                   awaitable: Awaitable[Any]) -> None:
        """Run ``awaitable`` on the node's loop; finish the job when it ends."""
        job: Job = pipeline.assigns["job"]

        async def body() -> Any:
            _current.set(job)  # this task's own context: current_job() works inside
            if inspect.iscoroutine(awaitable):
                return await awaitable
            return await await_any(awaitable)

        def on_task(task: asyncio.Task[Any]) -> None:
            running.task = task
            task.add_done_callback(
                lambda t: self._ended(pipeline, running, suspect, t, awaitable))
            if running.deadline is not None:
                running.deadline.attach(lambda: self.loop.call_soon(
                    lambda: _cancel_task(running)))
            if job.cancelled:
                task.cancel()

        try:
            self.loop.spawn(body, on_task)
        except RuntimeError as exc:  # the loop is stopped: the node is stopping
            _close(awaitable)
            _fail(pipeline.assigns, exc)
            self._after(pipeline)
            self._finish(pipeline, running, suspect)

    def _ended(self, pipeline: Pipeline, running: Running, suspect: bool,
               task: asyncio.Task[Any], awaitable: Awaitable[Any]) -> None:
        """On the loop thread: the job's coroutine ended; finish it on an executor thread."""
        error: BaseException | None = None
        result: Any = None
        if task.cancelled():
            error = Cancelled()
            _close(awaitable)  # cancelled before its first step: never awaited
        else:
            error = task.exception()
            result = task.result() if error is None else None
        job: Job = pipeline.assigns["job"]
        if isinstance(error, Cancelled) and not job.cancelled:
            job.cancelled = True  # task.cancel() from the job's own code

        def finish() -> None:
            try:
                self._outcome(pipeline.assigns, running, result, error)
                self._after(pipeline)
            except BaseException:  # a bug must not kill the thread
                logger.exception("internal error after an async job; it stays in the "
                                 "backup list")
                pipeline.assigns["ack"] = False
            finally:
                self._finish(pipeline, running, suspect)

        if self.submit is None:
            finish()
            return
        try:
            self.submit(finish)
        except RuntimeError:
            # The executor is shut down (the node stopped): the job was put back
            # in its queue at the stop; it is not acked.
            logger.debug("async job ended after the node stopped: not acked")

    def _hook(self, middleware: Middleware, pipeline: Pipeline, failed: bool) -> None:
        try:
            if failed:
                middleware.after_failed_work(pipeline)
            else:
                middleware.after_processed_work(pipeline)
        except Exception:  # the other hooks (and the ack) still run
            logger.exception("middleware %s failed", type(middleware).__name__)

    def _finish(self, pipeline: Pipeline, running: Running, suspect: bool) -> None:
        try:
            self._hand_to_stats(pipeline, running, suspect)
        finally:
            if running.on_end is not None:
                running.on_end()

    def _hand_to_stats(self, pipeline: Pipeline, running: Running, suspect: bool) -> None:
        assigns = pipeline.assigns
        flight = running.flight
        job: Job | None = assigns.get("job")
        if suspect and assigns.get("ack"):
            pipeline.writes += RecoveryPolicy.started_commands(self.services.keys, flight.raw)
        self.services.stats.job_done(Done(
            flight, pipeline.writes, bool(assigns.get("ack")), assigns.get("stat"),
            job_class=job.worker_name if job is not None and "worker" in assigns else "unknown",
            fate=assigns.get("fate"), duration=time.perf_counter() - running.started,
            latency=None if job is None or job.enqueued_at is None or job.retry_count
            else flight.run_at - job.enqueued_at,
        ))
        del self.running[flight.field]
        # The slot is freed even when no Manager middleware ran (terminate, or
        # a chain without it): a leaked slot could never be recovered.
        release(pipeline, "error" not in assigns)


def _cancel_task(running: Running) -> None:
    """On the loop thread: cancel the job's task, if it has one."""
    if running.task is not None:
        running.task.cancel()


def _close(awaitable: Awaitable[Any]) -> None:
    """Drop an awaitable that will not run (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()


def _fail(assigns: dict[str, Any], error: BaseException) -> None:
    assigns["error"] = error
    assigns["error_class"], assigns["error_message"] = error_text(error)
