"""``Api``: Exq.Api for Python -- queues, retry/scheduled/dead sets, stats, nodes.

Reads and writes only the keys of docs/wire-format.md §2 (through ``Keys``),
so it works on data written by exq-fast, Exq 0.13/0.23 or Sidekiq alike, in a
named namespace or in the empty one (Sidekiq 7's layout, with Exq's ``:processes`` quirk).

Tolerant: a member whose bytes are not a job is still listed (``Entry.job`` is
None); an unknown queue lists nothing; a missing jid finds None and moves or
removes 0. Bad arguments (negative sizes, unknown stat kinds) raise
``ValueError``. Raw members are always handled as the exact bytes stored: a
removal or a requeue names the member it means, never a re-encoded copy.

Exq.Api name -> name here (when it differs):

* ``jobs/1`` -> ``jobs_by_queue``; ``remove_enqueued_jobs`` -> ``remove_jobs``
* ``failed`` / ``failed_size`` / ``find_failed`` -> ``dead`` / ``dead_size`` / ``find_dead``
* ``remove_{retry,scheduled,failed}_jobs`` -> ``remove_retry``, ``remove_scheduled``,
  ``remove_dead``
* ``dequeue_{retry,scheduled,failed}_jobs`` -> ``requeue_retry``, ``requeue_scheduled``,
  ``requeue_dead`` (plus ``requeue_all_*``)
* ``stats/2`` -> ``stat``; ``stats/3`` -> ``stats_for_dates`` (plus ``daily_stats`` and
  the dashboard ``stats``)
* ``send_signal`` as is, plus ``quiet`` (TSTP), ``stop`` (TERM) and ``cancel``
* ``prune_dead_nodes`` is the node server's prune, run on demand
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, cast

import redis
from redis.client import Pipeline

from . import nodes as node_registry
from . import scripts
from .config import Config
from .connection import connect, text
from .job import InvalidJob, Job, decode, encode, loads, to_seconds
from .keys import Keys, StatKind
from .store.recovery import requeue_backup

__all__ = ["Api", "Entry", "NodeInfo", "ProcessInfo", "Source", "Stats"]

Source = Literal["exq", "sidekiq", "exq-0.13"]
"""Who registered a node: Exq / exq-fast, Sidekiq, or an Exq 0.13 in-progress record."""

PAGE_SIZE = 1000
"""Members read per round trip when a whole list or set is scanned."""
REQUEUE_CHUNK = 500
"""Members moved per call of the requeue script."""
SIGNAL_TTL = 60
"""EXPIRE of a signal list, in seconds (Exq's and Sidekiq's)."""
FALLBACK_QUEUE = "default"
"""Queue a requeued member goes to when it names none (or is not JSON)."""

_KINDS: tuple[StatKind, ...] = ("processed", "failed")
_NODE_FIELDS = ("info", "busy", "beat", "quiet")


# -- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One member of a queue list or of the retry/schedule/dead set."""

    raw: bytes
    """The member exactly as stored: what ``remove_*`` and ``requeue_*`` take."""
    job: Job | None = dataclasses.field(compare=False)
    """The decoded job, or None when the bytes are not a job."""
    score: float | None = None
    """The zset score (float seconds); None for a queue list member."""

    @property
    def jid(self) -> str | None:
        """The job id, or None."""
        return self.job.jid if self.job is not None else None

    def to_dict(self) -> dict[str, Any] | None:
        """Every field of the payload (error fields included), or None if not a job."""
        return self.job.to_dict() if self.job is not None else None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A worker process registered in ``processes`` (Exq node, Sidekiq process), or
    the Exq 0.13 in-progress records of one host (``source == "exq-0.13"``)."""

    identity: str
    """The registry member: the id signals are sent to."""
    hostname: str | None
    pid: str | int | None
    """As stored: a string for Exq, an integer for Sidekiq and exq-fast."""
    started_at: float | None
    queues: tuple[str, ...]
    busy: int
    quiet: bool
    concurrency: int
    beat: float | None
    """Time of the last ping, float seconds (None for Exq 0.13)."""
    source: Source
    labels: tuple[str, ...] = ()
    tag: str = ""
    version: str | None = None
    stuck: int = 0
    """Jobs running past their timeout, which ignored it (exq-fast's ``info.stuck``;
    0 for other nodes)."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One job in progress, as its node recorded it."""

    node: str
    field: str
    """The record's hash field (Exq worker pid, Sidekiq thread id; Exq 0.13: pid)."""
    queue: str | None
    run_at: float | None
    payload_raw: bytes
    """The job as recorded (Exq: re-encoded; Sidekiq, exq-fast: as fetched)."""
    job: Job | None = dataclasses.field(compare=False)

    @property
    def jid(self) -> str | None:
        """The job id, or None."""
        return self.job.jid if self.job is not None else None


