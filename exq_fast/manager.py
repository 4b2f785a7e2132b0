"""``Manager``: the fetch loop, per-queue concurrency, subscriptions.

One fetcher thread moves jobs from ``queue:<q>`` to this node's backup list
``queue:backup::<node>::<q>`` -- as many as every subscribed queue has free
slots, for all queues in one round trip (``scripts.fetch``) -- and submits each
to the executor. Timing follows Exq's manager: fetch again at once while jobs
arrive; wait ``poll_timeout`` when the queues are empty; wait for a free slot
when every queue is full; wait ``poll_timeout`` x 10 after a Redis error, then
carry on (redis-py reconnects; no job is lost: a fetched job is in the backup
list before it is handed out).

A fetch whose reply is lost (connection cut, Redis crash after the script ran)
has moved jobs into the backup list that this process never saw. So the
manager tracks the fetched jobs it has not seen acked, and after a failed
fetch it reconciles: whatever sits in the backup list of those queues and is
not tracked was fetched by the lost call, and is run now rather than left for
the next start.

Fetching also pauses while acks cannot be written (Redis out of memory or
read-only, a network that lets only reads through): once ``stats_batch_size``
finished jobs wait for their ack, no job is fetched until a batch lands, so
the jobs fetched and unacked -- what a crash re-runs -- stay bounded by one
batch plus the concurrency (see ``Manager._held_back``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

import redis

from .config import Config
from .keys import Keys
from .scripts import FETCH_BATCH_LIMIT
from .stats import Done
from .store.fetch import Fetched, fetch
from .store.recovery import RecoveryPolicy, bury_poison, recover_backup

logger = logging.getLogger("exq_fast")

UNLIMITED_IN_FLIGHT = 1000
"""Most jobs of one queue in flight when its concurrency is unlimited."""

class RunJob(Protocol):
    """Runs one job: its bytes, its queue, whether it is a suspect (recovered
    before), and what to call once it has ended (an async job ends after the
    call returns)."""

    def __call__(self, raw: bytes, queue: str, suspect: bool,
                 on_end: Callable[[], None] | None = None) -> None: ...

ErrorHook = Callable[[str, BaseException], None]

PAUSE_NOTICE = 1.0
"""Seconds fetching must be held back by unacked jobs before the pause is logged and
counted: a stats writer merely behind by a batch holds it back for a flush or two."""


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


class Manager:
    """Fetches jobs for the subscribed queues and frees slots as jobs end."""

    def __init__(self, client: redis.Redis, keys: Keys, config: Config, executor: Executor,
                 run_job: RunJob, on_error: ErrorHook | None = None) -> None:
        self.client = client
        self.keys = keys
        self.config = config
        self.executor = executor
        self.run_job = run_job
        self.on_error = on_error
        self.poll_timeout = config.poll_timeout / 1000
        self.errors = 0
        self._failing = False  # a fetch failed and none has succeeded since
        self.fetched: dict[str, int] = {}
        """Jobs fetched since start, per queue."""
        self.on_recovered: Callable[[str, str, int], None] | None = None
        """Called with (queue, reason, count) when backup jobs are re-enqueued."""
        self._states: dict[str, QueueState] = {}
        # Fetched jobs not yet acked in Redis, per queue (see the module doc).
        self._tracked: dict[str, Counter[bytes]] = {}
        self._tracked_lock = threading.Lock()
        self._unsure: set[str] = set()
        self.policy = RecoveryPolicy.of(config)
        self._held: deque[tuple[bytes, str]] = deque()
        self._quarantine_lock = threading.Lock()
        self._quarantine_busy = False
        self._subscribed: list[str] = []
        self._subscribe_lock = threading.Lock()
        self.max_unacked = config.stats_batch_size
        """Finished jobs that may wait for their ack before fetching pauses."""
        # Jobs dispatched whose batch has not reached Redis (under _cond).
        self._unacked = 0
        self._held_since: float | None = None  # when fetching was first held back
        self.paused = False
        """True while fetching is paused because acks do not reach Redis (logged)."""
        self.pauses = 0
        """Pauses since start."""
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the configured queues and start fetching."""
        for spec in self.config.queue_specs:
            self._states[spec.name] = QueueState(spec.concurrency)
            self._subscribed.append(spec.name)
        self._thread = threading.Thread(target=self._loop, name="exq-manager", daemon=True)
        self._thread.start()

    def recover_backups(self) -> int:
        """Move this node's backup lists of the configured queues back to their fronts.

        Run at start, before fetching: the jobs there were fetched by an
        earlier process with this node id and never acked.
        """
        return sum(self._recover(q, "startup") for q in self.config.queue_names)

    def _recover(self, queue: str, reason: str) -> int:
        config, policy = self.config, self.policy
        moved, poisoned = recover_backup(self.client, self.keys, config.node_id, queue,
                                         policy)
        if poisoned:
            # In flight here when this node died max_recoveries times: dead, not re-run.
            logger.warning("%d job(s) of %r recovered %d times go to the dead set", poisoned,
                           queue, config.max_recoveries)
            bury_poison(self.client, self.keys, policy)
        if self.on_recovered is not None:
            for count, why in ((moved, reason), (poisoned, "poison")):
                if count:
                    self.on_recovered(queue, why, count)
        return moved

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
                with self._tracked_lock:
                    idle = state.running == 0 and not self._tracked.get(queue)
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

    def busy(self) -> int:
        """Jobs running now, all queues."""
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

    def job_terminated(self, queue: str, success: bool) -> None:
        """Free one slot of ``queue`` (the Manager middleware calls this)."""
        with self._cond:
            self._states[queue].running -= 1
            self._cond.notify_all()

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

    def finished_unacked(self) -> int:
        """Jobs that finished here and whose ack (or retry/dead write) is not in Redis yet."""
        with self._cond:
            return max(self._unacked - self.busy(), 0)

    def _held_back(self) -> bool:
        """Whether fetching waits for acks; the caller holds ``_cond``.

        The decision: no fetch while ``max_unacked`` (``stats_batch_size``)
        jobs have finished and wait for their ack (``_unacked`` counts the
        jobs dispatched whose batch has not landed; minus those running or
        waiting to start, it is the finished ones). Running jobs do not count,
        so a node whose concurrency is above the batch size is never held back
        by its own work, and a healthy stats writer, which takes a whole batch
        per flush, holds it back for a flush at most. ``batch_applied`` wakes
        the loop when a batch lands; ``poll_timeout`` is the ceiling.

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
        finished = self._unacked - self.busy()
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
        except (redis.exceptions.RedisError, OSError) as exc:
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
        self.errors += 1
        if not self._failing:
            logger.warning("fetch failed, retrying every %.1f s: %s", self.poll_timeout * 10, exc)
        self._failing = True
        if self.on_error is not None:
            self.on_error("fetch", exc)

    def _reconcile(self) -> None:
        """Run the jobs a lost fetch moved into our backup lists (see the module doc)."""
        for queue in sorted(self._unsure):
            backup = self.keys.backup(self.config.node_id, queue)
            # The lock keeps acks from being forgotten between the LRANGE and
            # the comparison: a job acked meanwhile is either still listed and
            # still tracked, or gone from both.
            with self._tracked_lock:
                present: Counter[bytes] = Counter(
                    raw for raw in self.client.lrange(backup, 0, -1) if isinstance(raw, bytes))
                lost = present - self._tracked.get(queue, Counter())
            orphans = list(lost.elements())
            if orphans:
                logger.warning("running %d jobs of %r fetched by a call whose reply was lost",
                               len(orphans), queue)
                self._dispatch(queue, Fetched(orphans))
            self._unsure.discard(queue)

    def batch_applied(self, done: Sequence[Done], seconds: float) -> None:
        """Forget the jobs whose ack reached Redis (the stats writer calls this).

        Every finished job of the batch, acked or not, stops waiting for its
        ack; a fetch loop held back by unacked jobs is woken.
        """
        with self._cond:
            self._unacked = max(self._unacked - len(done), 0)
            if self._held_since is not None:
                self._cond.notify_all()
        with self._tracked_lock:
            for item in done:
                if item.ack:
                    tracked = self._tracked.get(item.flight.queue)
                    if tracked is not None:
                        tracked[item.flight.raw] -= 1
                        if tracked[item.flight.raw] <= 0:
                            del tracked[item.flight.raw]

    def _dispatch(self, queue: str, fetched: Fetched) -> int:
        jobs = fetched.jobs
        if not jobs:
            return 0
        with self._tracked_lock:
            self._tracked.setdefault(queue, Counter()).update(jobs)
        with self._cond:
            self._states[queue].running += len(jobs)
            self._unacked += len(jobs)
        submit, run_job = self.executor.submit, self.run_job
        for index, raw in enumerate(jobs):
            if index in fetched.quarantined:
                self._quarantine(raw, queue)
            else:
                submit(run_job, raw, queue, index in fetched.suspects)
        self.fetched[queue] = self.fetched.get(queue, 0) + len(jobs)
        return len(jobs)

    # -- quarantine: suspects one crash from the dead set run one at a time ------

    def _quarantine(self, raw: bytes, queue: str) -> None:
        # A job that crashed its node on every recent run is run alone among
        # the quarantined, so if this node dies now, the next recovery counts
        # only the job that was actually running -- not the ones that merely
        # shared a fetch with it. Waiting ones sit fetched, in the backup list.
        with self._quarantine_lock:
            self._held.append((raw, queue))
            if self._quarantine_busy:
                return
            self._quarantine_busy = True
        self._run_next_quarantined()

    def _run_next_quarantined(self) -> None:
        with self._quarantine_lock:
            if not self._held:
                self._quarantine_busy = False
                return
            raw, queue = self._held.popleft()
        self.executor.submit(self._run_quarantined, raw, queue)

    def _run_quarantined(self, raw: bytes, queue: str) -> None:
        # The next one starts when this one has *ended* (an async job ends
        # after run_job returns); run_job never raises and always calls on_end.
        self.run_job(raw, queue, True, self._run_next_quarantined)
