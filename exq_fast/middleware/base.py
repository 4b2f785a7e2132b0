"""The pipeline a job's middleware share, the middleware base class, and services.

A pipeline carries ``assigns`` (Exq's names: ``job_serialized``, ``queue``,
``host``, ``job``, ``worker``, ``result``, ``error``, ``error_message``, ...),
the ``writes`` to put in the stats batch before the job's ack, and two flags:

* ``halt()``: the remaining ``before_work`` hooks are skipped; the job still runs
  and the after-hooks still run (on a fresh, non-halted pipeline).
* ``terminate()``: the job is not run and no after-hook runs; it stays in the
  backup list (it runs again at the next start). Unlike Exq, its concurrency
  slot is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis

from ..config import Config
from ..keys import Keys
from ..retry import Backoff, Command

if TYPE_CHECKING:
    from ..registry import Registry
    from ..stats import StatsWriter


class SlotManager(Protocol):
    """What the Manager middleware tells the manager when a job ends."""

    def job_terminated(self, queue: str, success: bool) -> None:
        """Free one concurrency slot of ``queue``."""


@dataclass(frozen=True)
class Services:
    """The shared objects every job's middleware may use."""

    redis: redis.Redis
    keys: Keys
    config: Config
    stats: StatsWriter
    manager: SlotManager
    registry: Registry
    backoff: Backoff


class Pipeline:
    """The state of one job as it passes through the middleware chain."""

    __slots__ = ("assigns", "halted", "terminated", "writes")

    def __init__(self, assigns: dict[str, Any], writes: list[Command] | None = None) -> None:
        self.assigns = assigns
        self.writes: list[Command] = [] if writes is None else writes
        self.halted = False
        self.terminated = False

    def halt(self) -> None:
        """Skip the remaining ``before_work`` hooks; the job still runs."""
        self.halted = True

    def terminate(self) -> None:
        """Do not run the job and run no after-hook; it stays in the backup list."""
        self.terminated = True


class Middleware:
    """Base class: every hook is a no-op. Override the ones you need."""

    def before_work(self, pipeline: Pipeline) -> None:
        """Before the job runs (in chain order)."""

    def after_processed_work(self, pipeline: Pipeline) -> None:
        """After the job returned (``assigns["result"]`` is its return value)."""

    def after_failed_work(self, pipeline: Pipeline) -> None:
        """After the job failed (``assigns["error"]`` is the exception)."""
