"""``WorkerServer``: the life of one job (Exq's ``Worker.Server`` contract).

``run(record)`` is what the executor runs for each fetched job (an
``inflight.InFlight`` record). The worker's core, which no middleware can
replace or break:

1. note the job as running (the ack writer records it if it outlives a flush);
2. **decode** the bytes (simdjson) and **resolve** the worker
   (``Registry.lookup``: registered names and allowed modules only; nothing
   named by a payload is imported);
3. ``before_work`` of each middleware in order (a halt skips the rest, a
   terminate stops everything: no run, no ack);
4. **perform**: the worker on this thread, with ``current_job()`` set and the
   job's time limit armed (see ``timeouts``). When it returns a coroutine
   (``async def``), the coroutine goes to the node's event loop (see ``aio``)
   and this thread is free; steps 5 to 7 run on an executor thread when the
   coroutine ends. Until then the job holds its concurrency slot;
5. **decide** its ``Outcome``: processed, or failed with its retry or dead
   entry (``outcome.FailureRule``), or terminated;
6. ``after_processed_work`` or ``after_failed_work`` of each middleware (they
   see the outcome; Snooze may add writes to it);
7. **finish**: hand the record to the ack writer (``AckWriter.job_done``: the
   ack, the writes and the counter go into its next batch) and call
   ``on_end(record)``, the one place the job's slot is freed.

``run`` never raises: an exception from a job -- ``BaseException``s such as
``SystemExit`` and ``KeyboardInterrupt`` included -- fails that job; an
exception from a middleware hook is logged; it fails the job before perform, and
changes nothing after it.
An internal error leaves the job without an outcome: not acked, it stays in
the backup list. A job over its time limit fails with ``JobTimeout``; a
cancelled one (Exq's ``CANCEL:`` signal, or ``task.cancel()`` of an async job)
with ``Cancelled``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import logging
import re
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from .aio import EventLoop, Handoff, await_any
from .background import REDIS_ERRORS
from .inflight import InFlight, JobHook, Pool
from .job import InvalidJob, Job, decode, now_seconds
from .middleware import Middleware, Pipeline, Services
from .outcome import FailureRule, Outcome, Status
from .registry import Registry, UnknownWorker
from .retry import sidekiq_backoff
from .store.recovery import RecoveryPolicy, mark_started
from .timeouts import INTERRUPTS, Deadline, JobTimeout, NodeStopped, Watchdog

logger = logging.getLogger("exq_fast")

_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("exq_fast_job",
                                                                      default=None)

class AckSink(Protocol):
    """Where the worker hands its records (``acks.AckWriter``)."""

    def job_started(self, record: InFlight) -> None:
        """The job starts."""

    def job_done(self, record: InFlight) -> None:
        """The job has its outcome: ack it in the next batch."""


class Cancelled(Exception):  # Exq's word
    """Raised for a job whose cancellation was requested (Exq's ``CANCEL:`` signal)."""

    def __init__(self) -> None:
        super().__init__("Canceled")


def current_job() -> Job | None:
    """The job being run by the calling thread or task, or None outside a job."""
    return _current.get()


class WorkerServer:
    """Runs jobs through the worker's core and the middleware chain; shared by all
    executor threads."""

    def __init__(self, services: Services, registry: Registry,
                 middleware: Sequence[Middleware], *, acks: AckSink,
                 on_end: JobHook | None = None,
                 pool: Pool | None = None, starter: Pool | None = None,
                 loop: EventLoop | None = None, watchdog: Watchdog | None = None) -> None:
        """``acks`` takes every record, ``on_end(record)`` is called once per job when
        it has ended (async jobs included): it frees the slot. ``pool`` runs jobs
        and the end of async jobs on worker threads (default: on the calling or the
        loop thread); ``starter`` starts async jobs (default: ``pool``);
        ``loop`` and ``watchdog`` default to new ones."""
        config = services.config
        self.services = services
        self.registry = registry
        self.middleware = tuple(middleware)
        self.acks = acks
        self.on_end = on_end
        self.rule = FailureRule(services.keys, config, config.backoff or sidekiq_backoff)
        self.default_timeout = config.job_timeout
        self.pool = pool
        self.starter = starter
        self.loop = loop if loop is not None else EventLoop()
        self.watchdog = watchdog if watchdog is not None else Watchdog()
        self.running: dict[int, InFlight] = {}
        """The jobs running now, by their ``seq`` (heartbeats, cancel, the stop)."""
        self._ids = itertools.count(1)
        self._ends: Handoff[Pipeline] = Handoff()  # async jobs whose coroutine ended
        self._tasks: dict[asyncio.Task[Any], Pipeline] = {}  # on the loop thread only
        self._unmarked = 0  # recovered jobs whose start mark Redis refused, this outage
        self._marks_lock = threading.Lock()

    def dispatch(self, records: Sequence[InFlight]) -> None:
        """On the fetcher thread: hand the jobs of a fetch to worker threads -- an
        ``async def`` job to the few threads that start coroutines (``starter``), so
        that a burst of them does not start a thread each; any other job to the pool,
        all in one hand-over.

        Routing only peeks at the payload's class name (no decoding here, and
        nothing at all while no async worker is registered); a payload it cannot
        read goes to the pool, where the worker decides what becomes of it."""
        if self.starter is not None and self.registry.has_async:
            plain = []
            for record in records:
                name = _peek_class(record.raw)
                if name is not None and self.registry.is_async(name):
                    self.starter.submit(self.run, record)
                else:
                    plain.append(record)
            records = plain
        if self.pool is not None:
            self.pool.submit_all(self.run, records)
        else:
            for record in records:
                self.run(record)

    def run(self, record: InFlight) -> None:
        """Run one fetched job to its end (an async job: to its hand-over to the
        loop). Never raises.

        A suspect (recovered from a backup before) is marked started in Redis
        first, so that if it kills this process the next recovery counts it
        (poison detection, see ``store.recovery.RecoveryPolicy``).
        """
        record.seq = seq = next(self._ids)
        record.run_at = now_seconds()
        record.started = time.perf_counter()
        if record.suspect:
            self._mark_started(record.raw)
        self.running[seq] = record
        self.acks.job_started(record)
        handed_over = False
        try:
            handed_over = self._run(Pipeline(record, self.services))
        except BaseException:  # a bug must not kill the thread
            # No outcome, so no ack: the job stays in the backup list.
            logger.exception("internal error while running a job; it stays in the backup list")
            record.outcome = None
        finally:
            if not handed_over:  # else the coroutine's end finishes it
                self._finish(record)

    def _mark_started(self, raw: bytes) -> None:
        try:
            mark_started(self.services.redis, self.services.keys, raw)
        except REDIS_ERRORS as exc:
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
        """At a stop, once the unfinished jobs are back in their queues and the ack
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
        for record in list(self.running.values()):
            if record.job is not None and record.job.jid == jid:
                record.job.cancelled = True
                self.loop.call_soon(functools.partial(_cancel_task, record))
                return True
        return False

    # -- the core ---------------------------------------------------------------

    def _run(self, pipeline: Pipeline) -> bool:
        """Up to the end of the job, or to its hand-over to the event loop (True)."""
        error: BaseException | None = self._resolve(pipeline.record)
        if self.middleware:
            error = self._before(pipeline, error)
        if pipeline.terminated:
            # Not run, not acked (a middleware's decision): it stays in the backup list.
            pipeline.record.outcome = Outcome(Status.TERMINATED)
            return False
        if error is not None:
            self._conclude(pipeline, None, error)
            return False
        awaitable = self._perform(pipeline)
        if awaitable is None:
            return False
        self._hand_over(pipeline, awaitable)
        return True

    def _resolve(self, record: InFlight) -> Exception | None:
        """Decode the job and find its worker; the error that fails it, if any."""
        try:
            record.job = job = decode(record.raw)
        except InvalidJob as exc:
            return exc  # not a job: the dead set at once (see outcome)
        if job.enqueued_at is not None and not job.retry_count:
            record.latency = record.run_at - job.enqueued_at
        try:
            record.spec = spec = self.registry.lookup(job.job_class)
        except UnknownWorker as exc:
            return exc  # not run; the retry rule applies (see outcome)
        record.job_class = spec.name  # resolved by the normalised class: the same string
        return None

    def _before(self, pipeline: Pipeline,
                error: BaseException | None) -> BaseException | None:
        """The before hooks, in order; the error that fails the job, if any."""
        for middleware in self.middleware:
            try:
                middleware.before_work(pipeline)
            except BaseException as exc:  # a broken hook (sys.exit() too) fails the job
                logger.exception("middleware %s failed in before_work: the job fails",
                                 type(middleware).__name__)
                return error or exc
            if pipeline.terminated or pipeline.halted:
                break
        return error

    def _timeout(self, record: InFlight, job: Job) -> float | None:
        """The job's limit: its payload's, else its worker's, else the config's."""
        if job.timeout is not None:
            return job.timeout
        if record.spec is not None and record.spec.timeout is not None:
            return record.spec.timeout
        return self.default_timeout

    def _perform(self, pipeline: Pipeline) -> Awaitable[Any] | None:
        """Call the worker on this thread. Returns the awaitable an async worker
        gave back (to run on the loop), or None when the job is over."""
        record = pipeline.record
        job, spec = record.job, record.spec
        assert job is not None and spec is not None  # _resolve found both
        seconds = self._timeout(record, job)
        # Every job gets a guard (a stop may interrupt it); only a limit is armed.
        deadline = record.deadline = Deadline(seconds, job)
        token = _current.set(job)
        result: Any = None
        error: BaseException | None = None
        try:
            if seconds is not None:
                self.watchdog.arm(deadline)  # from here a JobTimeout may land in this try
            result = spec.perform(*job.args)
        except BaseException as exc:  # SystemExit etc. fail the job only
            error = exc
        # Close the window in which an exception may be raised into this thread. A
        # JobTimeout or NodeStopped raised just before may land at any bytecode
        # from here on, up to inside leave(): the loop stands right here, with no
        # call before its try, because CPython delivers it at a call or a
        # function's entry -- a helper's own try would not cover its entry. It is
        # absorbed and leave() called again, which withdraws nothing more (one is
        # raised per job at most).
        while True:
            try:
                deadline.leave()
                break
            except INTERRUPTS:
                continue
        _current.reset(token)
        if error is None and result is not None and inspect.isawaitable(result):
            if not (deadline.fired or deadline.interrupted):
                return result
            _close(result)
        self._performed(pipeline, result, error)
        return None

    def _performed(self, pipeline: Pipeline, result: Any, error: BaseException | None) -> None:
        """The job's call is over: timeout, stop and cancel come before its own result."""
        record = pipeline.record
        deadline, job = record.deadline, record.job
        assert deadline is not None and job is not None  # set by _perform
        self.watchdog.finish(deadline)
        canceled = False
        if deadline.interrupted:
            error = NodeStopped()  # after the stop: not recorded, see interrupt_running
        elif deadline.fired:
            timeout = JobTimeout(deadline.seconds)
            if isinstance(error, JobTimeout):  # raised in the job: keep where it was
                timeout = timeout.with_traceback(error.__traceback__)
            error = timeout
        elif job.cancelled:
            error, canceled = Cancelled(), True
        self._conclude(pipeline, result if error is None else None, error, canceled)

    def _conclude(self, pipeline: Pipeline, result: Any, error: BaseException | None,
                  canceled: bool = False) -> None:
        """Decide the job's outcome, then run the after hooks."""
        record = pipeline.record
        pipeline.result, pipeline.error = result, error
        record.outcome = Outcome(Status.PROCESSED) if error is None \
            else self.rule.decide(record, error, canceled=canceled)
        failed = error is not None
        for middleware in self.middleware:
            try:
                if failed:
                    middleware.after_failed_work(pipeline)
                else:
                    middleware.after_processed_work(pipeline)
            except BaseException:  # the outcome is decided: the other hooks and the ack go on
                logger.exception("middleware %s failed in %s (the job's outcome stands)",
                                 type(middleware).__name__,
                                 "after_failed_work" if failed else "after_processed_work")

    def _finish(self, record: InFlight) -> None:
        """Hand the record to the ack writer and free its slot (the one place)."""
        try:
            outcome = record.outcome
            if record.suspect and outcome is not None and outcome.ack:
                outcome.writes += RecoveryPolicy.started_commands(self.services.keys, record.raw)
            record.duration = time.perf_counter() - record.started
            record.release()
            self.acks.job_done(record)
            del self.running[record.seq]
        finally:
            # Whatever happened, the slot is freed: a leaked slot could never be recovered.
            if self.on_end is not None:
                self.on_end(record)

    # -- async jobs -------------------------------------------------------------

    def _hand_over(self, pipeline: Pipeline, awaitable: Awaitable[Any]) -> None:
        """Run ``awaitable`` on the node's loop; finish the job when it ends."""
        try:
            self.loop.run_soon(functools.partial(self._start_task, pipeline, awaitable))
        except RuntimeError as exc:  # the loop is stopped: the node is stopping
            _close(awaitable)
            self._performed(pipeline, None, exc)
            self._finish(pipeline.record)

    def _start_task(self, pipeline: Pipeline, awaitable: Awaitable[Any]) -> None:
        """On the loop thread: the job's task, in a context of its own where
        ``current_job()`` is the job; ``_ended`` hears of its end."""
        record = pipeline.record
        try:
            job = record.job
            context = contextvars.copy_context()
            context.run(_current.set, job)
            coroutine = awaitable if inspect.iscoroutine(awaitable) else await_any(awaitable)
            task = asyncio.get_running_loop().create_task(coroutine, context=context)
        except BaseException:  # no task: the job ends here, without an outcome
            logger.exception("internal error starting an async job; it stays in the backup list")
            _close(awaitable)
            record.outcome = None
            self._finish(record)
            return
        record.task = task
        self._tasks[task] = pipeline
        task.add_done_callback(self._ended)
        deadline = record.deadline
        if deadline is not None and deadline.seconds is not None:  # only a limit fires
            deadline.attach(functools.partial(self.loop.call_soon,
                                              functools.partial(_cancel_task, record)))
        if job is not None and job.cancelled:
            task.cancel()

    def _ended(self, task: asyncio.Task[Any]) -> None:
        """On the loop thread: the job's coroutine ended; finish it on a worker thread."""
        pipeline = self._tasks.pop(task)
        if task.cancelled():
            pipeline.error = Cancelled()
            _close(task.get_coro())  # cancelled before its first step: never awaited
        else:
            pipeline.error = task.exception()
            if pipeline.error is None:
                pipeline.result = task.result()
        job = pipeline.record.job
        if isinstance(pipeline.error, Cancelled) and job is not None and not job.cancelled:
            job.cancelled = True  # task.cancel() from the job's own code

        if self.pool is None:
            self._finish_async(pipeline)
            return
        # Handed to a worker thread in batches: one pool hand-off per batch of ended
        # jobs, not per job (the after hooks still run off the loop).
        if not self._ends.put(pipeline):
            return
        try:
            self.pool.submit(self._finish_ended)
        except RuntimeError:
            # The pool is shut down (the node stopped): the jobs were put back in
            # their queues at the stop; they are not acked, but they have ended.
            logger.debug("async jobs ended after the node stopped: not acked")
            for ended in self._ends.take():
                ended.record.outcome = None
                self._finish(ended.record)

    def _finish_ended(self) -> None:
        """On a worker thread: finish the async jobs that ended (those ending meanwhile
        go in the next batch)."""
        for pipeline in self._ends.take():
            try:
                self._finish_async(pipeline)
            except BaseException:  # the others of the batch must still finish
                logger.exception("internal error finishing an async job")

    def _finish_async(self, pipeline: Pipeline) -> None:
        """After the coroutine's end (its result or error on the pipeline)."""
        record = pipeline.record
        try:
            self._performed(pipeline, pipeline.result, pipeline.error)
        except BaseException:  # a bug must not kill the thread
            logger.exception("internal error after an async job; it stays in the backup list")
            record.outcome = None
        finally:
            self._finish(record)


_CLASS = re.compile(rb'"class"\s*:\s*"([^"\\]+)"')
"""The payload's ``class`` as Exq, Sidekiq and exq-fast write it (no escapes)."""


def _peek_class(raw: bytes) -> str | None:
    """The job's class name read straight from its bytes, for routing only; None when
    it is not there plainly (the worker thread then decodes the job properly)."""
    found = _CLASS.search(raw)
    return found.group(1).decode("utf-8", "replace") if found else None


def _cancel_task(record: InFlight) -> None:
    """On the loop thread: cancel the job's task, if it has one."""
    if record.task is not None:
        record.task.cancel()


def _close(awaitable: object) -> None:
    """Drop an awaitable that will not run (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()
