"""Logger middleware: a debug line per job, a warning per failure."""

from __future__ import annotations

import logging
import time

from .base import Middleware, Pipeline

logger = logging.getLogger("exq_fast.job")


class LoggerMiddleware(Middleware):
    """Logs at DEBUG on start and success (nothing is formatted unless enabled)."""

    def before_work(self, pipeline: Pipeline) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            pipeline.assigns["started"] = time.perf_counter()
            logger.debug("start %s", _describe(pipeline))

    def after_processed_work(self, pipeline: Pipeline) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            started = pipeline.assigns.get("started", time.perf_counter())
            elapsed = (time.perf_counter() - started) * 1000
            logger.debug("done %s in %.1f ms", _describe(pipeline), elapsed)

    def after_failed_work(self, pipeline: Pipeline) -> None:
        logger.warning("failed %s: %s", _describe(pipeline),
                       pipeline.assigns.get("error_message", "?"))


def _describe(pipeline: Pipeline) -> str:
    job = pipeline.assigns.get("job")
    if job is None:
        return f"payload on queue {pipeline.assigns['queue']!r}"
    return f"{job.job_class} jid={job.jid}"
