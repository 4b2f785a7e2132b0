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
Redis is (see the closing note of issue 15). So each row also measures the
Redis side: the CPU time (``utime + stime`` of ``/proc/<pid>/stat``, every
thread) that each server process of the row (redis-server, and the replica and
sentinels of the Sentinel row) used during the drain. Printed: all servers'
CPU per job, the busiest server's CPU per job, and the "Redis ceiling", the
jobs/s the busiest server could sustain at 100% of one core (jobs / its CPU
seconds), with its ratio to the single-Redis row, and the ceiling of three
namespaces over that of one on the same cluster. Spread over three masters,
three namespaces leave the busiest master about a third of the work: a
ceiling about 3x that of one namespace. The CPU counters move in clock ticks
(10 ms on Linux), so a larger ``--jobs`` gives finer figures.

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
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the real-server set-ups live with the tests

from _common import CLOCK_TICKS, cpu_seconds, exq_fast_command, wait_consuming, worker_env  # noqa: E402

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
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds each server process of the row used during the drain, by name."""

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds

    @property
    def redis_us_per_job(self) -> float:
        """CPU microseconds per job, summed over the row's servers."""
        return sum(self.cpu.values()) / self.jobs * 1e6

    @property
    def busiest(self) -> tuple[str, float]:
        """The server that used the most CPU during the drain, and its CPU seconds."""
        return max(self.cpu.items(), key=lambda item: item[1])

    @property
    def busiest_us_per_job(self) -> float:
        """The busiest server's CPU microseconds per job."""
        return self.busiest[1] / self.jobs * 1e6

    @property
    def ceiling(self) -> float:
        """Jobs/s the busiest server could sustain at 100% of one core."""
        return self.jobs / self.busiest[1] if self.busiest[1] > 0 else float("inf")


def server_pids(**servers: RedisServer | subprocess.Popen[bytes]) -> dict[str, int]:
    """``name -> pid`` of running server processes (a ``RedisServer`` or a ``Popen``)."""
    pids = {}
    for name, server in servers.items():
        process = server.process if isinstance(server, RedisServer) else server
        assert process is not None, f"{name} is not running"
        pids[name] = process.pid
    return pids


def start_workers(url: str, namespaces: list[str], work_dir: Path,
                  per_namespace: int) -> list[subprocess.Popen[bytes]]:
    """``per_namespace`` processes for each namespace; returns once all consume."""
    env, command = worker_env(work_dir, ROOT), exq_fast_command()
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
    try:
        wait_consuming(list(zip(processes, logs, strict=True)), READY_TIMEOUT)
    except RuntimeError:
        stop(processes)
        raise
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
          servers: dict[str, int], per_namespace: int = 1) -> Row:
    """Stage ``jobs`` no-op jobs across ``namespaces``, start the workers, time the drain
    and measure the CPU that each of ``servers`` (name -> pid) used during it."""
    share = jobs // len(namespaces)
    configs = [Config(redis_url=url, namespace=ns) for ns in namespaces]
    for config in configs:
        with Enqueuer(config) as enqueuer:
            for start in range(0, share, 1000):
                enqueuer.enqueue_all([(STAGE, "Topo.Noop", [])] * min(1000, share - start))
    processes = start_workers(url, namespaces, work_dir, per_namespace)
    clients = [(connect(config), Keys(config.namespace)) for config in configs]
    try:
        cpu_before = {name: cpu_seconds(pid) for name, pid in servers.items()}
        began = time.perf_counter()
        for client, keys in clients:
            client.sadd(keys.queues, QUEUE)
            client.rename(keys.queue(STAGE), keys.queue(QUEUE))
        while sum(int(client.get(keys.stat("processed")) or 0)
                  for client, keys in clients) < share * len(namespaces):
            time.sleep(0.005)
        seconds = time.perf_counter() - began
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in servers.items()}
    finally:
        stop(processes)
        for client, keys in clients:
            for key in list(client.scan_iter(match=keys.all_keys_pattern())):
                client.delete(key)
            client.close()
    return Row(label, len(processes), share * len(namespaces), seconds, cpu)


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
            servers = server_pids(redis=single)
            rows.append(drain("single", single.url, ["b"], args.jobs, work_dir, servers))
            rows.append(drain("single, 3 processes", single.url, ["b"], args.jobs, work_dir,
                              servers, 3))
        sentinel = SentinelSetup().start()
        try:
            servers = server_pids(master=sentinel.master, replica=sentinel.replica,
                                  **{f"sentinel{n}": process
                                     for n, process in enumerate(sentinel.sentinels)})
            rows.append(drain("sentinel", sentinel.url, ["b"], args.jobs, work_dir, servers))
        finally:
            sentinel.stop()
        cluster = ClusterSetup().start()
        try:
            client = connect(Config(redis_url=cluster.url, namespace="{b0}"))
            spread = tags_on_every_master(client, 3)
            client.close()
            servers = server_pids(**{f"master{n}": node for n, node in enumerate(cluster.nodes)})
            rows.append(drain("cluster 1 ns", cluster.url, ["{b0}"], args.jobs, work_dir,
                              servers))
            rows.append(drain("cluster 1 ns, 3 processes", cluster.url, ["{b0}"], args.jobs,
                              work_dir, servers, 3))
            rows.append(drain("cluster 3 ns", cluster.url, spread, args.jobs, work_dir,
                              servers))
        finally:
            cluster.stop()
    print_table(rows)
    return 0


