#!/usr/bin/env python3
"""How does throughput grow with worker processes on one host, and where does one Redis
saturate?

A private ``redis-server`` is started for the run (``exq_fast.embedded.RedisServer``,
no persistence, 127.0.0.1 only) and stopped at the end. For each process count (1, 2
and ``auto`` = the number of CPUs, side by side in one run, in a fresh namespace each),
N no-op jobs (default 100,000; ``--quick`` 30,000) are enqueued first, then
``exq-fast run --processes P --queue bench:100`` starts (scheduler off) and drains
them. Timing starts when the first job is counted and ends when the last is, so start-
up is not measured. Printed per run:

* jobs/s, and the ratio to the 1-process run;
* worker CPU per job: user + system time of every child process (``/proc/<pid>/stat``)
  over the timed span, divided by the jobs;
* Redis CPU per job: ``INFO cpu`` (used_cpu_user + used_cpu_sys) over the same span.

When Redis CPU per job times jobs/s nears one core (1,000,000 µs per second), that
Redis is saturated: more worker processes will not help; more Redis (namespaces on a
Cluster) would. On a 2-core machine the workers and Redis share the cores, so ``auto``
(2) cannot double the 1-process figure.

Run from the project root::

    .venv/bin/python benchmarks/scale.py
    .venv/bin/python benchmarks/scale.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from _common import chunks, cpu_seconds, describe_server

from exq_fast.config import Config
from exq_fast.embedded import RedisServer
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys

WORKERS = '''
from exq_fast import worker


@worker("Bench.Noop")
def noop(*args):
    return None
'''


@dataclass
class Result:
    """One run's figures."""

    processes: int
    jobs: int
    seconds: float
    worker_cpu: float
    redis_cpu: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def child_pids(client: redis.Redis, keys: Keys) -> list[int]:
    pids = []
    for member in client.smembers(keys.processes):
        raw = client.hget(keys.node(member.decode()), "info")
        if raw is not None:
            pids.append(int(json.loads(raw)["pid"]))
    return pids


def run_once(url: str, workdir: Path, processes: int, jobs: int) -> Result:
    namespace = f"scale{processes}-{os.getpid()}"
    keys = Keys(namespace)
    client = redis.Redis.from_url(url)
    with Enqueuer(Config(redis_url=url, namespace=namespace)) as enqueuer:
        for size in chunks(jobs, 2000):
            enqueuer.enqueue_all([("bench", "Bench.Noop", [])] * size)
    env = {**os.environ, "PYTHONPATH": str(workdir), "EXQ_SCHEDULER_ENABLE": "false"}
    command = [sys.executable, "-m", "exq_fast", "run", "--redis-url", url, "--namespace",
               namespace, "--queue", "bench:100", "--workers", "scalejobs",
               "--processes", str(processes)]
    node = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        return measure(client, keys, processes, jobs)
    finally:
        node.terminate()
        node.wait(60)
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            client.delete(key)
        client.close()


def processed(client: redis.Redis, keys: Keys) -> int:
    return int(client.get(keys.stat("processed")) or 0)


def measure(client: redis.Redis, keys: Keys, processes: int, jobs: int) -> Result:
    deadline = time.monotonic() + 600
    while processed(client, keys) == 0 or len(child_pids(client, keys)) < processes:
        if time.monotonic() > deadline:
            raise SystemExit("the workers never started")
        time.sleep(0.005)
    pids = child_pids(client, keys)
    start_count, start = processed(client, keys), time.monotonic()
    cpu0, rcpu0 = sum(map(cpu_seconds, pids)), redis_cpu(client)
    while processed(client, keys) < jobs:
        if time.monotonic() > deadline:
            raise SystemExit("the jobs were not drained in 10 minutes")
        time.sleep(0.01)
    seconds = time.monotonic() - start
    cpu1, rcpu1 = sum(map(cpu_seconds, pids)), redis_cpu(client)
    counted = jobs - start_count
    return Result(processes, counted, seconds, (cpu1 - cpu0) / counted,
                  (rcpu1 - rcpu0) / counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="30,000 jobs")
    args = parser.parse_args()
    jobs = 30_000 if args.quick else args.jobs
    counts = sorted({1, 2, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        workdir = Path(tmp)
        (workdir / "scalejobs.py").write_text(WORKERS)
        client = redis.Redis.from_url(server.url)
        print(describe_server(client, server.url, private=True))
        print(f"{jobs:,} no-op jobs per run, queue concurrency 100 per process, "
              f"{os.cpu_count()} CPUs\n")
        results = [run_once(server.url, workdir, n, jobs) for n in counts]
        base = results[0].rate
        print(f"{'processes':>9}  {'jobs/s':>9}  {'vs 1':>5}  {'worker CPU/job':>14}  "
              f"{'Redis CPU/job':>13}  {'Redis busy':>10}")
        for r in results:
            busy = r.redis_cpu * r.rate * 100
            print(f"{r.processes:>9}  {r.rate:>9,.0f}  {r.rate / base:>4.2f}x  "
                  f"{r.worker_cpu * 1e6:>11.1f} µs  {r.redis_cpu * 1e6:>10.1f} µs  "
                  f"{busy:>9.0f}%")
        client.close()


if __name__ == "__main__":
    main()
