"""Scheduled jobs: move the due members of ``schedule`` and ``retry`` into their queues.

Contract: ``move_due`` makes one round trip per page of ``page_size`` members
(``scheduler_dequeue``), each page atomic, until a page comes back short; a
member is moved by the one caller whose ZREM removed it, so any number of
callers may run at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from .. import scripts
from ..keys import Keys


def move_due(client: redis.Redis, keys: Keys, zset: str, now: float, page_size: int,
             fallback_queue: str = "default") -> int:
    """Move the members of ``zset`` due by ``now`` into their queues, a page per call.

    A member whose JSON cannot be read goes to ``fallback_queue``. Returns the
    number of members moved.
    """
    moved = 0
    while True:
        seen, count = scripts.scheduler_dequeue(
            client, [zset], [page_size, repr(now), keys.prefix, fallback_queue]
        )
        moved += int(count)
        if int(seen) < page_size:
            return moved


def move_members(client: redis.Redis, keys: Keys, zset: str, members: Sequence[bytes],
                 fallback_queue: str = "default") -> int:
    """Move the given members of ``zset`` to the front of their queues now, due or not
    (the admin's requeue), in one atomic call. A member another caller removed first
    is not moved; one whose JSON cannot be read goes to ``fallback_queue``. Returns
    how many moved."""
    return int(scripts.scheduler_dequeue_jobs(client, [zset],
                                              [keys.prefix, fallback_queue, *members]))
