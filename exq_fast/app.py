"""``Exq``: one in-process exq-fast node -- start, run, stop.

    from exq_fast import Config, Exq, worker

    @worker("MyApp.Worker")
    def perform(user_id, action): ...

    with Exq(Config(queues=["default", ("mail", 5)])) as exq:
        exq.enqueue("default", "MyApp.Worker", [1, "welcome"])
        ...

Start order: connect and load the scripts; claim the node id (refused while
another live process holds it, see ``nodes``); delete this node's stale
in-progress records; move this node's backup lists back to the front of their
queues (jobs an earlier process with this node id fetched and never acked);
recover the backup lists of dead nodes (on this host: any whose process is
gone, so a restart under a new id still re-runs its predecessor's jobs at
once); then start the ack writer, the executor, the fetcher, the scheduler,
the node pinger and the heartbeat with its dead-node monitor.

Stop order (``stop()``, SIGTERM under ``exq-fast run``): stop fetching; wait up
to ``shutdown_timeout`` for running jobs; stop the scheduler and heartbeat;
flush the ack writer (the acks of every finished job); put the jobs still
unfinished back at the front of their queues, uncounted (a graceful stop is
not a crash: no job moves towards the poison limit); remove this node's
records; interrupt the jobs still running (``NodeStopped`` raised in their
threads, async ones cancelled), so that they do not run on to their end beside
their queued copy. The late completion of a job that ignores it is not acked. When
Redis cannot be reached at the stop, the unfinished jobs stay in the backup
list and are recovered by a restart or a live node's monitor.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from prometheus_client import CollectorRegistry

from . import define, nodes, scripts
from ._version import __version__
from .acks import AckWriter
from .background import REDIS_ERRORS
from .config import Config
from .connection import connect
from .enqueuer import EnqueueOptions, Enqueuer, WorkerRef
from .fetcher import Fetcher
from .heartbeat import Heartbeat, NodePinger
from .inflight import InFlight, InFlightJobs, Quarantine
from .keys import Keys
from .metrics import ClusterCollector, Metrics, MetricsServer, serve_metrics
from .middleware import Middleware, Services, default_chain
from .pool import WorkerPool
from .registry import DEFAULT_REGISTRY, Registry
from .scheduler import Scheduler
from .store.enqueue import EnqueueResult
from .store.recovery import backup_queues, requeue_backup
from .worker import WorkerServer

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger("exq_fast")

ASYNC_STARTERS = 4
"""Threads that start async jobs (decode, before hooks, the call that returns the
coroutine); the coroutines themselves run on the node's event loop."""



def _registry(workers: Registry | Mapping[str, object] | None,
              allowed_modules: Sequence[str]) -> Registry:
    if isinstance(workers, Registry):
        return workers
    if workers is None and not allowed_modules:
        return DEFAULT_REGISTRY
    return Registry(workers or {}, allowed_modules=allowed_modules)


