"""Snooze middleware: a job returning ``Snooze(seconds)`` runs again later."""

from __future__ import annotations

from dataclasses import dataclass

from ..retry import snooze_commands
from .base import Middleware, Pipeline


@dataclass(frozen=True, slots=True)
class Snooze:
    """Return this from ``perform`` to run the job again in ``seconds``."""

    seconds: float


class SnoozeMiddleware(Middleware):
    """Exq 0.21's snooze: back to the retry set, ``retry_count`` unchanged, counted
    processed (the outcome's ``fate`` becomes ``"snoozed"``).

    Must stand before the Unique middleware: a snoozed job keeps its lock.
    """

    def after_processed_work(self, pipeline: Pipeline) -> None:
        result, job = pipeline.result, pipeline.job
        if isinstance(result, Snooze) and job is not None:
            outcome = pipeline.outcome
            outcome.writes += snooze_commands(pipeline.services.keys, job, result.seconds)
            outcome.fate = "snoozed"
