#!/usr/bin/env python3
"""How close do I/O-bound jobs come to the ideal rate, sync and async, at high concurrency?

Against ``--redis-url``, else the Redis that ``exq_fast.embedded.find_redis()`` finds
(``REDIS_URL``, else 127.0.0.1:6379, else a private ``redis-server`` started for the
run), this drains, in one process and one run:

* ``noop C=100``: no-op jobs at concurrency 100, the cap of every other row (a node
  cannot run jobs faster than it runs jobs that do nothing);
* ``sync C=c``: jobs that wait 10 ms in ``time.sleep`` (a worker thread each);
* ``async C=c``: jobs that wait 10 ms in ``asyncio.sleep`` (the node's event loop),

for each ``--concurrency`` (default 100, 500 and 2000), ``--per-slot`` jobs per slot
(default 20; N = concurrency x per-slot, at least 2000), enqueued beforehand with
``enqueue_all`` (not timed); the no-op row drains ``--noop-jobs`` (default 100,000).
Each row is a new ``Exq`` node (default config, one queue at that concurrency,
metrics on) in a process of its own, one row after the other, so that a row's
memory figures are its own (a process keeps the heap an earlier row grew).

Columns: jobs/s from ``Exq.start()`` until ``exq.acks.totals["processed"] == N``
(the last ack applied in Redis); ``ideal`` = min(concurrency / 10 ms, the no-op
rate of this run); ``% ideal``; ``RSS`` = ``VmRSS`` right after the drain, and the
row's process's peak (``ru_maxrss``); ``CPU µs/job`` = that process's CPU time
(all threads) over the drain, per job.

Everything is written under a random namespace whose keys, and only those, are
deleted at the end; a private server, if one was started, is stopped.

Run from the project root::

    .venv/bin/python benchmarks/latency.py
    .venv/bin/python benchmarks/latency.py --quick                 # C=100 and 500 only
    .venv/bin/python benchmarks/latency.py --concurrency 2000 --per-slot 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import redis
from _common import chunks, delete_namespace, describe_server, rss_mb

from exq_fast import Config, Enqueuer, Exq, Registry
from exq_fast.embedded import find_redis

WAIT = 0.010
"""Seconds each I/O-bound job waits."""
QUEUE = "lat"
DEFAULT_CONCURRENCY = (100, 500, 2000)


def noop() -> None:
    """The no-op job."""


def sync_wait() -> None:
    """A job waiting on I/O in a worker thread."""
    time.sleep(WAIT)


async def async_wait() -> None:
    """A job waiting on I/O on the node's event loop."""
    await asyncio.sleep(WAIT)


WORKERS = {"Lat.Noop": noop, "Lat.Sync": sync_wait, "Lat.Async": async_wait}


@dataclass
class Row:
    """One drained run."""

    kind: str
    concurrency: int
    jobs: int
    seconds: float
    cpu: float
    rss_mb: float
    peak_mb: float

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds


def peak_mb() -> float:
    """The process's peak RSS so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drain(url: str, namespace: str, kind: str, job_class: str, concurrency: int,
          jobs: int) -> Row:
    """Enqueue ``jobs`` jobs of ``job_class``, then time one node draining them."""
    config = Config(redis_url=url, namespace=namespace, queues=[(QUEUE, concurrency)],
                    node_id=f"lat-{uuid.uuid4().hex[:8]}")
    with Enqueuer(config) as enqueuer:
        for size in chunks(jobs, 1000):
            enqueuer.enqueue_all([(QUEUE, job_class, [])] * size)
    exq = Exq(config, workers=Registry(WORKERS))
    began, cpu = time.perf_counter(), time.process_time()
    exq.start()
    try:
        while exq.acks.totals["processed"] < jobs:
            time.sleep(0.002)
        seconds = time.perf_counter() - began
        used = time.process_time() - cpu
        return Row(kind, concurrency, jobs, seconds, used, rss_mb(), peak_mb())
    finally:
        exq.stop()


def report(rows: list[Row], cap: float) -> None:
    """Print the table."""
    print(f"{'run':<12} {'jobs':>7} {'seconds':>8} {'jobs/s':>9} {'ideal':>9} {'% ideal':>8} "
          f"{'RSS MB':>7} {'peak MB':>8} {'CPU µs/job':>11}")
    print("-" * 86)
    for row in rows:
        ideal = cap if row.kind == "noop" else min(row.concurrency / WAIT, cap)
        print(f"{row.kind + ' C=' + str(row.concurrency):<12} {row.jobs:>7} "
              f"{row.seconds:>8.2f} {row.rate:>9,.0f} {ideal:>9,.0f} "
              f"{row.rate / ideal * 100:>7.0f}% {row.rss_mb:>7.1f} {row.peak_mb:>8.1f} "
              f"{row.cpu / row.jobs * 1e6:>11.1f}")
    print(f"\nideal = min(concurrency / {WAIT * 1000:.0f} ms, the no-op rate of this run)")


JOB_CLASSES = {"noop": "Lat.Noop", "sync": "Lat.Sync", "async": "Lat.Async"}


def drain_in_child(url: str, namespace: str, kind: str, concurrency: int, jobs: int) -> Row:
    """``drain`` in a new process (this script with ``--row``): the row's RSS is its own."""
    command = [sys.executable, __file__, "--redis-url", url, "--row",
               json.dumps([namespace, kind, concurrency, jobs])]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return Row(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, action="append", default=None)
    parser.add_argument("--per-slot", type=int, default=20, help="jobs per slot (default 20)")
    parser.add_argument("--noop-jobs", type=int, default=100_000,
                        help="jobs of the no-op row (default 100000)")
    parser.add_argument("--quick", action="store_true", help="C=100 and 500 only")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # the child's task
    args = parser.parse_args()
    if args.row is not None:
        namespace, kind, concurrency, jobs = json.loads(args.row)
        row = drain(args.redis_url, namespace, kind, JOB_CLASSES[kind], concurrency, jobs)
        print(json.dumps(dataclasses.asdict(row)))
        return
    levels = args.concurrency or ((100, 500) if args.quick else DEFAULT_CONCURRENCY)
    url, server = (args.redis_url, None) if args.redis_url else find_redis()
    namespace = f"lat{uuid.uuid4().hex}"
    client = redis.Redis.from_url(url)
    try:
        print(describe_server(client, url, server is not None))
        rows = [drain_in_child(url, namespace, "noop", 100, args.noop_jobs)]
        for concurrency in levels:
            jobs = max(concurrency * args.per_slot, 2000)
            for kind in ("sync", "async"):
                rows.append(drain_in_child(url, namespace, kind, concurrency, jobs))
        report(rows, rows[0].rate)
    finally:
        print(f"clean-up: deleted {delete_namespace(client, namespace)} keys of {namespace}")
        client.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
