"""``Fetcher``: the fetch loop, per-queue concurrency slots, subscriptions.

One fetcher thread moves jobs from ``queue:<q>`` to this node's backup list
``queue:backup::<node>::<q>`` -- as many as every subscribed queue has free
slots, for all queues in one round trip (``scripts.fetch``) -- and submits each
to the executor. Timing follows Exq's manager: fetch again at once while jobs
arrive; wait ``poll_timeout`` when the queues are empty; wait for a free slot
when every queue is full; wait ``poll_timeout`` x 10 after a Redis error, then
carry on (redis-py reconnects; no job is lost: a fetched job is in the backup
list before it is handed out).

Each fetched job becomes an ``inflight.InFlight`` record, tracked by
``inflight.InFlightJobs`` until its ack lands. A fetch whose reply is lost
(connection cut, Redis crash after the script ran) has moved jobs into the
backup list that this process never saw: after a failed fetch the fetcher
reconciles -- whatever sits in the backup list of those queues and is not
tracked was fetched by the lost call, and is run now rather than left for the
next start. Quarantined jobs go to ``inflight.Quarantine`` (one at a time).

A job's slot is taken when it is fetched and freed when it ends
(``job_ended``, which the worker calls once per job, whatever happened).

Fetching also pauses while acks cannot be written (Redis out of memory or
read-only, a network that lets only reads through): once ``stats_batch_size``
finished jobs wait for their ack, no job is fetched until a batch lands, so
the jobs fetched and unacked -- what a crash re-runs -- stay bounded by one
batch plus the concurrency (see ``Fetcher._held_back``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence

import redis

from .background import REDIS_ERRORS, ErrorHook, RecoveredHook
from .config import Config
from .inflight import Dispatch, InFlight, InFlightJobs, Quarantine
from .keys import Keys
from .scripts import FETCH_BATCH_LIMIT
from .store.fetch import Fetched, backup_list, fetch
from .store.recovery import RecoveryPolicy, recover_backup, settle

logger = logging.getLogger("exq_fast")

UNLIMITED_IN_FLIGHT = 1000
"""Most jobs of one queue in flight when its concurrency is unlimited."""

PAUSE_NOTICE = 1.0
"""Seconds fetching must be held back by unacked jobs before the pause is logged and
counted: an ack writer merely behind by a batch holds it back for a flush or two."""


class QueueState:
    """A queue's limit (None = unlimited) and the jobs of it running now."""

    __slots__ = ("limit", "running")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.running = 0

    def free(self) -> int:
        """How many more jobs of this queue may start now."""
        cap = UNLIMITED_IN_FLIGHT if self.limit is None else self.limit
        return max(cap - self.running, 0)


