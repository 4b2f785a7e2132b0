#!/usr/bin/env python3
"""How many jobs per second can exq_fast enqueue, one at a time and in batches?

Against the Redis that ``exq_fast.embedded.find_redis()`` finds (``REDIS_URL``,
else 127.0.0.1:6379, else a private ``redis-server`` started for the run), this
times, in one run and with the same job (a ~240 B payload):

* ``raw LPUSH loop``: redis-py ``LPUSH`` of pre-encoded bytes, one round trip per
  job; the yardstick (no job building, no script, no queue-set update);
* ``enqueue``: ``Enqueuer.enqueue``, one round trip per job (the job built,
  encoded and pushed by Exq's enqueue script);
* ``enqueue, T threads``: ``Enqueuer.enqueue`` from T threads at once sharing one
  ``Enqueuer`` (a web app's request threads), each one job per call; concurrent
  calls share round trips (``PushCombiner``), so this may beat one thread;
* ``enqueue_all xB``: ``Enqueuer.enqueue_all`` with B jobs per call (one round trip
  per call).

"ratio" is the method's jobs/s divided by the yardstick's: above 1.00x is faster
than the raw LPUSH loop. Everything is written under a random namespace
(``bench<hex>``) whose keys, and only those, are deleted at the end (SCAN + DEL);
a private server, if one was started, is stopped.

Run from the project root::

    .venv/bin/python benchmarks/enqueue.py               # 20000 jobs per method
    .venv/bin/python benchmarks/enqueue.py --jobs 50000
    .venv/bin/python benchmarks/enqueue.py --quick       # 2000 jobs per method
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from _common import chunks, delete_namespace, describe_server

from exq_fast.config import Config
from exq_fast.embedded import find_redis
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys

WORKER = "MyApp.Workers.SendReceipt"
ARGS: list[Any] = [1042, {"user_id": 77, "email": "ada@example.com", "plan": "pro",
                          "amount": 19.99, "items": ["a-1", "b-2"]}]
BATCH_SIZES = (100, 1000)
THREADS = (4, 16)
WARMUP_JOBS = 200

Runner = Callable[[int], None]


@dataclass(frozen=True)
class Result:
    """One timed method."""

    method: str
    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds


@dataclass(frozen=True)
class Bench:
    """What every method needs: the enqueuer, a raw client and the namespace's keys."""

    enqueuer: Enqueuer
    raw: redis.Redis
    keys: Keys


# --- methods: each pushes ``n`` jobs to its own queue --------------------------------


def raw_lpush(bench: Bench) -> Runner:
    """The yardstick: LPUSH of one pre-encoded payload per round trip."""
    payload = bench.enqueuer.build("raw", WORKER, ARGS, None).payload
    key = bench.keys.queue("raw")

    def run(n: int) -> None:
        lpush = bench.raw.lpush
        for _ in range(n):
            lpush(key, payload)

    return run


def single_enqueue(bench: Bench) -> Runner:
    """``Enqueuer.enqueue``: one job, one round trip."""

    def run(n: int) -> None:
        enqueue = bench.enqueuer.enqueue
        for _ in range(n):
            enqueue("single", WORKER, ARGS)

    return run


