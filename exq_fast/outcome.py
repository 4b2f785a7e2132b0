"""What became of a job: the typed ``Outcome``, and the retry/dead rule that decides it.

The worker (``worker.WorkerServer``) gives every job it runs one ``Outcome``:

* ``PROCESSED``: the job returned. Acked, counted in ``stat:processed``.
* ``FAILED``: the job raised, timed out, was cancelled, has no worker here, or
  its payload is not a job. Acked, counted in ``stat:failed``, and its
  ``writes`` hold its retry or dead entry (``fate``), decided by
  ``FailureRule.decide``:

  - payload unusable (not UTF-8/JSON/an object, no class, args not a list):
    dead at once, inside a wrapper job of class ``ExqFast.InvalidPayload``
    that keeps the bytes and says why;
  - no worker here for the class (``UnknownWorker``): the retry rule, as
    Sidekiq retries a ``NameError`` -- during a rolling deploy a node of the
    older release may fetch a job only the new one knows, and a node that
    knows it runs the retry; nothing named by a payload is ever imported;
  - cancelled (Exq's ``CANCEL:`` signal): dead at once with "Canceled";
  - otherwise Exq's rule (``retry`` integer / ``true`` / anything else):
    the retry set with backoff, or the dead set.

* ``TERMINATED``: a middleware terminated it before it ran. Not acked: it
  stays in the backup list and runs again at the next recovery.

The ``writes`` go into the ack's batch *before* the ack, so a crash in between
re-runs the job instead of losing it. A job that ends in an internal error of
exq-fast gets no outcome at all: not acked, it stays in the backup list.

A retry or dead entry carries Sidekiq's ``error_backtrace`` when the job asks
for it: the payload's ``backtrace`` field, else the worker's ``backtrace``
option (docs/wire-format.md §3.5.1). Only a failure of the job's own code has
one: an unusable payload or an unknown worker never ran any.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol

from .config import Config
from .job import Job, encode, new_jid, now_seconds
from .keys import Keys, StatKind
from .registry import WorkerSpec
from .retry import (
    Backoff,
    Command,
    backtrace_limit,
    backtrace_lines,
    dead_commands,
    dead_payload,
    is_dead,
    retry_commands,
)

INVALID_CLASS = "ExqFast.InvalidPayload"
"""``class`` of the dead-set entry wrapping a payload that is not a usable job."""

Fate = Literal["retried", "dead", "snoozed"]
"""Where a finished job's entry went: the retry set, the dead set, or back to
the retry set by a ``Snooze`` (counted processed)."""


class JobRun(Protocol):
    """What the decision reads of a job in flight (``inflight.InFlight``)."""

    @property
    def raw(self) -> bytes:
        """The job's bytes as fetched."""

    @property
    def queue(self) -> str:
        """The queue it was fetched from."""

    @property
    def job(self) -> Job | None:
        """The decoded job; None when the payload is not a job."""

    @property
    def spec(self) -> WorkerSpec | None:
        """Its worker; None when no worker here knows it."""


class Status(enum.Enum):
    """How a job ended (see the module doc)."""

    PROCESSED = "processed"
    FAILED = "failed"
    TERMINATED = "terminated"


@dataclass(slots=True)
class Outcome:
    """What became of one job: its status, its error, where it went, and the
    writes that go into its batch before its ack."""

    status: Status
    error: BaseException | None = None
    fate: Fate | None = None
    writes: list[Command] = field(default_factory=list)

    @property
    def ack(self) -> bool:
        """Whether the job leaves its backup list (every status but ``TERMINATED``)."""
        return self.status is not Status.TERMINATED

    @property
    def stat(self) -> StatKind | None:
        """The counter it moves: ``processed``, ``failed``, or none."""
        if self.status is Status.PROCESSED:
            return "processed"
        return "failed" if self.status is Status.FAILED else None


