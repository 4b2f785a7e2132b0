"""``BackgroundLoop``: the thread-and-backoff machinery of exq-fast's periodic tasks.

The scheduler (``scheduler.py``), the node pinger and the heartbeat
(``heartbeat.py``) are ``BackgroundLoop`` subclasses: one tick runs their
steps on a daemon thread that never dies from an exception; Redis outages are
logged once (first failure and recovery) and retried with exponential backoff,
and every failed step is reported to an ``ErrorHook``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis

logger = logging.getLogger("exq_fast")

ErrorHook = Callable[[str, BaseException], None]
"""Called with an operation name and the exception on every failed Redis operation
(a background step, a fetch, an ack batch): what ``exq_redis_errors_total`` counts."""

RecoveredHook = Callable[[str, str, int], None]
"""Called with ``(queue, reason, count)`` when jobs of ``queue`` are moved back from a
backup list (reason ``startup``, ``subscribe``, ``heartbeat``) or buried as poison
(reason ``poison``)."""

REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
"""Exceptions that mean "Redis is unreachable or refused": an outage, not a bug.
(redis-py's cluster client raises ``RedisClusterException``s, such as
``RedisClusterUnreachableError``, that are not ``RedisError``s.)"""

MAX_BACKOFF_FLOOR = 5.0
"""The backoff cap is 10 intervals, but never less than this many seconds."""

Step = tuple[str, Callable[[], object]]
"""One step of a tick: its operation name (logs, ``ErrorHook``) and what it runs."""


class BackgroundLoop:
    """A periodic task run by a daemon thread; subclasses define the steps of one tick.

    ``tick()`` runs every step, catches everything a step raises and returns the
    seconds to wait before the next tick: the interval after success, a growing
    backoff after a failure. ``start()``/``stop()`` manage the thread.
    """

    thread_name = "exq-loop"

    def __init__(self, interval: float, on_error: ErrorHook | None = None) -> None:
        self.interval = interval
        self.on_error = on_error
        self.last_success = 0.0
        """Unix time the last tick fully succeeded (0 before the first)."""
        self._failures = 0  # consecutive failed ticks; 0 = healthy
        self._outage = False  # a Redis error was logged and no tick has succeeded since
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def steps(self) -> Sequence[Step]:
        """The ``(operation name, callable)`` pairs one tick runs, in order."""
        raise NotImplementedError

    def tick(self) -> float:
        """Run one tick without ever raising; return the seconds until the next one."""
        # A list, not a generator: every step runs even if an earlier one failed.
        results = [self._guarded(name, step) for name, step in self.steps()]
        if all(results):
            self._healthy()
            return self.interval
        self._failures += 1
        return self.error_delay(self._failures)

    def error_delay(self, failures: int) -> float:
        """Backoff after ``failures`` consecutive failed ticks: the interval doubling
        each time, capped at 10 intervals or 5 s, whichever is larger."""
        cap = max(10 * self.interval, MAX_BACKOFF_FLOOR)
        return min(self.interval * 2.0 ** min(failures, 64), cap)

    def start(self) -> None:
        """Start the daemon thread (no-op if it is already running). The first tick
        runs at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_event = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop_event,), name=self.thread_name, daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the thread to stop and wait up to ``timeout`` seconds (None: until it
        does). A tick in progress is finished, not interrupted. True once stopped."""
        self._stop_event.set()
        thread = self._thread
        if thread is threading.current_thread():
            return False  # called from a step (e.g. a signal handler): it exits after this tick
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self, stop_event: threading.Event) -> None:
        while True:
            delay = self.tick()
            if stop_event.wait(delay):
                return

    def _guarded(self, name: str, step: Callable[[], object]) -> bool:
        try:
            step()
        except REDIS_ERRORS as exc:
            # An outage: warn on its first failure only, the loop backs off and retries.
            if not self._outage:
                logger.warning("%s: Redis error, retrying with backoff: %r", name, exc)
            self._outage = True
            self._failed(name, exc)
            return False
        except Exception as exc:
            # A bug or bad data, not an outage: log every time with the traceback,
            # but keep the thread alive; the next tick may well succeed.
            logger.exception("%s: unexpected error", name)
            self._failed(name, exc)
            return False
        return True

    def _failed(self, name: str, exc: BaseException) -> None:
        # Every failed step is reported, not once per outage (what the metric counts).
        if self.on_error is None:
            return
        try:
            self.on_error(name, exc)
        except Exception:
            # A broken hook (metrics) must not take the loop down with it.
            logger.exception("%s: on_error hook failed", name)

    def _healthy(self) -> None:
        if self._outage:
            logger.warning("%s: Redis reachable again after %d failed tick(s)",
                           self.thread_name, self._failures)
        self._outage = False
        self._failures = 0
        self.last_success = time.time()
