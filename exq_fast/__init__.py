"""exq-fast: a fast Python worker and client for Exq / Sidekiq job queues in Redis."""

from .config import Config, ConfigError, QueueSpec
from .enqueuer import Enqueuer
from .job import InvalidJob, Job, decode
from .keys import Keys
from .queue import Conflict, EnqueueResult

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Conflict",
    "EnqueueResult",
    "Enqueuer",
    "InvalidJob",
    "Job",
    "Keys",
    "QueueSpec",
    "__version__",
    "decode",
]