class Exq:
    """A worker node: fetches, runs, acks, retries, schedules and beats. See the module doc."""

    def __init__(self, config: Config | None = None, *,
                 workers: Registry | Mapping[str, object] | None = None,
                 allowed_modules: Sequence[str] = (),
                 client: redis.Redis | None = None,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        self.keys = Keys(self.config.namespace)
        self.identity = nodes.ProcessIdentity.current()
        self.registry = _registry(workers, allowed_modules)
        self.redis = client if client is not None else connect(self.config)
        self.enqueuer = Enqueuer(self.config, client=self.redis)
        self.redis_errors: dict[str, int] = {}
        self.recovered: dict[tuple[str, str], int] = {}
        self._counts_lock = threading.Lock()
        self.metrics = Metrics(metrics_registry, self.config.metrics_prefix, __version__,
                               source=_MetricsSource(self))
        if self.config.metrics_cluster:
            self.metrics.registry.register(
                ClusterCollector(self.redis, self.keys, self.config.metrics_prefix))
        self.metrics_server: MetricsServer | None = None
        # Threads are started on demand and reused; the fetcher's per-queue limits
        # bound how many jobs run at once, and so the threads.
        self.executor = WorkerPool("exq-worker")
        # Async jobs only start on a thread (the coroutine runs on the event loop):
        # a few threads start them all, so a burst does not start a thread each.
        self.starter = WorkerPool("exq-starter", max_threads=ASYNC_STARTERS)
        self.inflight = InFlightJobs()
        self.fetcher = Fetcher(self.redis, self.keys, self.config, self.inflight,
                               dispatch=self._dispatch_jobs,
                               quarantine=Quarantine(self.executor.submit, self._run_job),
                               on_error=self._redis_error, on_recovered=self._recovered)
        self.acks = AckWriter(self.redis, self.keys, self.config.node_id,
                              flush_interval_ms=self.config.stats_flush_interval,
                              batch_size=self.config.stats_batch_size,
                              on_error=self._redis_error,
                              listeners=(self.fetcher, self.metrics)
                              if self.config.metrics_enabled else (self.fetcher,))
        chain: Sequence[Middleware] = default_chain() if self.config.middleware is None \
            else self.config.middleware
        self.server = WorkerServer(Services(self.redis, self.keys, self.config), self.registry,
                                   chain, acks=self.acks, on_end=self.fetcher.job_ended,
                                   pool=self.executor, starter=self.starter)
        self.scheduler = Scheduler(self.redis, self.keys, self.config, on_error=self._redis_error)
        self.pinger = NodePinger(self.redis, self.keys, self.config, _NodeState(self),
                                 on_error=self._redis_error, identity=self.identity)
        self.heartbeat = Heartbeat(self.redis, self.keys, self.config,
                                   on_error=self._redis_error, on_recovered=self._recovered,
                                   identity=self.identity)
        self.stopped = threading.Event()
        self._started = False
        self._stop_lock = threading.Lock()

    # The fetcher is built before the worker (the worker frees the fetcher's slots):
    # these two methods are the fetcher's way to the worker.
    def _dispatch_jobs(self, records: Sequence[InFlight]) -> None:
        self.server.dispatch(records)

    def _run_job(self, record: InFlight) -> None:
        self.server.run(record)

    def _redis_error(self, operation: str, exc: BaseException) -> None:
        with self._counts_lock:
            self.redis_errors[operation] = self.redis_errors.get(operation, 0) + 1

    def _recovered(self, queue: str, reason: str, count: int) -> None:
        with self._counts_lock:
            key = (queue, reason)
            self.recovered[key] = self.recovered.get(key, 0) + count

    @property
    def metrics_url(self) -> str | None:
        """The URL of ``/metrics`` while the endpoint runs (the chosen port if 0 was asked)."""
        return self.metrics_server.url if self.metrics_server is not None else None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Exq:
        """Start every part of the node (see the module docstring for the order)."""
        if self.config.metrics_port is not None:
            self.metrics_server = serve_metrics(self.metrics.registry, self.config)
        try:
            self._start_node()
        except BaseException:
            # A failed start (Redis unreachable, bad password) leaves nothing
            # running and no port bound.
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.metrics.close()
            raise
        self._started = True
        # Where JobFunction.enqueue writes while this node runs (see define).
        define.set_default_target(self)
        return self

    def _start_node(self) -> None:
        scripts.load_all(self.redis)
        self._warn_eviction_policy()
        nodes.claim(self.redis, self.keys, self.config.node_id, self.identity,
                    self.heartbeat.window())
        self.redis.delete(self.keys.workers(self.config.node_id))
        recovered = self.fetcher.recover_backups()
        if recovered:
            logger.info("re-enqueued %d jobs from this node's backup lists", recovered)
        # Dead nodes' jobs run again now, not at the monitor's first tick.
        self.heartbeat.monitor()
        logger.info("exq-fast node %s consuming %s (namespace %r)", self.config.node_id,
                    ", ".join(self.config.queue_names), self.config.namespace)
        self.acks.start()
        self.fetcher.start()
        if self.config.scheduler_enable:
            self.scheduler.start()
        self.pinger.start()
        if self.config.heartbeat_enable:
            self.heartbeat.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Graceful stop. Returns True if every running job finished in time."""
        with self._stop_lock:
            if not self._started or self.stopped.is_set():
                return True
            budget = self.config.shutdown_timeout / 1000 if timeout is None else timeout
            self.fetcher.unsubscribe_all()
            self.fetcher.stop_fetching()
            idle = self.fetcher.wait_idle(budget)
            self.scheduler.stop()
            self.heartbeat.stop()
            flushed = self.acks.stop()
            self.pinger.stop()
            running = len(self.server.running)
            requeued = self._requeue_unfinished() if flushed else None
            self._remove_node(forget=requeued is not None)
            self._log_unfinished(idle, running, requeued)  # before _close's interrupt line
            self._close()
            return idle and flushed

    def abort(self, budget: float = 0.8) -> tuple[int, int | None]:
        """Forced stop (a second SIGTERM/SIGINT): within ``budget`` seconds, stop
        fetching, flush the acks of finished jobs and put the unfinished ones back
        at the front of their queues, uncounted. Returns (jobs running, jobs put
        back, or None when that could not be done in time: they stay in the backup
        list for a restart or a monitor). The caller then exits the process."""
        done: list[int | None] = []

        def work() -> None:
            self.fetcher.unsubscribe_all()
            self.pinger.stop(0.0)  # no ping after the records are removed
            self.acks.stop(timeout=budget / 2)
            requeued = self._requeue_unfinished()
            done.append(requeued)
            self._remove_node(forget=requeued is not None)

        thread = threading.Thread(target=work, name="exq-abort", daemon=True)
        thread.start()
        thread.join(budget)
        return len(self.server.running), (done[0] if done else None)

    def _close(self) -> None:
        define.set_default_target(None, only_if=self)
        # Jobs not yet started are cancelled: they were put back (or stay in the backup).
        self.executor.shutdown()
        self.starter.shutdown()
        # Jobs still running were put back in their queues (or stay in the backup
        # list): they must not run on to their end here. Sync ones get NodeStopped
        # raised in their thread; async ones are cancelled with the loop.
        interrupted = self.server.interrupt_running()
        if interrupted:
            logger.warning("interrupted %d job(s) still running (NodeStopped): they run "
                           "again from their queue", interrupted)
        self.server.loop.stop()
        self.server.watchdog.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.metrics.close()
        self.redis.close()
        self.stopped.set()

    def _requeue_unfinished(self) -> int | None:
        """Put every job left in this node's backup lists back at the front of its queue,
        uncounted (see the module doc). None when Redis could not be reached."""
        node = self.config.node_id
        try:
            return sum(requeue_backup(self.redis, self.keys, node, name)
                       for name in backup_queues(self.redis, self.keys, node))
        except REDIS_ERRORS as exc:
            # The jobs stay in the backup list: a restart or a monitor re-runs them.
            logger.warning("could not put the unfinished jobs back at stop: %s", exc)
            return None

    @staticmethod
    def _log_unfinished(idle: bool, running: int, requeued: int | None) -> None:
        if not idle:
            logger.warning("%d job(s) still running after the shutdown timeout", running)
        if requeued:
            logger.warning("%d unfinished job(s) put back at the front of their queues",
                           requeued)
        elif requeued is None:
            logger.warning("unfinished jobs stay in this node's backup lists: a restart or "
                           "another node's monitor runs them again")

    def _remove_node(self, forget: bool) -> None:
        try:
            self.pinger.remove()
            if forget:  # nothing of this node's is left: no monitor needs to know it
                nodes.forget(self.redis, self.keys, self.config.node_id, self.identity.to_json())
        except REDIS_ERRORS as exc:
            # Redis is down: the node hash expires by itself (60 s TTL) and the
            # next start cleans this node's in-progress records.
            logger.warning("could not remove this node's entries at stop: %s", exc)

    def request_stop(self) -> None:
        """Stop from another thread (a TERM signal), without waiting."""
        threading.Thread(target=self.stop, name="exq-stop", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the node has stopped (``stop()`` from elsewhere, a TERM signal
        through Redis); True if it did within ``timeout``."""
        return self.stopped.wait(timeout)

    def run_forever(self) -> None:
        """Start the node if needed and run until SIGTERM or SIGINT (Ctrl-C), then
        stop gracefully and return; a TERM signal through Redis stops it too.

        As ``exq-fast run``: a second SIGTERM/SIGINT during the graceful stop
        stops at once (``exit_now``: the process exits with status 1). Call it
        from the main thread (Python delivers signals there); the previous
        handlers are restored before it returns.
        """
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if stop.is_set():
                self.exit_now(name)
            logger.info("received %s: stopping gracefully (send it again to stop at once)",
                        name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not self._started:
                self.start()
            while not (stop.wait(0.5) or self.stopped.is_set()):
                pass
        finally:
            stop.set()  # a signal during the stop stops at once
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def exit_now(self, reason: str, budget: float = 0.8) -> NoReturn:
        """The forced stop of a second SIGTERM/SIGINT: ``abort(budget)`` (finished jobs
        acked, unfinished ones put back at the front of their queues), then exit the
        process with status 1. Never returns."""
        logger.warning("received %s again: stopping at once", reason)
        running, requeued = self.abort(budget)
        if requeued is not None:
            logger.warning("forced stop: %d job(s) were running; %d unfinished job(s) put "
                           "back at the front of their queues", running, requeued)
        else:
            logger.warning("forced stop: %d job(s) were running; the unfinished jobs stay in "
                           "this node's backup lists, to run again at a restart or by another "
                           "node", running)
        logging.shutdown()
        os._exit(1)

    def __enter__(self) -> Exq:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _warn_eviction_policy(self) -> None:
        try:
            policy = self.redis.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.exceptions.RedisError:
            return  # CONFIG may be disabled (managed Redis): nothing to check
        if policy not in (None, "noeviction", b"noeviction"):
            logger.warning("Redis maxmemory-policy is %s: Redis may evict queued jobs; "
                           "use noeviction", policy)

    # -- subscriptions and enqueue passthroughs ----------------------------------

    def subscribe(self, queue: str, concurrency: int | str | None = "default") -> None:
        """Start consuming ``queue`` at run time."""
        self.fetcher.subscribe(queue, concurrency)

    def unsubscribe(self, queue: str) -> None:
        """Stop consuming ``queue``; its running jobs finish."""
        self.fetcher.unsubscribe(queue)

    def unsubscribe_all(self) -> None:
        """Stop consuming every queue (quiet)."""
        self.fetcher.unsubscribe_all()

    def subscriptions(self) -> list[str]:
        """The queues being consumed."""
        return self.fetcher.subscriptions()

    def enqueue(self, queue: str, worker_class: WorkerRef, args: Sequence[Any] = (),
                **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """See ``Enqueuer.enqueue``."""
        return self.enqueuer.enqueue(queue, worker_class, args, **options)

    def enqueue_at(self, queue: str, when: datetime | float, worker_class: WorkerRef,
                   args: Sequence[Any] = (), **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """See ``Enqueuer.enqueue_at``."""
        return self.enqueuer.enqueue_at(queue, when, worker_class, args, **options)

    def enqueue_in(self, queue: str, delay: timedelta | float, worker_class: WorkerRef,
                   args: Sequence[Any] = (), **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """See ``Enqueuer.enqueue_in``."""
        return self.enqueuer.enqueue_in(queue, delay, worker_class, args, **options)

    def enqueue_all(self, jobs: Iterable[Sequence[Any]]) -> list[EnqueueResult]:
        """See ``Enqueuer.enqueue_all``."""
        return self.enqueuer.enqueue_all(jobs)


class _NodeState:
    """What the node pinger reports and the signals it delivers."""

    def __init__(self, exq: Exq) -> None:
        self.exq = exq

    def busy(self) -> int:
        return self.exq.fetcher.busy()

    def subscriptions(self) -> list[str]:
        return self.exq.fetcher.subscriptions()

    def total_concurrency(self) -> int:
        return self.exq.fetcher.total_concurrency()

    def stuck(self) -> int:
        return self.exq.server.watchdog.stuck_count()

    def running_jobs(self) -> list[InFlight]:
        return list(self.exq.server.running.values())

    def on_signal(self, signal: str) -> None:
        if signal == "TSTP":
            logger.info("TSTP: quiet (no more fetching)")
            self.exq.unsubscribe_all()
        elif signal == "TERM":
            logger.info("TERM: stopping")
            self.exq.request_stop()
        elif signal.startswith("CANCEL:"):
            self._cancel(signal[len("CANCEL:"):])
        else:
            logger.info("ignoring signal %r", signal)

    def _cancel(self, text: str) -> None:
        try:
            jid = json.loads(text)["jid"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed CANCEL signal %r", text)
            return
        if self.exq.server.cancel(str(jid)):
            logger.info("cancel requested for job %s", jid)


class _MetricsSource:
    """What the metrics collector reads from the node at scrape time."""

    def __init__(self, exq: Exq) -> None:
        self.exq = exq

    def in_progress(self) -> dict[str, int]:
        return self.exq.fetcher.running_by_queue()

    def concurrency(self) -> dict[str, int]:
        return self.exq.fetcher.limits()

    def oldest_running_age(self) -> float:
        starts = [r.run_at for r in list(self.exq.server.running.values())]
        return max(time.time() - min(starts), 0.0) if starts else 0.0

    def stats_pending(self) -> int:
        return self.exq.acks.pending()

    def fetched(self) -> dict[str, int]:
        return dict(self.exq.fetcher.fetched)

    def recovered(self) -> dict[tuple[str, str], int]:
        with self.exq._counts_lock:
            return dict(self.exq.recovered)

    def redis_errors(self) -> dict[str, int]:
        with self.exq._counts_lock:
            return dict(self.exq.redis_errors)

    def heartbeat_last_success(self) -> float:
        return self.exq.pinger.last_success

    def fetch_paused(self) -> bool:
        return self.exq.fetcher.paused

    def fetch_pauses(self) -> int:
        return self.exq.fetcher.pauses

    def stuck(self) -> int:
        return self.exq.server.watchdog.stuck_count()
