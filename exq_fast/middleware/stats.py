"""Stats middleware: which counter a finished job moves."""

from __future__ import annotations

from .base import Middleware, Pipeline


class StatsMiddleware(Middleware):
    """``stat:processed`` on success (snoozes included), ``stat:failed`` on failure."""

    def after_processed_work(self, pipeline: Pipeline) -> None:
        pipeline.assigns["stat"] = "processed"

    def after_failed_work(self, pipeline: Pipeline) -> None:
        pipeline.assigns["stat"] = "failed"