class Fetcher:
    """Fetches jobs for the subscribed queues while they have free slots."""

    def __init__(self, client: redis.Redis, keys: Keys, config: Config, inflight: InFlightJobs,
                 *, dispatch: Dispatch, quarantine: Quarantine,
                 on_error: ErrorHook | None = None,
                 on_recovered: RecoveredHook | None = None) -> None:
        """``dispatch(records)`` hands the jobs of a fetch to worker threads (called on
        the fetcher's thread; ``WorkerServer.dispatch``); ``quarantine`` runs the
        quarantined ones; ``on_error(operation, exc)`` hears of every failed fetch;
        ``on_recovered(queue, reason, count)`` of every backup job re-enqueued."""
        self.client = client
        self.keys = keys
        self.config = config
        self.inflight = inflight
        self.dispatch = dispatch
        self.quarantine = quarantine
        self.on_error = on_error
        self.on_recovered = on_recovered
        self.poll_timeout = config.poll_timeout / 1000
        self.policy = RecoveryPolicy.of(config)
        self.max_unacked = config.stats_batch_size
        """Finished jobs that may wait for their ack before fetching pauses."""
        self.fetched: dict[str, int] = {}
        """Jobs fetched since start, per queue."""
        self.paused = False
        """True while fetching is paused because acks do not reach Redis (logged)."""
        self.pauses = 0
        """Pauses since start."""
        self._failing = False  # a fetch failed and none has succeeded since
        self._unsure: set[str] = set()  # queues whose last fetch reply was lost
        self._held_since: float | None = None  # when fetching was first held back
        self._states: dict[str, QueueState] = {}
        self._subscribed: list[str] = []
        self._subscribe_lock = threading.Lock()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the configured queues and start fetching."""
        for spec in self.config.queue_specs:
            self._states[spec.name] = QueueState(spec.concurrency)
            self._subscribed.append(spec.name)
        self._thread = threading.Thread(target=self._loop, name="exq-fetcher", daemon=True)
        self._thread.start()

    def recover_backups(self) -> int:
        """Move this node's backup lists of the configured queues back to their fronts.

        Run at start, before fetching: the jobs there were fetched by an
        earlier process with this node id and never acked.
        """
        return sum(self._recover(q, "startup") for q in self.config.queue_names)

    def _recover(self, queue: str, reason: str) -> int:
        counts = recover_backup(self.client, self.keys, self.config.node_id, queue, self.policy)
        # Poison jobs (in flight here when this node died max_recoveries times): dead.
        settle(self.client, self.keys, self.policy, queue, counts, reason, self.on_recovered)
        return counts[0]

    def stop_fetching(self) -> None:
        """Stop the fetch loop (running jobs go on) and wait for the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs, up to ``timeout`` seconds. True if idle."""
        with self._cond:
            return self._cond.wait_for(lambda: self.busy() == 0, timeout)

    # -- subscriptions -----------------------------------------------------------

    def subscribe(self, queue: str, concurrency: int | str | None = "default") -> None:
        """Start fetching ``queue`` (concurrency: int, None = unlimited, or the default).

        The queue's backup list is recovered only when none of its jobs runs
        here or waits for its ack, so a re-subscribe never duplicates a running
        or finished job (Exq #310).
        """
        limit = self.config.concurrency if concurrency == "default" else concurrency
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"concurrency must be a positive integer or None, got {limit!r}")
        with self._subscribe_lock:  # one subscribe at a time: one recovery
            with self._cond:
                state = self._states.setdefault(queue, QueueState(limit))
                state.limit = limit
                subscribed = queue in self._subscribed
                idle = state.running == 0 and not self.inflight.any_of(queue)
            # Recovered *before* the queue is subscribed: once it is, the fetcher
            # may move jobs into the backup list, and a recovery then would put
            # them back in the queue while they run -- they would run twice.
            if idle and not subscribed:
                self._recover(queue, "subscribe")
            with self._cond:
                if queue not in self._subscribed:
                    self._subscribed.insert(0, queue)  # Exq prepends new subscriptions
        self._wake()

    def unsubscribe(self, queue: str) -> None:
        """Stop fetching ``queue``; its running jobs finish normally."""
        with self._cond:
            if queue in self._subscribed:
                self._subscribed.remove(queue)

    def unsubscribe_all(self) -> None:
        """Stop fetching every queue (quiet)."""
        with self._cond:
            self._subscribed.clear()

    def subscriptions(self) -> list[str]:
        """The queues being fetched, newest subscription first."""
        with self._cond:
            return list(self._subscribed)

    # -- slots -------------------------------------------------------------------

    def busy(self) -> int:
        """Jobs running now (or fetched and waiting to start), all queues."""
        return sum(state.running for state in list(self._states.values()))

    def running_by_queue(self) -> dict[str, int]:
        """Jobs running now, per queue ever subscribed."""
        return {name: state.running for name, state in list(self._states.items())}

    def limits(self) -> dict[str, int]:
        """The concurrency limit of each subscribed queue (unlimited: the in-flight cap)."""
        with self._cond:
            states = {q: self._states[q] for q in self._subscribed}
        return {q: UNLIMITED_IN_FLIGHT if s.limit is None else s.limit
                for q, s in states.items()}

    def total_concurrency(self) -> int:
        """The sum of the subscribed queues' limits (unlimited counts as the in-flight cap)."""
        return sum(self.limits().values())

    def job_ended(self, record: InFlight) -> None:
        """The job has ended, whatever happened to it (the worker calls this once per
        job): free its slot, and start the next quarantined job if it was one."""
        with self._cond:
            self._states[record.queue].running -= 1
            self._cond.notify_all()
        if record.quarantined:
            self.quarantine.ended()

    def batch_applied(self, done: Sequence[InFlight], seconds: float) -> None:
        """A batch landed (the ack writer calls this): its jobs stop waiting for their
        ack, and a fetch loop held back by unacked jobs may go on."""
        self.inflight.acked(done)
        with self._cond:
            if self._held_since is not None:
                self._cond.notify_all()

    def finished_unacked(self) -> int:
        """Jobs that finished here and whose ack (or retry/dead write) is not in Redis yet."""
        with self._cond:
            return max(self.inflight.unacked() - self.busy(), 0)

    # -- the fetch loop ------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                held = self._held_back()
                wanted = self._wanted()
                if not wanted or held:
                    # A finishing job or a batch landing (while held back) wakes us.
                    self._cond.wait(self.poll_timeout)
                    continue
            delay = self._fetch_and_dispatch(wanted)
            if delay:
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(delay)

    def _held_back(self) -> bool:
        """Whether fetching waits for acks; the caller holds ``_cond``.

        The decision: no fetch while ``max_unacked`` (``stats_batch_size``)
        jobs have finished and wait for their ack (``InFlightJobs.unacked``
        counts the jobs fetched whose batch has not landed; minus those running
        or waiting to start, it is the finished ones). Running jobs do not
        count, so a node whose concurrency is above the batch size is never
        held back by its own work, and a healthy ack writer, which takes a whole
        batch per flush, holds it back for a flush at most. ``batch_applied``
        wakes the loop when a batch lands; ``poll_timeout`` is the ceiling.

        The promise: a fetch happens only while fewer than B = max_unacked
        finished jobs wait for their ack, and takes at most the free slots,
        C - running (C: the sum of the queues' limits, an unlimited queue
        counting as ``UNLIMITED_IN_FLIGHT``). Right after it the jobs fetched
        and unacked are at most (B - 1) + running + (C - running) = B + C - 1,
        and until the next fetch that number can only fall. So this node's
        backup lists never hold more than B + C - 1 jobs it fetched, and a
        crash re-runs at most that many: the jobs running or waiting to start,
        plus the finished ones whose batch had not landed (fewer than B + C,
        since jobs running at the pause still finish). Jobs a middleware
        terminated (no ack, on purpose) stay in the backup list and are not
        counted; a lost fetch reply is reconciled before the next decision.
        """
        finished = self.finished_unacked()  # _cond is re-entrant
        if finished < self.max_unacked:
            if self._held_since is not None:
                self._resume()
            return False
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        elif not self.paused and now - self._held_since >= PAUSE_NOTICE:
            self.paused = True
            self.pauses += 1
            logger.warning("fetching paused: %d finished jobs wait for their ack (limit %d, "
                           "stats_batch_size); Redis is not taking the acks", finished,
                           self.max_unacked)
        return True

    def _resume(self) -> None:
        if self.paused and self._held_since is not None:
            logger.warning("fetching resumed: acks reach Redis again (paused %.1f s)",
                           time.monotonic() - self._held_since)
        self.paused = False
        self._held_since = None

    def _wanted(self) -> list[tuple[str, int]]:
        wanted = []
        for name in self._subscribed:
            free = self._states[name].free()
            if free:
                wanted.append((name, min(free, FETCH_BATCH_LIMIT)))
        return wanted

    def _fetch_and_dispatch(self, wanted: list[tuple[str, int]]) -> float:
        """One fetch; returns how long to wait before the next (0 = at once)."""
        try:
            if self._unsure:
                self._reconcile()
                return 0.0  # the orphans took slots: decide again before fetching
            replies = fetch(self.client, self.keys, self.config.node_id, wanted,
                            self.policy)
        except REDIS_ERRORS as exc:
            # The script may have run and only its reply been lost.
            self._unsure.update(name for name, _ in wanted)
            self._fetch_failed(exc)
            return self.poll_timeout * 10
        if self._failing:
            logger.warning("fetching recovered")
        self._failing = False
        dispatched = 0
        for (name, _), fetched in zip(wanted, replies, strict=True):
            dispatched += self._dispatch(name, fetched)
        return 0.0 if dispatched else self.poll_timeout

    def _fetch_failed(self, exc: BaseException) -> None:
        if not self._failing:
            logger.warning("fetch failed, retrying every %.1f s: %s", self.poll_timeout * 10, exc)
        self._failing = True
        if self.on_error is not None:
            self.on_error("fetch", exc)

    def _reconcile(self) -> None:
        """Run the jobs a lost fetch moved into our backup lists (see the module doc)."""
        for queue in sorted(self._unsure):
            backup = self.keys.backup(self.config.node_id, queue)
            orphans = self.inflight.orphans(queue, functools.partial(backup_list, self.client,
                                                                     backup))
            if orphans:
                logger.warning("running %d jobs of %r fetched by a call whose reply was lost",
                               len(orphans), queue)
                self._dispatch(queue, Fetched(orphans))
            self._unsure.discard(queue)

    def _dispatch(self, queue: str, fetched: Fetched) -> int:
        """Track the fetched jobs, take their slots, hand each to the executor."""
        jobs = fetched.jobs
        if not jobs:
            return 0
        self.inflight.fetched(queue, jobs)
        with self._cond:
            self._states[queue].running += len(jobs)
        backup = self.keys.backup(self.config.node_id, queue)
        records = [InFlight(raw, queue, backup) for raw in jobs]
        for index in fetched.suspects:
            records[index].suspect = True
        if fetched.quarantined:
            for index in fetched.quarantined:
                records[index].quarantined = True
                self.quarantine.put(records[index])
            records = [record for record in records if not record.quarantined]
        self.dispatch(records)
        self.fetched[queue] = self.fetched.get(queue, 0) + len(jobs)
        return len(jobs)
