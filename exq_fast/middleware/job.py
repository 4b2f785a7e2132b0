"""Job middleware: decode the payload and find its worker; on the way out, decide
between ack, retry and death.

Failure paths, decided here:

* payload unusable (not UTF-8/JSON/an object, no class, args not a list): dead
  at once, inside a wrapper job that keeps the bytes and says why;
* no worker here for the class (``UnknownWorker``): retried with the normal
  backoff, as Sidekiq retries a ``NameError`` -- during a rolling deploy a node
  of the older release may fetch a job of a class only the new one has, and
  a node that does know it runs the retry; nothing named by a payload is ever
  imported;
* cancelled (Exq's ``CANCEL:`` signal): dead at once with "Canceled";
* otherwise Exq's rule (``retry`` integer / ``true`` / anything else) sends
  the job to the retry set with backoff, or to the dead set.

A retry or dead entry carries Sidekiq's ``error_backtrace`` when the job asks
for it: the payload's ``backtrace`` field, else the worker's ``backtrace``
option (docs/wire-format.md §3.5.1). Only a failure of the job's own code has
one: an unusable payload or an unknown worker never ran any.

In every case the retry/dead write goes into the batch *before* the ack, so a
crash in between re-runs the job instead of losing it.
"""

from __future__ import annotations

import base64
from types import TracebackType
from typing import Any

from ..job import InvalidJob, Job, decode, encode, new_jid, now_seconds
from ..registry import UnknownWorker
from ..retry import (
    backtrace_limit,
    backtrace_lines,
    dead_commands,
    dead_payload,
    is_dead,
    retry_commands,
)
from .base import Middleware, Pipeline, Services

INVALID_CLASS = "ExqFast.InvalidPayload"
"""``class`` of the dead-set entry wrapping a payload that is not a usable job."""


def error_text(error: BaseException) -> tuple[str, str]:
    """``(error_class, error_message)`` of an exception, Sidekiq style."""
    name = type(error).__name__
    try:
        message = str(error)
    except Exception:  # an exception whose __str__ fails must still be recorded
        message = f"{name} (its message could not be rendered)"
    return name, message or name


def failure_traceback(assigns: dict[str, Any]) -> TracebackType | None:
    """The traceback of a failed job's exception, or None when the job failed
    without running code of its own (unusable payload, unknown worker) or its
    error was never raised in it (a cancel, an async job's timeout; a sync job's
    ``JobTimeout`` keeps the place where it landed)."""
    error = assigns.get("error")
    if error is None or assigns.get("invalid") or "job" not in assigns \
            or isinstance(error, UnknownWorker):
        return None
    tb: TracebackType | None = error.__traceback__
    return tb


def failure_backtrace(assigns: dict[str, Any], job: Job) -> list[str] | None:
    """The ``error_backtrace`` lines of a failed job, or None when it asks for none
    (its payload's ``backtrace`` first, else its worker's option) or has none."""
    option = job.backtrace
    if option is None:
        spec = assigns.get("worker_spec")
        option = spec.backtrace if spec is not None else None
    limit = backtrace_limit(option)
    tb = failure_traceback(assigns) if limit else None
    if tb is None:
        return None
    return backtrace_lines(tb, limit) or None


class JobMiddleware(Middleware):
    """Exq's Job middleware, with exq-fast's handling of bad input."""

    def before_work(self, pipeline: Pipeline) -> None:
        assigns = pipeline.assigns
        try:
            job = decode(assigns["job_serialized"], with_args=True)
        except InvalidJob as exc:
            _refuse(assigns, exc)
            return
        assigns["job"] = job
        assigns["flight"].jid = job.jid
        try:
            spec = assigns["services"].registry.lookup(job.job_class)
        except UnknownWorker as exc:
            # Not run, and not refused: the retry rule applies (see the module doc).
            assigns["error"] = exc
            assigns["error_class"], assigns["error_message"] = error_text(exc)
            return
        assigns["worker"] = spec.perform
        assigns["worker_spec"] = spec

    def after_processed_work(self, pipeline: Pipeline) -> None:
        pipeline.assigns["ack"] = True

    def after_failed_work(self, pipeline: Pipeline) -> None:
        try:
            self._retry_or_bury(pipeline)
        except (ValueError, TypeError, RecursionError) as exc:
            # The payload decoded but cannot be written back (a number that
            # overflowed to infinity, nesting too deep to encode): keep its
            # bytes verbatim in a dead wrapper rather than leave it unacked.
            assigns = pipeline.assigns
            message = f"{assigns['error_message']}; the job could not be re-encoded: {exc}"
            _bury(pipeline, _wrap_invalid(assigns, assigns["error_class"], message))

    def _retry_or_bury(self, pipeline: Pipeline) -> None:
        assigns = pipeline.assigns
        services: Services = assigns["services"]
        error_class, message = assigns["error_class"], assigns["error_message"]
        job = assigns.get("job")
        config = services.config
        if job is None:
            payload = _wrap_invalid(assigns, error_class, message)
        elif assigns.get("invalid") or assigns.get("job_canceled") or \
                is_dead(job, config.max_retries):
            payload = dead_payload(job, error_class, message,
                                   backtrace=failure_backtrace(assigns, job))
        else:
            delay = services.backoff(job)
            pipeline.writes += retry_commands(services.keys, job, error_class, message, delay,
                                              backtrace=failure_backtrace(assigns, job))
            assigns["ack"], assigns["fate"] = True, "retried"
            return
        _bury(pipeline, payload)


def _bury(pipeline: Pipeline, payload: bytes) -> None:
    """Send ``payload`` to the dead set, then ack the job."""
    assigns = pipeline.assigns
    services: Services = assigns["services"]
    config = services.config
    pipeline.writes += dead_commands(
        services.keys, payload, config.dead_max_jobs, config.dead_timeout_in_seconds
    )
    assigns["ack"], assigns["fate"], assigns["dead"] = True, "dead", True


def _refuse(assigns: dict[str, Any], error: Exception) -> None:
    """Mark the job as unusable: it goes to the dead set without running."""
    assigns["error"] = error
    assigns["invalid"] = True
    assigns["error_class"], assigns["error_message"] = error_text(error)


def _wrap_invalid(assigns: dict[str, Any], error_class: str, message: str) -> bytes:
    raw: bytes = assigns["job_serialized"]
    now = now_seconds()
    wrapper: dict[str, Any] = {
        "args": [], "class": INVALID_CLASS, "enqueued_at": now, "error_class": error_class,
        "error_message": message, "failed_at": now, "retried_at": now, "finished_at": None,
        "jid": new_jid(), "processor": None, "queue": assigns["queue"], "retry": 0,
        "retry_count": 0,
    }
    try:
        wrapper["args"] = [raw.decode("utf-8")]  # the bytes, verbatim, as the only arg
    except UnicodeDecodeError:
        wrapper["payload_base64"] = base64.b64encode(raw).decode("ascii")
    return encode(wrapper)
