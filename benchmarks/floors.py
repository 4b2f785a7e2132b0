#!/usr/bin/env python3
"""What does this machine's Python cost before exq-fast does anything? The floors that
bound the I/O-bound and enqueue figures.

Side by side in one run, without exq-fast:

* ``asyncio C=2000``: a bare event loop keeping 2,000 tasks of ``await
  asyncio.sleep(0.01)`` alive (a new task as each ends), 40,000 tasks: tasks/s and
  CPU per task. An async exq-fast job costs at least this on top of a no-op job.
* ``threads C=500 +W µs``: 500 threads taking items from a queue filled by a
  dispatcher thread as slots free up, each item ``W`` µs of Python (a counted loop)
  then ``time.sleep(0.01)``, 20,000 items, for W = 0, 4 and 11: items/s against
  the ideal (500 / 10 ms), CPU per item (user and system). How much an item's
  Python work costs once 500 threads take turns on the GIL.
* ``redis-py PING``: CPU per round trip to the Redis that
  ``exq_fast.embedded.find_redis()`` finds: one thread enqueueing one job at a time
  pays at least this per job.

Run from the project root::

    .venv/bin/python benchmarks/floors.py
"""

from __future__ import annotations

import asyncio
import queue
import resource
import threading
import time
import timeit

import redis

from exq_fast.embedded import find_redis

WAIT = 0.010


def cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def asyncio_floor(tasks: int = 40_000, concurrency: int = 2000) -> tuple[float, float]:
    """(tasks/s, CPU µs per task) of a bare loop of sleeping tasks."""
    async def job() -> None:
        await asyncio.sleep(WAIT)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = started = 0
        finished = asyncio.Event()

        def ended(_: asyncio.Task[None]) -> None:
            nonlocal done, started
            done += 1
            if started < tasks:
                started += 1
                loop.create_task(job()).add_done_callback(ended)
            if done == tasks:
                finished.set()

        for _ in range(concurrency):
            started += 1
            loop.create_task(job()).add_done_callback(ended)
        await finished.wait()

    (user, system), began = cpu(), time.perf_counter()
    asyncio.run(main())
    seconds = time.perf_counter() - began
    after = cpu()
    return tasks / seconds, (after[0] - user + after[1] - system) / tasks * 1e6


def threads_floor(work_loops: int, items: int = 20_000,
                  concurrency: int = 500) -> tuple[float, float, float]:
    """(items/s, user µs, system µs per item) of threads sleeping after some work."""
    calls: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    cond = threading.Condition()
    running = done = 0

    def worker() -> None:
        nonlocal running, done
        while calls.get() is not None:
            for _ in range(work_loops):
                pass
            time.sleep(WAIT)
            with cond:
                running -= 1
                done += 1
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    (user, system), began = cpu(), time.perf_counter()
    sent = 0
    while sent < items:
        with cond:
            while running >= concurrency:
                cond.wait()
            count = min(concurrency - running, items - sent)
            running += count
        for _ in range(count):
            calls.put(1)
        sent += count
    with cond:
        while done < items:
            cond.wait()
    seconds = time.perf_counter() - began
    after = cpu()
    for _ in threads:
        calls.put(None)
    return (items / seconds, (after[0] - user) / items * 1e6,
            (after[1] - system) / items * 1e6)


def loops_for(micros: float) -> int:
    """How many empty loop turns take ``micros`` µs on one thread here."""
    per_turn = min(timeit.repeat("for _ in range(1000): pass", number=2000, repeat=3)) / 2e6
    return round(micros / 1e6 / per_turn)


def ping_cpu(url: str, rounds: int = 5000) -> float:
    """CPU µs per redis-py PING."""
    client = redis.Redis.from_url(url)
    client.ping()
    (user, system) = cpu()
    for _ in range(rounds):
        client.ping()
    after = cpu()
    client.close()
    return (after[0] - user + after[1] - system) / rounds * 1e6


def main() -> None:
    rate, per_task = asyncio_floor()
    print(f"{'floor':<28} {'rate/s':>9} {'% ideal':>8} {'CPU µs':>8} {'user':>6} {'sys':>6}")
    print("-" * 70)
    print(f"{'asyncio C=2000 sleep 10 ms':<28} {rate:>9,.0f} {'':>8} {per_task:>8.1f}")
    for micros in (0, 4, 11):
        items, user, system = threads_floor(loops_for(micros))
        label = f"threads C=500 +{micros} µs"
        print(f"{label:<28} {items:>9,.0f} {items / (500 / WAIT):>7.0%} {user + system:>8.1f} "
              f"{user:>6.1f} {system:>6.1f}")
    url, server = find_redis()
    try:
        print(f"{'redis-py PING':<28} {'':>9} {'':>8} {ping_cpu(url):>8.1f}")
    finally:
        if server is not None:
            server.stop()
    print("\nCPU = this process's user + system CPU time per task / item / round trip; "
          "ideal for threads = 500 / 10 ms")


if __name__ == "__main__":
    main()
