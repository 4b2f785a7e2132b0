"""The scheduler: moves due jobs from the ``schedule`` and ``retry`` zsets to their queues.

``Scheduler`` is a ``BackgroundLoop`` (``background.py``) whose one step is
``store.scheduled.move_due`` for each zset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from .background import BackgroundLoop, ErrorHook, Step
from .config import Config
from .keys import Keys
from .store import scheduled


class Scheduler(BackgroundLoop):
    """Every ``scheduler_poll_timeout`` ms, moves the due members of ``schedule`` and
    ``retry`` to the back of the line of their queues (LPUSH, as Exq; fetch pops from the right).

    Any number of schedulers may run at once, in this process or others: a
    member is pushed only by the caller whose ZREM removed it. A member that is
    not JSON goes to the ``default`` queue rather than blocking later pages.
    """

    thread_name = "exq-scheduler"

    def __init__(self, client: redis.Redis, keys: Keys, config: Config,
                 on_error: ErrorHook | None = None) -> None:
        super().__init__(config.scheduler_poll_timeout / 1000.0, on_error)
        self.client = client
        self.keys = keys
        self.page_size = config.scheduler_page_size

    def steps(self) -> Sequence[Step]:
        """One step: ``run_once`` under the operation name ``"scheduler"``."""
        return [("scheduler", self.run_once)]

    def run_once(self) -> int:
        """Move every job due now from ``schedule``, then ``retry``; return how many."""
        now = time.time()
        moved = 0
        for zset in (self.keys.schedule, self.keys.retry):
            moved += scheduled.move_due(self.client, self.keys, zset, now, self.page_size)
        return moved
