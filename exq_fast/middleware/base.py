"""The pipeline a job's middleware share, the middleware base class, and services.

Middleware is for what is optional: the built-in Snooze, Unique and Logger,
and the application's own hooks. The worker's core -- decoding, resolving the
worker, the ack/retry/dead decision, the counter, the slot -- runs whatever the
chain holds, so a chain without any built-in middleware still acks and counts
every job.

A ``Pipeline`` is one job on its way through the chain: ``job`` (None for a
payload that is not a job), ``queue``, ``record`` (the job in flight), and
after the job ``result`` / ``error`` and its decided ``outcome``. ``assigns`` is
a dict for the middleware's own data. Two flags:

* ``halt()``: the remaining ``before_work`` hooks are skipped; the job still
  runs and every after hook still runs.
* ``terminate()``: the job is not run and no after hook runs; it is not acked
  and stays in the backup list (it runs again at the next recovery). Unlike
  Exq, its concurrency slot is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from ..config import Config
from ..keys import Keys

if TYPE_CHECKING:
    from ..inflight import InFlight
    from ..job import Job
    from ..outcome import Outcome


@dataclass(frozen=True)
class Services:
    """The shared objects a job's middleware may use."""

    redis: redis.Redis
    keys: Keys
    config: Config


class Pipeline:
    """The state of one job as it passes through the middleware chain."""

    __slots__ = ("_assigns", "error", "halted", "record", "result", "services", "terminated")

    def __init__(self, record: InFlight, services: Services) -> None:
        self.record = record
        self.services = services
        self.result: Any = None
        """The job's return value (after hooks of a processed job)."""
        self.error: BaseException | None = None
        """Why the job failed (after hooks of a failed job)."""
        self.halted = False
        self.terminated = False
        self._assigns: dict[str, Any] | None = None

    @property
    def job(self) -> Job | None:
        """The decoded job; None for a payload that is not a job."""
        return self.record.job

    @property
    def queue(self) -> str:
        """The queue the job was fetched from."""
        return self.record.queue

    @property
    def outcome(self) -> Outcome:
        """The job's outcome, decided before the after hooks run (only they may read it)."""
        outcome = self.record.outcome
        if outcome is None:
            raise RuntimeError("the outcome is decided after the job, for the after hooks")
        return outcome

    @property
    def assigns(self) -> dict[str, Any]:
        """The middleware's own data for this job (empty at first)."""
        if self._assigns is None:
            self._assigns = {}
        return self._assigns

    def halt(self) -> None:
        """Skip the remaining ``before_work`` hooks; the job still runs."""
        self.halted = True

    def terminate(self) -> None:
        """Do not run the job and run no after hook; it stays in the backup list."""
        self.terminated = True


class Middleware:
    """Base class: every hook is a no-op. Override the ones you need.

    A hook that raises is logged; in ``before_work`` it fails the job (no run),
    in an after hook it changes nothing: the outcome is decided and the job is
    acked all the same."""

    def before_work(self, pipeline: Pipeline) -> None:
        """Before the job runs (in chain order)."""

    def after_processed_work(self, pipeline: Pipeline) -> None:
        """After the job returned (``pipeline.result`` is its return value)."""

    def after_failed_work(self, pipeline: Pipeline) -> None:
        """After the job failed (``pipeline.error``; ``pipeline.outcome.fate`` says
        whether it was retried or is dead)."""
