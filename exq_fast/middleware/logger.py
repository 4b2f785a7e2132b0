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

from ..outcome import error_text, failure_traceback
from .base import Middleware, Pipeline

logger = logging.getLogger("exq_fast.job")


class LoggerMiddleware(Middleware):
    """Logs at DEBUG on start and success (nothing is formatted unless enabled), and
    at WARNING, with the traceback, on failure."""

    def before_work(self, pipeline: Pipeline) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("start %s", _describe(pipeline))

    def after_processed_work(self, pipeline: Pipeline) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            elapsed = (time.perf_counter() - pipeline.record.started) * 1000
            logger.debug("done %s in %.1f ms", _describe(pipeline), elapsed)

    def after_failed_work(self, pipeline: Pipeline) -> None:
        error = pipeline.error
        tb = failure_traceback(pipeline.record, error)
        exc_info = (type(error), error, tb) if error is not None and tb is not None else None
        message = error_text(error)[1] if error is not None else "?"
        logger.warning("failed %s: %s", _describe(pipeline), message, exc_info=exc_info)


def _describe(pipeline: Pipeline) -> str:
    job = pipeline.job
    if job is None:
        return f"payload on queue {pipeline.queue!r}"
    return f"{job.job_class} jid={job.jid}"
