#!/usr/bin/env python3
"""No-op jobs/s through a single Redis, through Sentinel, and through a Redis Cluster.

Side by side in one run, each on private servers this script starts on loopback
ports and stops at the end (nothing else is touched):

* ``single``: one ``redis-server``;
* ``sentinel``: a master, a replica and three sentinels (``redis+sentinel://``);
* ``cluster 1 ns``: three masters (``redis+cluster://``), one namespace ``{b0}``;
* ``cluster 3 ns``: the same cluster, three namespaces whose hash tags fall on
  the three different masters, one worker process each.

Each row runs ``--processes`` ``exq-fast run`` worker processes (default 1; the
3-namespace row always runs 3, and the single-Redis row is repeated with 3 for
comparison) at concurrency 100, default settings, on a no-op worker written to a
temporary directory. The N jobs (``--jobs``, default 60,000 per row) are enqueued
beforehand into a staging list and moved into the consumed queue with one RENAME
once every process consumes, so the timing covers the drain alone: from the
RENAME until ``stat:processed`` reaches N (summed over namespaces). Printed:
jobs/s and the ratio to the single-Redis, one-process row.

This machine has two cores shared by the workers and every server: where the
workers' CPU is the limit, a Cluster cannot show the gain it gives when one
Redis is (see the closing note of issue 15).

Run from the project root::

    .venv/bin/python benchmarks/topologies.py
    .venv/bin/python benchmarks/topologies.py --jobs 20000
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the real-server set-ups live with the tests

from exq_fast import Config, Enqueuer  # noqa: E402
from exq_fast.connection import connect  # noqa: E402
from exq_fast.embedded import RedisServer  # noqa: E402
from exq_fast.keys import Keys  # noqa: E402
from tests.cluster import ClusterSetup  # noqa: E402
from tests.sentinel import SentinelSetup  # noqa: E402

QUEUE = "default"
STAGE = "stage"
CONCURRENCY = 100
READY_TIMEOUT = 30.0
WORKER_SOURCE = '''\
from exq_fast import worker


@worker("Topo.Noop")
def noop():
    pass
'''


@dataclass
class Row:
    """One drained run."""

    label: str
    processes: int
    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds


def start_workers(url: str, namespaces: list[str], work_dir: Path,
                  per_namespace: int) -> list[subprocess.Popen[bytes]]:
    """``per_namespace`` processes for each namespace; returns once all consume."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_")}
    env.pop("REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(work_dir), str(ROOT)])
    script = Path(sys.executable).parent / "exq-fast"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "exq_fast"]
    processes, logs = [], []
    for ns in namespaces:
        for n in range(per_namespace):
            log = work_dir / f"{ns.strip('{}')}-{n}.log"
            with log.open("wb") as out:
                processes.append(subprocess.Popen(
                    [*command, "run", "--redis-url", url, "--namespace", ns, "--queue",
                     f"{QUEUE}:{CONCURRENCY}", "--workers", "topoworker", "--no-heartbeat"],
                    env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            logs.append(log)
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(" consuming " in log.read_text(errors="replace") for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            stop(processes)
            raise RuntimeError("a worker did not start:\n" + "\n".join(
                log.read_text(errors="replace") for log in logs))
        time.sleep(0.05)
    return processes


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker, then wait (kill after 15 s)."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def drain(label: str, url: str, namespaces: list[str], jobs: int, work_dir: Path,
          per_namespace: int = 1) -> Row:
    """Stage ``jobs`` no-op jobs across ``namespaces``, start the workers, time the drain."""
    share = jobs // len(namespaces)
    configs = [Config(redis_url=url, namespace=ns) for ns in namespaces]
    for config in configs:
        with Enqueuer(config) as enqueuer:
            for start in range(0, share, 1000):
                enqueuer.enqueue_all([(STAGE, "Topo.Noop", [])] * min(1000, share - start))
    processes = start_workers(url, namespaces, work_dir, per_namespace)
    clients = [(connect(config), Keys(config.namespace)) for config in configs]
    try:
        began = time.perf_counter()
        for client, keys in clients:
            client.sadd(keys.queues, QUEUE)
            client.rename(keys.queue(STAGE), keys.queue(QUEUE))
        while sum(int(client.get(keys.stat("processed")) or 0)
                  for client, keys in clients) < share * len(namespaces):
            time.sleep(0.005)
        seconds = time.perf_counter() - began
    finally:
        stop(processes)
        for client, keys in clients:
            for key in list(client.scan_iter(match=keys.all_keys_pattern())):
                client.delete(key)
            client.close()
    return Row(label, len(processes), share * len(namespaces), seconds)


def tags_on_every_master(client: redis.Redis, masters: int) -> list[str]:
    """Namespaces ``{bN}`` whose slots are served by ``masters`` different nodes."""
    chosen: dict[str, str] = {}
    for n in range(10_000):
        ns = "{b" + str(n) + "}"
        node = client.get_node_from_key(ns)  # type: ignore[attr-defined]
        chosen.setdefault(node.name, ns)
        if len(chosen) == masters:
            return list(chosen.values())
    raise RuntimeError("could not place a namespace on every master")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60_000, help="jobs per row")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as directory:
        work_dir = Path(directory)
        (work_dir / "topoworker.py").write_text(WORKER_SOURCE)
        with RedisServer() as single:
            rows.append(drain("single", single.url, ["b"], args.jobs, work_dir))
            rows.append(drain("single, 3 processes", single.url, ["b"], args.jobs, work_dir, 3))
        sentinel = SentinelSetup().start()
        try:
            rows.append(drain("sentinel", sentinel.url, ["b"], args.jobs, work_dir))
        finally:
            sentinel.stop()
        cluster = ClusterSetup().start()
        try:
            client = connect(Config(redis_url=cluster.url, namespace="{b0}"))
            spread = tags_on_every_master(client, 3)
            client.close()
            rows.append(drain("cluster 1 ns", cluster.url, ["{b0}"], args.jobs, work_dir))
            rows.append(drain("cluster 1 ns, 3 processes", cluster.url, ["{b0}"], args.jobs,
                              work_dir, 3))
            rows.append(drain("cluster 3 ns", cluster.url, spread, args.jobs, work_dir))
        finally:
            cluster.stop()
    base = rows[0].rate
    print(f"{'topology':<28} {'processes':>9} {'jobs':>8} {'seconds':>8} {'jobs/s':>9} "
          f"{'vs single':>9}")
    print("-" * 76)
    for row in rows:
        print(f"{row.label:<28} {row.processes:>9} {row.jobs:>8,} {row.seconds:>8.2f} "
              f"{row.rate:>9,.0f} {row.rate / base:>8.2f}x")
    print(f"\nconcurrency {CONCURRENCY} per process, default settings, no-op jobs, "
          f"{os.cpu_count()} CPUs shared by the workers and every server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
