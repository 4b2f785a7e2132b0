"""Unique middleware: releases a job's unique lock at the moment its mode says."""

from __future__ import annotations

import logging

import redis

from ..job import Job
from ..store.enqueue import unlock
from .base import Middleware, Pipeline, Services

logger = logging.getLogger("exq_fast")
UNLOCK_ATTEMPTS = 3


def _release(services: Services, job: Job) -> None:
    """Compare-and-delete the lock with the job's own jid (Exq #502), 3 tries."""
    if job.unique_token is None or job.jid is None:
        return
    for attempt in range(UNLOCK_ATTEMPTS):
        try:
            unlock(services.redis, services.keys, job.unique_token, job.jid)
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if attempt == UNLOCK_ATTEMPTS - 1:
                # The lock then lives until it expires (unique_for): the job
                # itself is unaffected.
                logger.warning("could not release unique lock of %s: %s", job.jid, exc)


class UniqueMiddleware(Middleware):
    """``start``: unlock before the first run; ``success``: after success or death;
    ``expiry``: never (the lock expires)."""

    def before_work(self, pipeline: Pipeline) -> None:
        job = pipeline.job
        if job is not None and job.unique_until == "start" and job.retry_count == 0:
            _release(pipeline.services, job)

    def after_processed_work(self, pipeline: Pipeline) -> None:
        job = pipeline.job
        if job is not None and job.unique_until == "success" \
                and pipeline.outcome.fate != "snoozed":
            _release(pipeline.services, job)

    def after_failed_work(self, pipeline: Pipeline) -> None:
        job = pipeline.job
        if job is not None and job.unique_until == "success" and pipeline.outcome.fate == "dead":
            _release(pipeline.services, job)
