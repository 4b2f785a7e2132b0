"""Logger middleware: a debug line per job, a warning per failure.

Everything goes to the ``exq_fast.job`` logger. A failure is one WARNING
record: ``failed <class> jid=<jid>: <message>``, with the Python traceback of
the job's exception attached (``exc_info``) when the job's own code raised it;
a job that never ran (unusable payload, unknown worker) or whose error was
never raised in it (a cancel, an async job's timeout) gets the line alone.
"""

from __future__ import annotations

import logging
import time

from .base import Middleware, Pipeline
from .job import failure_traceback

logger = logging.getLogger("exq_fast.job")


class LoggerMiddleware(Middleware):
    """Logs at DEBUG on start and success (nothing is formatted unless enabled), and
    at WARNING, with the traceback, on failure."""

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
        assigns = pipeline.assigns
        error = assigns.get("error")
        tb = failure_traceback(assigns)
        exc_info = (type(error), error, tb) if error is not None and tb is not None else None
        logger.warning("failed %s: %s", _describe(pipeline),
                       assigns.get("error_message", "?"), exc_info=exc_info)


def _describe(pipeline: Pipeline) -> str:
    job = pipeline.assigns.get("job")
    if job is None:
        return f"payload on queue {pipeline.assigns['queue']!r}"
    return f"{job.job_class} jid={job.jid}"