@dataclass(frozen=True, slots=True)
class Stats:
    """The dashboard numbers (Sidekiq's ``Stats``)."""

    processed: int
    failed: int
    retry_size: int
    scheduled_size: int
    dead_size: int
    enqueued: int
    """Jobs waiting in every known queue."""
    busy: int
    """Jobs running, summed over the nodes."""
    processes: int
    """Live nodes (Exq and Sidekiq processes, Exq 0.13 hosts)."""
    in_flight: int = 0
    """Jobs in every node's backup list: running, or left by a node that is gone."""


@dataclass(frozen=True, slots=True)
class _Registry:
    """A process registry set and the hash key of one of its members."""

    key: str
    node_key: Callable[[str], str]


# -- the Api ---------------------------------------------------------------------------


class NodeAlive(Exception):
    """Refused: the node is alive (its backup lists hold running jobs)."""


class Api:
    """Exq.Api over Redis; thread-safe (one connection pool). See the module doc."""

    def __init__(self, config: Config | None = None, *, client: redis.Redis | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        self.keys = Keys(self.config.namespace)
        self.redis = client if client is not None else connect(self.config)
        self._owns_client = client is None

    def close(self) -> None:
        """Release the connection pool (a client passed in is left open)."""
        if self._owns_client:
            self.redis.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queues ------------------------------------------------------------------------

    def queues(self) -> list[str]:
        """The known queue names, sorted."""
        return sorted(text(m) for m in self._smembers(self.keys.queues))

    def queue_sizes(self) -> dict[str, int]:
        """Jobs waiting in each known queue, by name (sorted)."""
        names = self.queues()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(self.keys.queue(name))
        return dict(zip(names, map(_int, pipe.execute(raise_on_error=False)), strict=True))

    def queue_size(self, queue: str) -> int:
        """Jobs waiting in ``queue`` (0 for an unknown queue)."""
        _check_name("queue", queue)
        return int(self.redis.llen(self.keys.queue(queue)))

    def queue_latency(self, queue: str) -> float:
        """Seconds the oldest job of ``queue`` has waited (0.0 when empty), as Sidekiq."""
        _check_name("queue", queue)
        oldest = cast(bytes | None, self.redis.lindex(self.keys.queue(queue), -1))
        job = _entry(oldest).job if oldest is not None else None
        if job is None or job.enqueued_at is None:
            return 0.0
        return max(time.time() - job.enqueued_at, 0.0)

    def jobs(self, queue: str, *, offset: int = 0, size: int = 100) -> list[Entry]:
        """A page of ``queue``, newest first (LRANGE order; the oldest is popped next)."""
        _check_name("queue", queue)
        _check_page(offset, size)
        if size == 0:
            return []
        raws = self._lrange(self.keys.queue(queue), offset, offset + size - 1)
        return [_entry(raw) for raw in raws]

    def jobs_by_queue(self, *, size: int = 100) -> dict[str, list[Entry]]:
        """The first ``size`` jobs of every known queue (Exq's ``jobs/1``)."""
        return {name: self.jobs(name, size=size) for name in self.queues()}

    def find_job(self, queue: str, jid: str) -> Entry | None:
        """The first job of ``queue`` (newest first) with ``jid``, or None."""
        _check_name("queue", queue)
        _check_name("jid", jid)
        for page in self._list_pages(self.keys.queue(queue)):
            found = _first_with_jid(page, jid)
            if found is not None:
                return found
        return None

    def remove_jobs(self, queue: str, raws: Sequence[bytes | str], *,
                    clear_unique_tokens: bool = False) -> int:
        """Remove one copy of each raw member from ``queue``; return how many went.

        With ``clear_unique_tokens`` the unique lock of each removed job is
        released if that job still holds it (compare-and-delete).
        """
        _check_name("queue", queue)
        key = self.keys.queue(queue)
        return self._remove_each(raws, lambda pipe, raw: _lrem_one(pipe, key, raw),
                                 clear_unique_tokens)

    def remove_queue(self, queue: str) -> int:
        """Forget ``queue`` and delete its jobs; return how many jobs were deleted."""
        _check_name("queue", queue)
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(self.keys.queues, queue)
        pipe.llen(self.keys.queue(queue))
        pipe.delete(self.keys.queue(queue))
        return int(pipe.execute()[1])

    def clear_queue(self, queue: str) -> int:
        """Delete every job of ``queue``, keeping its name; return how many were deleted."""
        _check_name("queue", queue)
        pipe = self.redis.pipeline(transaction=True)
        pipe.llen(self.keys.queue(queue))
        pipe.delete(self.keys.queue(queue))
        return int(pipe.execute()[0])

    # -- retry, schedule and dead sets -------------------------------------------------

    def retries(self, *, offset: int = 0, size: int = 100) -> list[Entry]:
        """A page of the retry set, soonest first, with scores."""
        return self._zpage(self.keys.retry, offset, size, newest_first=False)

    def scheduled(self, *, offset: int = 0, size: int = 100) -> list[Entry]:
        """A page of the schedule set, soonest first, with scores."""
        return self._zpage(self.keys.schedule, offset, size, newest_first=False)

    def dead(self, *, offset: int = 0, size: int = 100) -> list[Entry]:
        """A page of the dead set, newest death first, with scores."""
        return self._zpage(self.keys.dead, offset, size, newest_first=True)

    def retry_size(self) -> int:
        """Members of the retry set."""
        return self._zcard(self.keys.retry)

    def scheduled_size(self) -> int:
        """Members of the schedule set."""
        return self._zcard(self.keys.schedule)

    def dead_size(self) -> int:
        """Members of the dead set."""
        return self._zcard(self.keys.dead)

    def find_retry(self, jid: str, score: float | str | None = None) -> Entry | None:
        """The retry entry of ``jid`` (at ``score`` if given, else the soonest), or None."""
        return self._zfind(self.keys.retry, jid, score, newest_first=False)

    def find_scheduled(self, jid: str, score: float | str | None = None) -> Entry | None:
        """The scheduled entry of ``jid`` (at ``score`` if given, else the soonest), or None."""
        return self._zfind(self.keys.schedule, jid, score, newest_first=False)

    def find_dead(self, jid: str, score: float | str | None = None) -> Entry | None:
        """The dead entry of ``jid`` (at ``score`` if given, else the newest), or None."""
        return self._zfind(self.keys.dead, jid, score, newest_first=True)

    def remove_retry(self, raws: Sequence[bytes | str], *,
                     clear_unique_tokens: bool = False) -> int:
        """ZREM the raw members from the retry set; return how many were removed."""
        return self._zremove(self.keys.retry, raws, clear_unique_tokens)

    def remove_scheduled(self, raws: Sequence[bytes | str], *,
                         clear_unique_tokens: bool = False) -> int:
        """ZREM the raw members from the schedule set; return how many were removed."""
        return self._zremove(self.keys.schedule, raws, clear_unique_tokens)

    def remove_dead(self, raws: Sequence[bytes | str], *,
                    clear_unique_tokens: bool = False) -> int:
        """ZREM the raw members from the dead set; return how many were removed."""
        return self._zremove(self.keys.dead, raws, clear_unique_tokens)

    def requeue_retry(self, raws: Sequence[bytes | str]) -> int:
        """Move the raw members of the retry set, byte for byte, to their queues now."""
        return self._requeue(self.keys.retry, _raw_list(raws))

    def requeue_scheduled(self, raws: Sequence[bytes | str]) -> int:
        """Move the raw members of the schedule set, byte for byte, to their queues now."""
        return self._requeue(self.keys.schedule, _raw_list(raws))

    def requeue_dead(self, raws: Sequence[bytes | str]) -> int:
        """Move the raw members of the dead set, byte for byte (error fields kept), to
        their queues. Atomic per member: of concurrent callers exactly one moves it."""
        return self._requeue(self.keys.dead, _raw_list(raws))

    def requeue_all_retries(self) -> int:
        """Move every member of the retry set to its queue; return how many moved."""
        return self._requeue_all(self.keys.retry, newest_first=False)

    def requeue_all_scheduled(self) -> int:
        """Move every member of the schedule set to its queue; return how many moved."""
        return self._requeue_all(self.keys.schedule, newest_first=False)

    def requeue_all_dead(self) -> int:
        """Move every member of the dead set to its queue (newest first); return the count."""
        return self._requeue_all(self.keys.dead, newest_first=True)

    def retry_job(self, jid: str) -> int:
        """Exq's ``retry_job``: move the retry entry of ``jid`` (its exact bytes) to its
        queue now. Returns 1, or 0 when no retry entry has that jid."""
        entry = self.find_retry(jid)
        return 0 if entry is None else self.requeue_retry([entry.raw])

    def clear_retries(self) -> int:
        """Delete the retry set; return how many entries it had."""
        return self._zclear(self.keys.retry)

    def clear_scheduled(self) -> int:
        """Delete the schedule set; return how many entries it had."""
        return self._zclear(self.keys.schedule)

    def clear_dead(self) -> int:
        """Delete the dead set; return how many entries it had."""
        return self._zclear(self.keys.dead)

    def clear_failed(self) -> int:
        """Exq's ``clear_failed``: ``stat:failed`` to 0 and the dead set deleted, in one
        MULTI. Returns how many dead entries there were."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.stat("failed"), 0)
        pipe.zcard(self.keys.dead)
        pipe.delete(self.keys.dead)
        return int(pipe.execute()[1])

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> Stats:
        """The dashboard numbers, like Sidekiq's ``Stats`` (a few pipelined round trips)."""
        pipe = self.redis.pipeline(transaction=False)
        for kind in _KINDS:
            pipe.get(self.keys.stat(kind))
        for key in (self.keys.retry, self.keys.schedule, self.keys.dead):
            pipe.zcard(key)
        processed, failed, retry, scheduled, dead = pipe.execute()
        nodes = self.nodes()
        return Stats(_int(processed), _int(failed), int(retry), int(scheduled), int(dead),
                     sum(self.queue_sizes().values()), sum(n.busy for n in nodes), len(nodes),
                     sum(b.size for b in self.backups()))

    # -- backup lists (jobs in flight) ----------------------------------------------------

    def backups(self) -> list[node_registry.Backup]:
        """Every non-empty backup list, with its node's state (alive, dead, unknown)."""
        window = node_registry.dead_window(self.config.heartbeat_interval,
                                           self.config.missed_heartbeats_allowed)
        return node_registry.backups(self.redis, self.keys,
                                     node_registry.ProcessIdentity.current(), window)

    def requeue_backups(self, node_id: str) -> int:
        """Put the jobs of a node that is not alive back at the front of their queues
        (uncounted) and forget the node. Raises ``NodeAlive`` for a live node: its jobs
        are running. Returns how many jobs moved."""
        lists = [b for b in self.backups() if b.node_id == node_id]
        alive = [b for b in lists if b.state == node_registry.Liveness.ALIVE.value]
        if alive:
            raise NodeAlive(f"node {node_id!r} is alive: its {sum(b.size for b in alive)} "
                            "job(s) in flight are running; stop it first")
        moved = sum(requeue_backup(self.redis, self.keys, node_id, b.queue) for b in lists)
        entry = self.redis.hget(self.keys.nodes, node_id)
        if entry is not None:
            node_registry.forget(self.redis, self.keys, node_id, entry)
        return moved

    def stat(self, kind: str) -> int:
        """The all-time counter ``"processed"`` or ``"failed"`` (0 if never written)."""
        return _int(cast(bytes | None, self.redis.get(self.keys.stat(_kind(kind)))))

    def stats_for_dates(self, kind: str, dates: Sequence[date | str]) -> list[int]:
        """The per-day counters of ``kind`` for each UTC date (``YYYY-MM-DD`` or a date)."""
        names = [self.keys.stat_day(_kind(kind), _day_start(day)) for day in dates]
        if not names:
            return []
        return [_int(v) for v in cast(list[bytes | None], self.redis.mget(names))]

    def daily_stats(self, kind: str, days: int = 7, *,
                    today: date | None = None) -> dict[str, int]:
        """``{"YYYY-MM-DD": count}`` for the last ``days`` UTC days, newest first."""
        if isinstance(days, bool) or not isinstance(days, int) or days < 1:
            raise ValueError(f"days must be a positive integer, got {days!r}")
        last = today if today is not None else datetime.now(UTC).date()
        dates = [last - timedelta(days=n) for n in range(days)]
        counts = self.stats_for_dates(kind, dates)
        return {day.isoformat(): count for day, count in zip(dates, counts, strict=True)}

    def realtime_stats(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Exq's per-second counters: ``(failures, successes)``, each a time-sorted list
        of ``("YYYY-MM-DD HH:MM:SSZ", count)``."""
        return self._realtime("failed"), self._realtime("processed")

    # -- nodes and processes -----------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        """Every live node, sorted by identity, then the Exq 0.13 hosts.

        Reads ``R(processes)`` (Exq) and, with the empty namespace, Sidekiq's
        ``processes`` too; a member whose hash has no ``info`` has stopped and is
        skipped. A node in both registries (exq-fast) is listed once.
        """
        per_registry, legacy = self._registry_members()
        found: dict[str, NodeInfo] = {}
        for registry, ids in per_registry:
            for node in self._read_nodes(registry, ids):
                found.setdefault(node.identity, node)
        return [found[i] for i in sorted(found)] + _legacy_nodes(legacy)

    def processes(self, node: str | None = None) -> list[ProcessInfo]:
        """The jobs in progress (of ``node`` only, if given), by start time.

        Exq's ``<node>:workers`` hashes, Sidekiq's ``<identity>:work`` (6.5+;
        ``:workers`` up to 6.4) and Exq 0.13's JSON records; a job recorded in
        both hashes of one node (exq-fast writes both) is listed once.
        """
        ids, legacy = self._node_ids()
        if node is not None:
            ids = [node]
        records = self._hash_processes(ids) + [
            p for p in map(_legacy_process, legacy) if node is None or p.node == node]
        return sorted(records, key=lambda p: (p.run_at or 0.0, p.node, p.field))

    def busy(self) -> int:
        """Jobs running, summed over the nodes' ``busy`` fields (and Exq 0.13 records)."""
        return sum(node.busy for node in self.nodes())

    def clear_processes(self) -> None:
        """Delete every node's in-progress records (``:workers``, ``:work``, and the
        Exq 0.13 members of the registry). A running node writes its own back."""
        ids, legacy = self._node_ids()
        pipe = self.redis.pipeline(transaction=True)
        for node in ids:
            pipe.delete(self.keys.workers(node), self.keys.sidekiq_work(node))
        for registry in self._registries():
            if legacy:
                pipe.srem(registry.key, *legacy)
        pipe.execute()

    def send_signal(self, node_id: str, signal: str) -> None:
        """LPUSH ``signal`` to the node's signal list(s), EXPIRE 60, in one MULTI.

        With the empty namespace, Sidekiq's ``<identity>-signals`` gets it too.
        """
        _check_name("node_id", node_id)
        _check_name("signal", signal)
        pipe = self.redis.pipeline(transaction=True)
        for key in dict.fromkeys((self.keys.signals(node_id),
                                  self.keys.sidekiq_signals(node_id))):
            pipe.lpush(key, signal)
            pipe.expire(key, SIGNAL_TTL)
        pipe.execute()

    def quiet(self, node_id: str) -> None:
        """Ask ``node_id`` to stop fetching jobs (``TSTP``)."""
        self.send_signal(node_id, "TSTP")

    def stop(self, node_id: str) -> None:
        """Ask ``node_id`` to shut down (``TERM``; Exq nodes ignore it)."""
        self.send_signal(node_id, "TERM")

    def cancel(self, node_id: str, jid: str) -> None:
        """Ask ``node_id`` to cancel the running job ``jid`` (``CANCEL:{"pid","jid"}``).

        Raises ``LookupError`` when no process record of ``node_id`` runs ``jid``.
        """
        _check_name("jid", jid)
        running = [p for p in self.processes(node_id) if p.jid == jid]
        if not running:
            raise LookupError(f"no process of node {node_id!r} is running job {jid!r}")
        body = encode({"pid": running[0].field or "", "jid": jid}).decode("utf-8")
        self.send_signal(node_id, "CANCEL:" + body)

    def prune_dead_nodes(self) -> list[str]:
        """Unregister the members whose node hash has no ``info`` (stopped nodes) and
        delete their in-progress hashes; Exq 0.13 records go too, as Exq does.
        A node that pings meanwhile is kept (WATCH). Returns the members removed."""
        ids, legacy = self._node_ids()
        removed = self._remove_legacy(legacy)
        gone = self._dead_ids(ids)
        return removed + (self._remove_gone(gone) if gone else [])

    # -- helpers: lists and sets -------------------------------------------------------

    def _smembers(self, key: str) -> list[bytes]:
        return [_bytes(m) for m in cast(Iterable[bytes | str], self.redis.smembers(key))]

    def _lrange(self, key: str, start: int, stop: int) -> list[bytes]:
        return [_bytes(m) for m in self.redis.lrange(key, start, stop)]

    def _list_pages(self, key: str) -> Iterator[list[bytes]]:
        start = 0
        while page := self._lrange(key, start, start + PAGE_SIZE - 1):
            yield page
            start += PAGE_SIZE

    def _zcard(self, key: str) -> int:
        return int(self.redis.zcard(key))

    def _zpage(self, key: str, offset: int, size: int, *, newest_first: bool) -> list[Entry]:
        _check_page(offset, size)
        if size == 0:
            return []
        if newest_first:
            reply = self.redis.zrevrangebyscore(key, "+inf", "-inf", start=offset, num=size,
                                                withscores=True)
        else:
            reply = self.redis.zrangebyscore(key, "-inf", "+inf", start=offset, num=size,
                                             withscores=True)
        return _entries(reply)

    def _zpages(self, key: str, *, newest_first: bool) -> Iterator[list[Entry]]:
        start = 0
        while page := _entries(self.redis.zrange(key, start, start + PAGE_SIZE - 1,
                                                 desc=newest_first, withscores=True)):
            yield page
            start += PAGE_SIZE

    def _zfind(self, key: str, jid: str, score: float | str | None, *,
               newest_first: bool) -> Entry | None:
        _check_name("jid", jid)
        if score is not None:
            bound = _score_arg(score)
            return _first_with_jid(_entries(self.redis.zrangebyscore(
                key, bound, bound, withscores=True)), jid)
        for page in self._zpages(key, newest_first=newest_first):
            found = _first_with_jid(page, jid)
            if found is not None:
                return found
        return None

    def _zremove(self, key: str, raws: Sequence[bytes | str], clear_unique_tokens: bool) -> int:
        return self._remove_each(raws, lambda pipe, raw: pipe.zrem(key, raw),
                                 clear_unique_tokens)

    def _remove_each(self, raws: Sequence[bytes | str],
                     command: Callable[[Pipeline, bytes], object],
                     clear_unique_tokens: bool) -> int:
        members = _raw_list(raws)
        if not members:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for raw in members:
            command(pipe, raw)
        removed = [raw for raw, n in zip(members, pipe.execute(), strict=True) if int(n)]
        if clear_unique_tokens:
            self._unlock(removed)
        return len(removed)

    def _unlock(self, raws: Iterable[bytes]) -> None:
        # Only the jobs actually removed: a job no longer there may be running,
        # and its lock is still its own.
        for raw in raws:
            job = _entry(raw).job
            if job is not None and job.unique_token and job.jid:
                scripts.compare_and_delete(self.redis, [self.keys.unique(job.unique_token)],
                                           [job.jid])

    def _requeue(self, key: str, members: list[bytes]) -> int:
        moved = 0
        for start in range(0, len(members), REQUEUE_CHUNK):
            chunk = members[start:start + REQUEUE_CHUNK]
            moved += int(scripts.scheduler_dequeue_jobs(
                self.redis, [key, self.keys.prefix, FALLBACK_QUEUE], chunk))
        return moved

    def _requeue_all(self, key: str, *, newest_first: bool) -> int:
        # Bounded by the size at the start: members added meanwhile wait for a
        # later call, so a set that keeps filling cannot keep this looping.
        budget, moved = self._zcard(key), 0
        while budget > 0:
            page = cast(list[bytes], self.redis.zrange(
                key, 0, min(budget, REQUEUE_CHUNK) - 1, desc=newest_first))
            if not page:
                break
            moved += self._requeue(key, [_bytes(m) for m in page])
            budget -= len(page)
        return moved

    def _zclear(self, key: str) -> int:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zcard(key)
        pipe.delete(key)
        return int(pipe.execute()[0])

    # -- helpers: stats ----------------------------------------------------------------

    def _realtime(self, kind: StatKind) -> list[tuple[str, int]]:
        found = [_bytes(k) for k in self.redis.scan_iter(
            match=self.keys.stat_rt_pattern(kind), count=1000)]
        if not found:
            return []
        values = cast(list[bytes | None], self.redis.mget(found))
        head = self.keys.stat_rt_prefix(kind).encode("utf-8")
        pairs = [(text(k[len(head):]), _int(v)) for k, v in zip(found, values, strict=True)
                 if v is not None and k.startswith(head)]
        return sorted(pairs)

    # -- helpers: registries -----------------------------------------------------------

    def _registries(self) -> list[_Registry]:
        exq = _Registry(self.keys.processes, self.keys.node)
        if self.keys.sidekiq_processes == self.keys.processes:
            return [exq]
        return [exq, _Registry(self.keys.sidekiq_processes, self.keys.sidekiq_process)]

    def _registry_members(self) -> tuple[list[tuple[_Registry, list[str]]], list[bytes]]:
        """The node ids of each registry, and the Exq 0.13 JSON members of any."""
        per_registry: list[tuple[_Registry, list[str]]] = []
        legacy: dict[bytes, None] = {}
        for registry in self._registries():
            members = self._smembers(registry.key)
            legacy.update((m, None) for m in members if _legacy_record(m) is not None)
            per_registry.append((registry, [text(m) for m in members if m not in legacy]))
        return per_registry, list(legacy)

    def _node_ids(self) -> tuple[list[str], list[bytes]]:
        """The node ids of every registry (deduplicated), and the Exq 0.13 members."""
        per_registry, legacy = self._registry_members()
        return list(dict.fromkeys(n for _, ids in per_registry for n in ids)), legacy

    def _read_nodes(self, registry: _Registry, ids: list[str]) -> list[NodeInfo]:
        pipe = self.redis.pipeline(transaction=False)
        for node in ids:
            pipe.hmget(registry.node_key(node), list(_NODE_FIELDS))
        infos = (_node_info(node, values) for node, values in
                 zip(ids, pipe.execute(raise_on_error=False), strict=True)
                 if isinstance(values, list))
        return [info for info in infos if info is not None]

    def _hash_processes(self, ids: list[str]) -> list[ProcessInfo]:
        pipe = self.redis.pipeline(transaction=False)
        for node in ids:
            pipe.hgetall(self.keys.workers(node))
            pipe.hgetall(self.keys.sidekiq_work(node))
        replies = [r if isinstance(r, dict) else {} for r in pipe.execute(raise_on_error=False)]
        out: list[ProcessInfo] = []
        for index, node in enumerate(ids):
            merged = {**replies[2 * index + 1], **replies[2 * index]}  # :workers wins
            out += [_process_info(node, text(f), _bytes(v)) for f, v in merged.items()]
        return out

    def _dead_ids(self, ids: list[str]) -> list[str]:
        per_node = [self._node_keys(node) for node in ids]
        pipe = self.redis.pipeline(transaction=False)
        for node_keys in per_node:
            for key in node_keys:
                pipe.hexists(key, "info")
        # An error reply (not a hash) counts as alive: prune never touches what it
        # cannot read.
        alive = iter(not isinstance(r, int) or bool(r) for r in pipe.execute(raise_on_error=False))
        return [node for node, node_keys in zip(ids, per_node, strict=True)
                if sum(next(alive) for _ in node_keys) == 0]

    def _remove_legacy(self, legacy: list[bytes]) -> list[str]:
        if not legacy:
            return []
        pipe = self.redis.pipeline(transaction=True)
        for registry in self._registries():
            pipe.srem(registry.key, *legacy)
        pipe.execute()
        return [text(member) for member in legacy]

    def _node_keys(self, node: str) -> list[str]:
        return list(dict.fromkeys(r.node_key(node) for r in self._registries()))

    def _remove_gone(self, candidates: list[str]) -> list[str]:
        # WATCH the candidates' hashes and check again: a node that pings between
        # the check and EXEC aborts the transaction, so a live node never loses
        # its records. After an abort, nothing is removed (the next prune retries).
        watched = [key for node in candidates for key in self._node_keys(node)]
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*watched)  # type: ignore[no-untyped-call]
                gone = [n for n in candidates
                        if not any(pipe.hexists(k, "info") for k in self._node_keys(n))]
                if gone:
                    pipe.multi()
                    for registry in self._registries():
                        pipe.srem(registry.key, *gone)
                    for node in gone:
                        pipe.delete(self.keys.workers(node), self.keys.sidekiq_work(node))
                    pipe.execute()
            except redis.WatchError:
                return []
        return gone


# -- pure helpers ----------------------------------------------------------------------


def _lrem_one(pipe: Pipeline, key: str, raw: bytes) -> object:
    # redis-py types LREM's value as str; it sends bytes unchanged, as needed here.
    return pipe.lrem(key, 1, raw)  # type: ignore[arg-type]


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _int(value: object) -> int:
    """A counter as stored (bytes, str, int or None) as an int; junk reads as 0."""
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _check_page(offset: object, size: object) -> None:
    for name, value in (("offset", offset), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _kind(kind: object) -> StatKind:
    if kind == "processed":
        return "processed"
    if kind == "failed":
        return "failed"
    raise ValueError(f"unknown stat kind {kind!r}: expected 'processed' or 'failed'")


def _day_start(day: object) -> float:
    """Unix time of 00:00 UTC of ``day`` (a date, or ``YYYY-MM-DD`` text)."""
    if isinstance(day, str):
        try:
            day = date.fromisoformat(day)
        except ValueError:
            raise ValueError(f"not a date: {day!r} (expected YYYY-MM-DD)") from None
    if not isinstance(day, date):
        raise ValueError(f"not a date: {day!r}")
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _score_arg(score: float | str) -> str:
    """A score bound for ZRANGEBYSCORE: Redis's own text as given, or a float's repr."""
    try:
        value = float(score) if not isinstance(score, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise ValueError(f"not a score: {score!r}")
    return score if isinstance(score, str) else repr(value)


def _raw_list(raws: object) -> list[bytes]:
    if isinstance(raws, str | bytes | bytearray) or not isinstance(raws, Iterable):
        raise ValueError("raws must be a list of raw members, not a single value")
    members = list(raws)
    for raw in members:
        if not isinstance(raw, str | bytes):
            raise ValueError(f"a raw member must be bytes or str, got {raw!r}")
    return [_bytes(raw) for raw in members]


def _entry(raw: bytes | str, score: float | None = None) -> Entry:
    data = _bytes(raw)
    try:
        job: Job | None = decode(data)
    except InvalidJob:
        job = None
    return Entry(data, job, score)


def _entries(reply: object) -> list[Entry]:
    pairs = cast(list[tuple[bytes | str, float]], reply)
    return [_entry(member, float(score)) for member, score in pairs]


def _plain(needle: str) -> bool:
    """True if ``needle`` is written the same inside any JSON string (no escapes)."""
    return needle.isascii() and needle.isprintable() and not any(c in needle for c in '"\\/')


def _first_with_jid(items: Iterable[Entry | bytes], jid: str) -> Entry | None:
    plain = _plain(jid)
    needle = jid.encode("utf-8")
    for item in items:
        raw = item.raw if isinstance(item, Entry) else item
        if plain and needle not in raw:
            continue  # cheap filter: the jid's bytes must be in the member
        entry = item if isinstance(item, Entry) else _entry(raw)
        if entry.jid == jid:
            return entry
    return None


def _json_object(raw: bytes | str) -> dict[str, Any]:
    try:
        value = loads(_bytes(raw))
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _str_tuple(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _float(value: object) -> float | None:
    try:
        return float(value) if isinstance(value, bytes | str | int | float) else None
    except ValueError:
        return None


def _quiet(stored: bytes | None, info: dict[str, Any]) -> bool:
    if stored is not None:
        return text(stored) == "true"
    return info.get("quiet") is True


def _node_info(node: str, values: list[bytes | None]) -> NodeInfo | None:
    raw_info, busy, beat, quiet = values
    if raw_info is None:
        return None  # stopped (hash expired) or never registered
    info = _json_object(raw_info)
    pid = info.get("pid")
    return NodeInfo(
        identity=node, hostname=_opt_str(info.get("hostname")),
        pid=pid if isinstance(pid, str | int) and not isinstance(pid, bool) else None,
        started_at=to_seconds(info.get("started_at")), queues=_str_tuple(info.get("queues")),
        busy=_int(busy) if busy is not None else _int(info.get("busy")),
        quiet=_quiet(quiet, info), concurrency=_int(info.get("concurrency")),
        beat=_float(beat), source="exq" if "busy" in info else "sidekiq",
        labels=_str_tuple(info.get("labels")), tag=_opt_str(info.get("tag")) or "",
        version=_opt_str(info.get("version")), stuck=max(_int(info.get("stuck")), 0),
    )


def _process_info(node: str, name: str, value: bytes) -> ProcessInfo:
    record = _json_object(value)
    payload = record.get("payload")
    if isinstance(payload, str):
        raw = payload.encode("utf-8")
    else:
        raw = encode(payload) if isinstance(payload, dict) else value
    job = _entry(raw).job
    queue = _opt_str(record.get("queue")) or (job.queue if job is not None else None)
    return ProcessInfo(node, name, queue, to_seconds(record.get("run_at")), raw, job)


def _legacy_record(member: bytes) -> dict[str, Any] | None:
    """An Exq 0.13 in-progress record (a JSON object member of ``processes``), or None."""
    if not member.startswith(b"{"):
        return None
    record = _json_object(member)
    return record if record else None


def _legacy_process(member: bytes) -> ProcessInfo:
    record = _legacy_record(member) or {}
    job_text = record.get("job")
    raw = job_text.encode("utf-8") if isinstance(job_text, str) else member
    job = _entry(raw).job
    return ProcessInfo(_opt_str(record.get("host")) or "", _opt_str(record.get("pid")) or "",
                       job.queue if job is not None else None,
                       to_seconds(record.get("started_at")), raw, job)


def _legacy_nodes(members: list[bytes]) -> list[NodeInfo]:
    by_host: dict[str, list[ProcessInfo]] = {}
    for process in map(_legacy_process, members):
        by_host.setdefault(process.node, []).append(process)
    return [_legacy_node(host, group) for host, group in sorted(by_host.items())]


def _legacy_node(host: str, group: list[ProcessInfo]) -> NodeInfo:
    starts = [p.run_at for p in group if p.run_at is not None]
    return NodeInfo(
        identity=host, hostname=host, pid=None, started_at=min(starts) if starts else None,
        queues=tuple(sorted({p.queue for p in group if p.queue})), busy=len(group),
        quiet=False, concurrency=0, beat=None, source="exq-0.13",
    )
