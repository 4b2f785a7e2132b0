"""``Api``: Exq.Api for Python, as one view per thing administered.

``Api(config)`` holds one connection pool and the views over it::

    api.queues      Queues     names, sizes; api.queues.queue(name) -> Queue
    api.retries     JobSet     the retry set      (soonest first)
    api.scheduled   JobSet     the schedule set   (soonest first)
    api.dead        JobSet     the dead set       (newest death first)
    api.processes   Processes  nodes, running jobs, signals, prune, backup lists
    api.stats       Counters   counters per day and per second, the summary Stats

Each view reads and writes only the keys of docs/wire-format.md §2 (through
``Keys``), so it works on data written by exq-fast, Exq 0.13/0.23 or Sidekiq
alike, in a named namespace or in the empty one (Sidekiq 7's layout, with
Exq's ``:processes`` quirk). Each module's doc states what it owns, its round
trips and what is atomic.

Tolerant: a member whose bytes are not a job is still listed (``Entry.job`` is
None); an unknown queue lists nothing; a missing jid finds None and moves or
removes 0. Bad arguments (negative sizes, unknown stat kinds) raise
``ValueError``. Raw members are always handled as the exact bytes stored: a
removal or a requeue names the member it means, never a re-encoded copy.

Exq.Api name -> name here:

* ``queues`` / ``queue_size`` / ``jobs`` / ``find_job`` / ``remove_enqueued_jobs`` /
  ``remove_queue`` -> ``queues.names()``, ``queues.sizes()``, ``queue(q).size()``,
  ``queue(q).page()``, ``queue(q).find()``, ``queue(q).remove()``, ``queue(q).delete()``
  (``jobs/1`` -> ``queues.jobs_by_queue()``)
* ``retries`` / ``scheduled`` / ``failed``, their ``*_size``, ``find_*``,
  ``remove_*_jobs`` and ``dequeue_*_jobs`` -> ``page``, ``size``, ``find``, ``remove``
  and ``requeue`` of ``retries`` / ``scheduled`` / ``dead`` (plus ``requeue_all``,
  ``clear``, and Sidekiq's ``kill`` / ``kill_all`` of a retry or scheduled entry to
  the dead set); ``retry_job`` -> ``retries.requeue_jid``
* ``stats/2`` / ``stats/3`` / ``realtime_stats`` / ``clear_failed`` -> ``stats.total``,
  ``stats.for_dates``, ``stats.realtime``, ``stats.clear_failed`` (plus ``stats.daily``
  and the dashboard ``stats.summary()``)
* ``processes`` / ``busy`` / ``clear_processes`` / ``send_signal`` ->
  ``processes.running``, ``processes.busy``, ``processes.clear_running``,
  ``processes.send_signal`` (plus ``nodes``, ``quiet`` (TSTP), ``stop`` (TERM),
  ``cancel``, ``backups``, ``requeue_backups``)
* ``prune_dead_nodes`` is the node server's prune, run on demand; also a plain
  function, ``prune_dead_nodes(client, keys)``
"""

from __future__ import annotations

import redis

from ..config import Config
from ..connection import connect
from ..keys import Keys
from ._common import Entry
from .processes import NodeAlive, NodeInfo, Processes, ProcessInfo, Source, prune_dead_nodes
from .queues import Queue, Queues
from .sets import DeadLimits, JobSet, SetName
from .stats import Counters, Stats

__all__ = [
    "Api", "Counters", "DeadLimits", "Entry", "JobSet", "NodeAlive", "NodeInfo", "ProcessInfo",
    "Processes", "Queue", "Queues", "SetName", "Source", "Stats", "prune_dead_nodes",
]


class Api:
    """The admin views over one Redis and namespace; thread-safe (one connection pool).
    See the package doc."""

    def __init__(self, config: Config | None = None, *, client: redis.Redis | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        self.keys = Keys(self.config.namespace)
        self.redis = client if client is not None else connect(self.config)
        self._owns_client = client is None
        self.queues = Queues(self.redis, self.keys)
        """Every queue; ``queues.queue(name)`` is one of them."""
        limits = DeadLimits(self.config.dead_max_jobs, self.config.dead_timeout_in_seconds)
        self.retries = JobSet(self.redis, self.keys, "retry", limits)
        """The retry set, soonest first."""
        self.scheduled = JobSet(self.redis, self.keys, "schedule", limits)
        """The schedule set, soonest first."""
        self.dead = JobSet(self.redis, self.keys, "dead")
        """The dead set, newest death first."""
        self.processes = Processes(self.redis, self.keys, self.config)
        """Nodes, the jobs they run, signals, prune, backup lists."""
        self.stats = Counters(self.redis, self.keys, self.queues, self.processes)
        """The counters and the dashboard summary."""

    def close(self) -> None:
        """Release the connection pool (a client passed in is left open)."""
        if self._owns_client:
            self.redis.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
