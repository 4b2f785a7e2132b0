"""exq-fast: a fast Python worker and client for Exq / Sidekiq job queues in Redis."""

import logging

from ._version import __version__
from .app import Exq
from .config import Config, ConfigError, QueueSpec
from .define import JobFunction, worker
from .enqueuer import EnqueueOptions, Enqueuer
from .job import InvalidJob, Job, decode
from .keys import Keys
from .middleware import Middleware, Pipeline, Snooze
from .registry import Registry, UnknownWorker
from .store.enqueue import Conflict, EnqueueResult
from .timeouts import JobTimeout
from .worker import Cancelled, current_job

# A library does not configure logging: without a handler of the
# application's, exq-fast's records go nowhere (not to stderr).
logging.getLogger("exq_fast").addHandler(logging.NullHandler())

__all__ = [
    "Cancelled",
    "Config",
    "ConfigError",
    "Conflict",
    "EnqueueOptions",
    "EnqueueResult",
    "Enqueuer",
    "Exq",
    "InvalidJob",
    "Job",
    "JobFunction",
    "JobTimeout",
    "Keys",
    "Middleware",
    "Pipeline",
    "QueueSpec",
    "Registry",
    "Snooze",
    "UnknownWorker",
    "__version__",
    "current_job",
    "decode",
    "worker",
]
