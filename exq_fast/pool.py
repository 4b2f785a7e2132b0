"""``WorkerPool``: the threads that run jobs, started on demand and reused.

What ``concurrent.futures.ThreadPoolExecutor`` does for exq-fast, without what
it does not need: no ``Future`` per job (nothing waits on one: a job's end is
reported through its record), and daemon threads, so that a process whose stop
left a job inside a C call that never returns can still exit (Python would
wait for a ``ThreadPoolExecutor`` thread at exit; the job was put back in its
queue by the stop).

A thread is started when a call arrives and no thread is idle; the fetcher's
slots bound how many jobs run, so they bound the threads too. ``shutdown``
drops the calls not started yet (the stop has put their jobs back) and lets
idle threads end.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("exq_fast")

_Call = tuple[Callable[..., object], tuple[Any, ...]]


class WorkerPool:
    """Runs submitted calls on daemon threads named ``<name>_<n>``. Thread-safe."""

    def __init__(self, name: str = "exq-worker", max_threads: int | None = None) -> None:
        """``max_threads``: at most that many threads (None: one per call running at
        once); beyond it, calls wait for a thread."""
        self.name = name
        self.max_threads = max_threads
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads that finished a call and wait for the next
        self._started = 0
        self._closed = False

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a pool thread. RuntimeError once shut down."""
        self._reserve(1)
        self._calls.put((fn, args))

    def submit_all(self, fn: Callable[[Any], object], items: Sequence[Any]) -> None:
        """Run ``fn(item)`` for each item, each call on a pool thread as ``submit``
        would, with one lock for the lot (the fetcher hands over a fetch at a time).
        RuntimeError once shut down."""
        self._reserve(len(items))
        put = self._calls.put
        for item in items:
            put((fn, (item,)))

    def _reserve(self, calls: int) -> None:
        """Find a thread for each of ``calls`` new calls: an idle one, else a new one
        (up to ``max_threads``; beyond it, calls wait for a thread)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            idle = min(self._idle, calls)
            self._idle -= idle
            new = calls - idle
            if self.max_threads is not None:
                new = min(new, self.max_threads - self._started)
            for _ in range(new):
                self._start_thread()

    def _start_thread(self) -> None:
        self._started += 1
        thread = threading.Thread(target=self._work, name=f"{self.name}_{self._started - 1}",
                                  daemon=True)
        thread.start()

    def _work(self) -> None:
        get = self._calls.get
        while True:
            call = get()
            if call is None:
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException:  # run_job never raises; anything else must not end the thread
                logger.exception("a call on the worker pool raised")
            with self._lock:
                if self._closed:
                    return
                self._idle += 1

    def shutdown(self) -> int:
        """Stop taking calls, drop those not started, let idle threads end. Returns
        how many calls were dropped. Threads running a call end after it."""
        with self._lock:
            self._closed = True
            threads = self._started
        dropped = 0
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                dropped += 1
        for _ in range(threads):  # one per thread: each waiting thread takes one and ends
            self._calls.put(None)
        return dropped