def threaded_enqueue(threads: int) -> Callable[[Bench], Runner]:
    """``Enqueuer.enqueue`` from ``threads`` threads sharing one enqueuer."""

    def factory(bench: Bench) -> Runner:
        queue = f"threads{threads}"

        def run(n: int) -> None:
            enqueue = bench.enqueuer.enqueue

            def work(count: int) -> None:
                for _ in range(count):
                    enqueue(queue, WORKER, ARGS)

            workers = [threading.Thread(target=work, args=(count,))
                       for count in chunks(n, -(-n // threads))]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join()

        return run

    return factory


def batch_enqueue(size: int) -> Callable[[Bench], Runner]:
    """``Enqueuer.enqueue_all`` with ``size`` jobs per call."""

    def factory(bench: Bench) -> Runner:
        queue = f"batch{size}"

        def run(n: int) -> None:
            for count in chunks(n, size):
                bench.enqueuer.enqueue_all([(queue, WORKER, ARGS)] * count)

        return run

    return factory


def method_table() -> list[tuple[str, str, Callable[[Bench], Runner]]]:
    """(label, queue, runner factory), the yardstick first."""
    table: list[tuple[str, str, Callable[[Bench], Runner]]] = [
        ("raw LPUSH loop (yardstick)", "raw", raw_lpush),
        ("enqueue (1 per call)", "single", single_enqueue),
    ]
    table += [(f"enqueue, {threads} threads", f"threads{threads}", threaded_enqueue(threads))
              for threads in THREADS]
    table += [(f"enqueue_all x{size}", f"batch{size}", batch_enqueue(size))
              for size in BATCH_SIZES]
    return table


# --- timing ---------------------------------------------------------------------------


def time_method(bench: Bench, label: str, queue: str, runner: Runner, jobs: int) -> Result:
    """Warm up, time ``jobs`` pushes, and check they all landed (not a timing check)."""
    runner(min(WARMUP_JOBS, jobs))
    before = bench.raw.llen(bench.keys.queue(queue))
    start = time.perf_counter_ns()
    runner(jobs)
    seconds = (time.perf_counter_ns() - start) / 1e9
    landed = bench.raw.llen(bench.keys.queue(queue)) - before
    if landed != jobs:
        raise RuntimeError(f"{label}: {landed} jobs in Redis, expected {jobs}")
    return Result(label, jobs, seconds)


def run_all(bench: Bench, jobs: int) -> list[Result]:
    """Every method, in table order."""
    return [time_method(bench, label, queue, factory(bench), jobs)
            for label, queue, factory in method_table()]


# --- set-up and clean-up --------------------------------------------------------------


def benchmark(url: str, private: bool, jobs: int) -> list[Result]:
    """Run every method under a fresh namespace, then delete that namespace's keys."""
    namespace = "bench" + uuid.uuid4().hex
    keys = Keys(namespace)
    raw = redis.Redis.from_url(url)
    enqueuer = Enqueuer(Config(redis_url=url, namespace=namespace))
    try:
        print(describe_server(raw, url, private))
        print(f"Python {platform.python_version()}, redis-py {redis.__version__}, "
              f"namespace {namespace}, {len(enqueuer.build('q', WORKER, ARGS, None).payload)}"
              f" B payload")
        return run_all(Bench(enqueuer, raw, keys), jobs)
    finally:
        deleted = delete_namespace(raw, keys.namespace)
        print(f"clean-up: deleted {deleted} keys matching {keys.all_keys_pattern()}")
        enqueuer.close()
        raw.close()


# --- output ---------------------------------------------------------------------------


def print_table(results: Sequence[Result]) -> None:
    """The results, with each rate as a ratio of the yardstick's (the first row)."""
    reference = results[0].rate
    print()
    print(f"{'method':<28} {'jobs':>7} {'seconds':>8} {'jobs/s':>10} {'ratio':>7}")
    print("-" * 64)
    for result in results:
        print(f"{result.method:<28} {result.jobs:>7} {result.seconds:>8.3f} "
              f"{result.rate:>10,.0f} {result.rate / reference:>6.2f}x")
    print()
    print("ratio = jobs/s / raw LPUSH loop jobs/s (above 1.00x = faster than the yardstick)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs per method (default 20000, or 2000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: 2000 jobs per method")
    options = parser.parse_args(argv)
    if options.jobs is None:
        options.jobs = 2000 if options.quick else 20_000
    if options.jobs < 1:
        parser.error("--jobs must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    """Find a Redis, run the benchmark, print the table, stop any private server."""
    options = parse_args(argv)
    url, server = find_redis()
    try:
        results = benchmark(url, server is not None, options.jobs)
    finally:
        if server is not None:
            server.stop()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
