"""Fetch and ack: take jobs from their queues into this node's backup lists, and
remove each from there once it is done.

Contract: ``fetch`` makes one round trip, one call of the ``fetch`` script for
all the queues asked for, atomic: each job it returns is in exactly one place,
its backup list. The bytes are returned exactly as stored, since the ack removes
those bytes. ``ack_command`` is the ack itself, a command of the batch that
``acks.AckWriter`` applies atomically with the job's retry/dead writes and the
counters. ``backup_list`` reads a backup list whole (one ``LRANGE``), to find
the jobs a fetch whose reply was lost moved there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from .. import scripts
from ..keys import Keys
from ..retry import Command
from .recovery import RecoveryPolicy


@dataclass(frozen=True, slots=True)
class Fetched:
    """A queue's fetched jobs (oldest first), and which of them were recovered before.

    ``suspects``: positions of jobs recovered from a backup before (their
    start is marked in Redis, see ``RecoveryPolicy``); ``quarantined``: the
    suspects one counted crash from the dead set, to be run one at a time.
    """

    jobs: list[bytes]
    suspects: frozenset[int] = frozenset()
    quarantined: frozenset[int] = frozenset()


def fetch(client: redis.Redis, keys: Keys, node_id: str, wanted: Sequence[tuple[str, int]],
          policy: RecoveryPolicy | None = None) -> list[Fetched]:
    """Move up to ``n`` jobs of each ``(queue, n)`` into this node's backup lists.

    ``n`` is capped at ``scripts.FETCH_BATCH_LIMIT``. Returns each queue's jobs
    in the order of ``wanted``.
    """
    job_keys: list[str] = [keys.suspects, keys.recoveries]
    args: list[str | int] = [(policy or RecoveryPolicy()).quarantine_at]
    for queue, count in wanted:
        job_keys += [keys.queue(queue), keys.backup(node_id, queue)]
        args.append(min(count, scripts.FETCH_BATCH_LIMIT))
    return [Fetched(jobs, _positions(suspects), _positions(quarantined))
            for jobs, suspects, quarantined in scripts.fetch(client, job_keys, args)]


def _positions(lua_indexes: Sequence[int]) -> frozenset[int]:
    """0-based positions from the script's 1-based Lua indexes."""
    return frozenset(int(n) - 1 for n in lua_indexes)


def backup_list(client: redis.Redis, backup: str) -> list[bytes]:
    """Every job in a backup list, as stored (one round trip)."""
    return [raw for raw in client.lrange(backup, 0, -1) if isinstance(raw, bytes)]


# -- ack -------------------------------------------------------------------------------


def ack_command(backup: str, raws: Sequence[bytes]) -> Command:
    """The ack of jobs of one backup list, a command of the ``apply_batch`` script:
    ``ACK <backup> <raw>...`` runs ``LREM <backup> -1 <raw>`` for each, removing
    the exact fetched bytes (count -1 searches from the tail, where the oldest
    fetched jobs sit)."""
    return ("ACK", backup, *raws)
