"""The node's event loop: where ``async def`` jobs run.

One loop per node, on its own thread (``exq-asyncio``), started at the first
async job. An async job starts on a worker thread, one of the node's few
starter threads (its middleware ``before_work`` hooks run there, and the call
to the worker returns a coroutine); the coroutine is then handed to this loop
(``run_soon``: the loop is woken once per batch of new tasks) and the worker
thread is free. The job
keeps its concurrency slot until the coroutine ends; then its after-hooks and
ack run back on a worker thread.

At a node's stop, the tasks still running are cancelled (their jobs were put
back in their queues, as for sync jobs that outlive the shutdown timeout) and
the loop stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger("exq_fast")

__all__ = ["EventLoop", "Handoff"]

T = TypeVar("T")

STOP_GRACE = 1.0
"""Seconds the loop's tasks get to finish their cancellation at stop."""


class Handoff(Generic[T]):
    """Items handed from threads to another thread in batches (thread-safe).

    ``put`` returns True for the first item after a ``take``: the caller then
    schedules one ``take`` on the other thread; later items ride along. So the
    other thread is woken once per batch, not once per item.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._scheduled = False

    def put(self, item: T) -> bool:
        """Add ``item``; True when the caller must schedule a ``take``."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return False
            self._scheduled = True
            return True

    def take(self) -> list[T]:
        """Every item handed over so far; the next ``put`` schedules again."""
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
            return items


class EventLoop:
    """A lazily started event loop on a thread of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        # Calls to run on the loop (each starts a task), handed over in batches: one
        # wake-up of the loop (a write to its self-pipe) per batch, not per job.
        self._calls: Handoff[Callable[[], None]] = Handoff()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started at the first use."""
        with self._lock:
            if self._loop is None:
                if self._stopped:
                    raise RuntimeError("the node's event loop is stopped")
                ready = threading.Event()
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._run, args=(self._loop, ready),
                                                name="exq-asyncio", daemon=True)
                self._thread.start()
                ready.wait()
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def run_soon(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the loop thread, in a batch with the other calls handed
        over since the loop last took them (``call`` typically creates a task).
        RuntimeError once the loop is stopped. A call that raises is logged."""
        loop = self.loop
        if not self._calls.put(call):
            return  # the loop is woken already and takes this one too
        try:
            loop.call_soon_threadsafe(self._run_calls)
        except RuntimeError:  # closed meanwhile: nothing of this batch will run
            self._calls.take()
            raise

    def _run_calls(self) -> None:
        """On the loop thread: run the calls handed over since the last wake-up."""
        for call in self._calls.take():
            try:
                call()
            except Exception:  # the others of the batch must still run
                logger.exception("internal error starting a task on the event loop")

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread (from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    def stop(self) -> None:
        """Cancel the tasks left and stop the loop (from any thread but the loop's)."""
        with self._lock:
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        done = threading.Event()

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_GRACE)
            loop.stop()
            done.set()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
        except RuntimeError:  # closed meanwhile
            return
        done.wait(STOP_GRACE + 1.0)
        thread.join(1.0)


async def await_any(awaitable: Awaitable[Any]) -> Any:
    """Await any awaitable (a Future, a custom object) as a coroutine."""
    return await awaitable