def print_table(rows: list[Row]) -> None:
    """The rows, then what the Redis columns mean."""
    base = rows[0]
    print(f"{'topology':<26} {'processes':>9} {'jobs':>7} {'seconds':>7} {'jobs/s':>7} "
          f"{'vs single':>9} | {'redis µs/job':>12} {'busiest µs/job':>14} "
          f"{'Redis ceiling':>13} {'vs single':>9}  busiest")
    print("-" * 126)
    for row in rows:
        name, seconds = row.busiest
        share = seconds / sum(row.cpu.values()) if sum(row.cpu.values()) > 0 else 0.0
        print(f"{row.label:<26} {row.processes:>9} {row.jobs:>7,} {row.seconds:>7.2f} "
              f"{row.rate:>7,.0f} {row.rate / base.rate:>8.2f}x | "
              f"{row.redis_us_per_job:>12.1f} {row.busiest_us_per_job:>14.1f} "
              f"{row.ceiling:>13,.0f} {row.ceiling / base.ceiling:>8.2f}x  "
              f"{name} ({share:.0%} of the row's Redis CPU)")
    print(f"\nconcurrency {CONCURRENCY} per process, default settings, no-op jobs, "
          f"{os.cpu_count()} CPUs shared by the workers and every server")
    print("redis µs/job: CPU (utime+stime, /proc/<pid>/stat) of all the row's server "
          "processes during the drain, per job;\nbusiest µs/job: the same for the busiest "
          "one; Redis ceiling: the jobs/s the busiest server could sustain at 100% of one "
          "core\n(jobs / its CPU seconds), the bound once the workers have the CPU they "
          "need. Measured jobs/s here is bound by the\nworkers' CPU; the ceiling shows "
          "the Redis side: 3 namespaces on 3 masters give the busiest master about a "
          "third of\nthe work, so about 3x the ceiling of one namespace (on one master "
          "or on a single Redis).")
    by_label = {row.label: row for row in rows}
    one, three = by_label.get("cluster 1 ns"), by_label.get("cluster 3 ns")
    if one is not None and three is not None:
        print(f"Redis ceiling, cluster 3 ns / cluster 1 ns: {three.ceiling / one.ceiling:.2f}x "
              f"(measured jobs/s: {three.rate / one.rate:.2f}x)")
    tick_us = 1e6 / CLOCK_TICKS / base.jobs
    print(f"CPU is counted in clock ticks of {1000 / CLOCK_TICKS:.0f} ms: one tick is "
          f"{tick_us:.2f} µs/job at {base.jobs:,} jobs (more --jobs, finer figures).")


if __name__ == "__main__":
    sys.exit(main())