def error_text(error: BaseException) -> tuple[str, str]:
    """``(error_class, error_message)`` of an exception, Sidekiq style."""
    name = type(error).__name__
    try:
        message = str(error)
    except Exception:  # an exception whose __str__ fails must still be recorded
        message = f"{name} (its message could not be rendered)"
    return name, message or name


def failure_traceback(record: JobRun, error: BaseException | None) -> TracebackType | None:
    """The traceback of a failed job's exception, or None when the job failed
    without running code of its own (unusable payload, unknown worker) or its
    error was never raised in it (a cancel, an async job's timeout; a sync job's
    ``JobTimeout`` keeps the place where it landed)."""
    if error is None or record.job is None or record.spec is None:
        return None
    tb: TracebackType | None = error.__traceback__
    return tb


def _backtrace(record: JobRun, job: Job, error: BaseException) -> list[str] | None:
    """The ``error_backtrace`` lines of a failed job, or None when it asks for none
    (its payload's ``backtrace`` first, else its worker's option) or has none."""
    option = job.backtrace
    if option is None and record.spec is not None:
        option = record.spec.backtrace
    limit = backtrace_limit(option)
    tb = failure_traceback(record, error) if limit else None
    if tb is None:
        return None
    return backtrace_lines(tb, limit) or None


class FailureRule:
    """The retry/dead decision of a node: its keys, limits and backoff."""

    def __init__(self, keys: Keys, config: Config, backoff: Backoff) -> None:
        self.keys = keys
        self.config = config
        self.backoff = backoff

    def decide(self, record: JobRun, error: BaseException, *,
               canceled: bool = False) -> Outcome:
        """The ``FAILED`` outcome of ``record``: its retry or dead entry."""
        error_class, message = error_text(error)
        try:
            return self._decide(record, error, error_class, message, canceled)
        except (ValueError, TypeError, RecursionError) as exc:
            # The payload decoded but cannot be written back (a number that
            # overflowed to infinity, nesting too deep to encode): keep its
            # bytes verbatim in a dead wrapper rather than leave it unacked.
            message = f"{message}; the job could not be re-encoded: {exc}"
            return self._dead(error, wrap_invalid(record.raw, record.queue, error_class,
                                                  message))

    def _decide(self, record: JobRun, error: BaseException, error_class: str,
                message: str, canceled: bool) -> Outcome:
        job = record.job
        if job is None:
            return self._dead(error, wrap_invalid(record.raw, record.queue, error_class,
                                                  message))
        backtrace = _backtrace(record, job, error)
        if canceled or is_dead(job, self.config.max_retries):
            return self._dead(error, dead_payload(job, error_class, message,
                                                  backtrace=backtrace))
        writes = retry_commands(self.keys, job, error_class, message, self.backoff(job),
                                backtrace=backtrace)
        return Outcome(Status.FAILED, error, "retried", writes)

    def _dead(self, error: BaseException, payload: bytes) -> Outcome:
        config = self.config
        writes = dead_commands(self.keys, payload, config.dead_max_jobs,
                               config.dead_timeout_in_seconds)
        return Outcome(Status.FAILED, error, "dead", writes)


def wrap_invalid(raw: bytes, queue: str | None, error_class: str, message: str) -> bytes:
    """A dead-set entry of class ``ExqFast.InvalidPayload`` for bytes that are not a
    usable job: the bytes kept verbatim as its only argument (base64 when they are
    not UTF-8), with the reason."""
    now = now_seconds()
    wrapper: dict[str, Any] = {
        "args": [], "class": INVALID_CLASS, "enqueued_at": now, "error_class": error_class,
        "error_message": message, "failed_at": now, "retried_at": now, "finished_at": None,
        "jid": new_jid(), "processor": None, "queue": queue, "retry": 0,
        "retry_count": 0,
    }
    try:
        wrapper["args"] = [raw.decode("utf-8")]  # the bytes, verbatim, as the only arg
    except UnicodeDecodeError:
        wrapper["payload_base64"] = base64.b64encode(raw).decode("ascii")
    return encode(wrapper)
