"""Scheduled jobs: move the due members of ``schedule`` and ``retry`` into their queues.

Contract: ``move_due`` reads a page of ``page_size`` due members (ZRANGEBYSCORE),
reads each one's queue from its JSON, and moves the page in one atomic call
(``move_members``, which names every key it touches: the zset, ``queues`` and
each target queue), until a page comes back short; a member is moved by the one
caller whose ZREM removed it, so any number of callers may run at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import redis

from .. import scripts
from ..job import loads_object
from ..keys import Keys


def move_due(client: redis.Redis, keys: Keys, zset: str, now: float, page_size: int,
             fallback_queue: str = "default") -> int:
    """Move the members of ``zset`` due by ``now`` into their queues, a page per call.

    A member whose JSON cannot be read goes to ``fallback_queue``. Returns the
    number of members moved.
    """
    moved = 0
    while True:
        members = cast(list[bytes], client.zrangebyscore(zset, 0, repr(now), start=0,
                                                         num=page_size))
        if members:
            moved += move_members(client, keys, zset, members, fallback_queue)
        if len(members) < page_size:
            return moved


def move_members(client: redis.Redis, keys: Keys, zset: str, members: Sequence[bytes],
                 fallback_queue: str = "default") -> int:
    """Move the given members of ``zset`` to the front of their queues now, due or not
    (the admin's requeue), in one atomic call. A member another caller removed first
    is not moved; one whose JSON cannot be read goes to ``fallback_queue``. Returns
    how many moved."""
    names = scripts.ScriptKeys(zset, keys.queues)
    args: list[bytes | str | int] = []
    for member in members:
        queue = queue_of(member, fallback_queue)
        args += (queue, names.position(keys.queue(queue)), member)
    return int(scripts.move_members(client, names.keys, args))


def queue_of(member: bytes | str, fallback_queue: str) -> str:
    """The ``queue`` a scheduled job names, or ``fallback_queue`` when it is not a JSON
    object with a string ``queue`` (the worker then buries it with its reason)."""
    job = loads_object(member.encode("utf-8", "surrogatepass") if isinstance(member, str)
                       else member)
    queue = job.get("queue") if job is not None else None
    return queue if isinstance(queue, str) else fallback_queue
