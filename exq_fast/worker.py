"""``WorkerServer``: the life of one job (Exq's ``Worker.Server`` contract).

``run(raw, queue)`` is what the executor runs for each fetched job:

1. note the job as running (the stats writer records it if it outlives a flush);
2. ``before_work`` of each middleware in order (Job decodes and resolves the
   worker; a halt skips the rest, a terminate stops everything);
3. dispatch: ``perform(*args)`` on this thread, with ``current_job()`` set;
4. ``after_processed_work`` or ``after_failed_work`` of each middleware;
5. hand the pipeline's writes, ack and counter to the stats writer.

``run`` never raises: an exception from a job -- ``BaseException``s such as
``SystemExit`` and ``KeyboardInterrupt`` included -- fails that job; an
exception from a middleware hook is logged and, before dispatch, fails the job.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

from .job import Job, now_seconds
from .middleware import Middleware, Pipeline, Services
from .middleware.job import error_text
from .middleware.manager import release
from .queue import RECOVERY_TTL, RecoveryPolicy, job_digest
from .stats import Done, InFlight

logger = logging.getLogger("exq_fast")

_current = threading.local()


class Cancelled(Exception):  # Exq's word
    """Raised for a job whose cancellation was requested (Exq's ``CANCEL:`` signal)."""

    def __init__(self) -> None:
        super().__init__("Canceled")


def current_job() -> Job | None:
    """The job being run by the calling thread, or None outside a job."""
    job: Job | None = getattr(_current, "job", None)
    return job


class Running:
    """A job in progress on this node: what heartbeats and cancel need."""

    __slots__ = ("flight", "job", "started")

    def __init__(self, flight: InFlight) -> None:
        self.flight = flight
        self.job: Job | None = None
        self.started = time.perf_counter()


class WorkerServer:
    """Runs jobs through the middleware chain; shared by all executor threads."""

    def __init__(self, services: Services, middleware: Sequence[Middleware]) -> None:
        self.services = services
        self.middleware = tuple(middleware)
        self.node_id = services.config.node_id
        self.running: dict[str, Running] = {}
        self._ids = itertools.count(1)
        self._unmarked = 0  # recovered jobs whose start mark Redis refused, this outage
        self._marks_lock = threading.Lock()

    def run(self, raw: bytes, queue: str, suspect: bool = False) -> None:
        """Run one fetched job to its end. Never raises.

        ``suspect``: the job was recovered from a backup before; it is marked
        started in Redis first, so that if it kills this process the next
        recovery counts it (poison detection, see ``queue.RecoveryPolicy``).
        """
        flight = InFlight(f"#PID<0.{next(self._ids)}.0>", queue,
                          self.services.keys.backup(self.node_id, queue), raw, now_seconds())
        if suspect:
            self._mark_started(raw)
        running = self.running[flight.field] = Running(flight)
        self.services.stats.job_started(flight)
        pipeline = Pipeline({"job_serialized": raw, "queue": queue, "host": self.node_id,
                             "services": self.services, "flight": flight})
        try:
            self._run(pipeline, running)
        except BaseException:  # a bug must not kill the thread
            logger.exception("internal error while running a job; it stays in the backup list")
            pipeline.assigns["ack"] = False
        finally:
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

    def cancel(self, jid: str) -> bool:
        """Ask the running job ``jid`` to stop (cooperative). True if it runs here."""
        for running in list(self.running.values()):
            if running.job is not None and running.job.jid == jid:
                running.job.cancelled = True
                return True
        return False

    def _run(self, pipeline: Pipeline, running: Running) -> None:
        if not self._before(pipeline):
            return
        assigns = pipeline.assigns
        running.job = assigns.get("job")
        if "error" not in assigns:
            self._dispatch(assigns)
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

    def _dispatch(self, assigns: dict[str, Any]) -> None:
        job: Job = assigns["job"]
        _current.job = job
        try:
            assigns["result"] = assigns["worker"](*job.args)
            if job.cancelled:
                raise Cancelled()
        except BaseException as exc:  # SystemExit etc. fail the job only
            if job.cancelled:
                assigns["job_canceled"] = True
            _fail(assigns, Cancelled() if job.cancelled else exc)
        finally:
            _current.job = None

    def _hook(self, middleware: Middleware, pipeline: Pipeline, failed: bool) -> None:
        try:
            if failed:
                middleware.after_failed_work(pipeline)
            else:
                middleware.after_processed_work(pipeline)
        except Exception:  # the other hooks (and the ack) still run
            logger.exception("middleware %s failed", type(middleware).__name__)

    def _finish(self, pipeline: Pipeline, running: Running, suspect: bool) -> None:
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


def _fail(assigns: dict[str, Any], error: BaseException) -> None:
    assigns["error"] = error
    assigns["error_class"], assigns["error_message"] = error_text(error)
