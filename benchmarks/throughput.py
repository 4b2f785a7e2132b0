#!/usr/bin/env python3
"""How many no-op jobs/s does one exq-fast process drain, in how many Redis round trips?

And with how much memory, compared side by side with a minimal raw redis-py loop.

Against ``--redis-url``, else the Redis that ``exq_fast.embedded.find_redis()`` finds
(``REDIS_URL``, else 127.0.0.1:6379, else a private ``redis-server`` started for the
run), this drains N pre-enqueued no-op jobs (``Bench.Noop``, no args; enqueued with
``enqueue_all`` in batches of 1000, not timed), side by side in one run:

* ``raw RPOPLPUSH+LREM``: the yardstick, a single-threaded redis-py loop doing only
  ``RPOPLPUSH queue backup`` then ``LREM backup 1 <job>`` per job (2 round trips per
  job; no decoding, no worker call, no stats, no in-progress records);
* ``exq-fast C=<c> m=on|off``: one ``Exq`` node (default config, ``concurrency=c``, a
  fixed node id) running the no-op worker, for each ``--concurrency`` (default 25 and
  100), twice: with ``metrics_enabled=True`` (the default: every applied stats batch
  moves the Prometheus counters and histograms) and with ``metrics_enabled=False``.
  The order of the two alternates from one concurrency to the next (on/off, off/on,
  ...) so that neither always runs first; no ``/metrics`` endpoint is served.

"metrics cost" is, per concurrency, ``(off jobs/s - on jobs/s) / off jobs/s``:
positive means slower with metrics. One pair of runs is noisy: read a few percent
either way as no measurable difference.

Timing: from ``Exq.start()`` (scripts loaded, backups recovered, threads started)
until ``exq.acks.totals["processed"] == N``, i.e. until the stats batch acking
the last job has been applied in Redis; for the yardstick, from its first
RPOPLPUSH to its last LREM. "ratio" is jobs/s divided by the yardstick's jobs/s.

Round trips are counted on the client side: every client in the timed window
uses a ``redis.Connection`` subclass counting ``send_packed_command`` calls (one
packed send = one request/reply exchange; a pipeline or a Lua script call is one
send). Connection set-up commands and health-check PINGs are real round trips
and are counted too. For comparison the server's ``INFO commandstats`` delta is
also printed; it counts every command *including those run inside Lua scripts*
and every command of a pipeline, and on a shared server other clients' commands
as well, so it is only an approximation (see the notes printed with the table).

Memory: the process-wide peak RSS (``ru_maxrss``, never decreases, so later rows
include earlier rows' peaks; the yardstick runs first) and the current RSS
(``VmRSS`` of ``/proc/self/status``) just before the node starts and right after
the drain. Where the time goes: this process's CPU time over the run
(``time.process_time``, all threads; CPU/wall near 1.0 means one core, i.e. the
GIL, is the limit) and the Redis server's (``INFO cpu``).

Everything is written under a random namespace (``bench<hex>``) whose keys, and
only those, are deleted at the end (SCAN MATCH + DEL in batches); a private
server, if one was started, is stopped.

Run from the project root::

    .venv/bin/python benchmarks/throughput.py                   # 100000 jobs, C=25 and 100
    .venv/bin/python benchmarks/throughput.py --quick           # 20000 jobs
    .venv/bin/python benchmarks/throughput.py --jobs 50000 --concurrency 10 --concurrency 50
    .venv/bin/python benchmarks/throughput.py --redis-url redis://127.0.0.1:6380/0
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import redis
from _common import chunks, delete_namespace, describe_server, rss_mb

from exq_fast.app import Exq
from exq_fast.config import Config
from exq_fast.connection import connection_kwargs
from exq_fast.embedded import RedisServer, find_redis
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from exq_fast.registry import Registry

WORKER = "Bench.Noop"
NODE_ID = "bench-node"
RAW_NODE_ID = "bench-raw"
RAW_QUEUE = "raw"
DEFAULT_JOBS = 100_000
QUICK_JOBS = 20_000
DEFAULT_CONCURRENCY = (25, 100)
ENQUEUE_BATCH = 1000
POLL_SECONDS = 0.001
MIN_DRAIN_TIMEOUT = 120.0
SECONDS_PER_JOB_TIMEOUT = 0.005

SCRIPT_CALLS = frozenset({"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"})
"""Commands that run a script: one client request each."""
SCRIPT_ONLY = frozenset({
    "rpop", "lpush", "lrem", "incrby", "expire", "set", "get", "zadd", "hdel",
    "zrangebyscore", "zrem", "sadd", "llen", "lpop", "rpush",
})
"""Commands exq-fast issues (almost) only from inside its Lua scripts."""
IGNORED = frozenset({"info"})
"""The benchmark's own snapshot commands."""


def noop() -> None:
    """The worker: does nothing."""


# --- client-side round-trip counting ------------------------------------------------------


class RequestCounter:
    """A thread-safe count of packed sends (requests) made by a set of connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        """Count one send."""
        with self._lock:
            self._count += 1

    @property
    def value(self) -> int:
        """Sends counted so far."""
        return self._count


class _Counting(redis.connection.ConnectionInterface):
    """Mixin for a ``redis`` connection class: counts every ``send_packed_command``."""

    counter: RequestCounter

    def __init__(self, *, counter: RequestCounter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counter = counter

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.counter.add()
        super().send_packed_command(  # type: ignore[safe-super,no-untyped-call]
            command, check_health)


class CountingConnection(_Counting, redis.Connection):
    """TCP connection (``redis://``) counting its requests."""


class CountingSSLConnection(_Counting, redis.SSLConnection):
    """TLS connection (``rediss://``) counting its requests."""


class CountingUnixConnection(_Counting, redis.UnixDomainSocketConnection):
    """Unix socket connection (``unix://``) counting its requests."""


def counting_client(config: Config, counter: RequestCounter) -> redis.Redis:
    """A client like ``exq_fast.connection.connect(config)`` whose requests ``counter`` counts."""
    url = config.redis_url or ""
    scheme = urlsplit(url).scheme
    connection_class: type[redis.Connection | redis.UnixDomainSocketConnection]
    connection_class = CountingConnection
    if scheme == "rediss":
        connection_class = CountingSSLConnection
    elif scheme == "unix":
        connection_class = CountingUnixConnection
    pool = redis.ConnectionPool.from_url(url, connection_class=connection_class,
                                         counter=counter, **connection_kwargs(config))
    return redis.Redis.from_pool(pool)  # closing the client disconnects the pool


# --- server-side counts and memory ------------------------------------------------------------


def command_calls(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as ``{command: calls}`` (``cmdstat_`` prefix removed)."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def server_cpu_seconds(client: redis.Redis) -> float:
    """CPU time the Redis server has used (``INFO cpu``: user + system, main and children)."""
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


@dataclass(frozen=True)
class ServerSnapshot:
    """The server's counters at one moment."""

    calls: dict[str, int]
    cpu: float

    @classmethod
    def take(cls, client: redis.Redis) -> ServerSnapshot:
        """Read ``INFO commandstats`` and ``INFO cpu``."""
        return cls(command_calls(client), server_cpu_seconds(client))


@dataclass(frozen=True)
class ServerCounts:
    """Server-side figures for one run (``INFO commandstats`` and ``INFO cpu`` deltas)."""

    cpu: float
    """Seconds of CPU the Redis server used during the run."""
    commands: int
    """Every command, including those run inside scripts and each one of a pipeline."""
    scripts: int
    """Script runs (EVALSHA, EVAL, ...): one client request each."""
    top_level: int
    """Approximate client requests: see ``server_counts``."""


def server_counts(before: ServerSnapshot, after: ServerSnapshot, scripted: bool) -> ServerCounts:
    """The delta between two snapshots, without the snapshots' own INFO calls.

    Approximate top-level requests: for a method that runs scripts (``scripted``),
    every command except those exq-fast runs only inside scripts (``SCRIPT_ONLY``);
    for one that does not, every command. Over-counts pipelined commands,
    under-counts a ``SCRIPT_ONLY`` command sent directly, and counts other
    clients of a shared server.
    """
    old = before.calls
    delta = {name: calls - old.get(name, 0) for name, calls in after.calls.items()
             if name not in IGNORED and calls != old.get(name, 0)}
    commands = sum(delta.values())
    scripts = sum(calls for name, calls in delta.items() if name in SCRIPT_CALLS)
    top_level = commands
    if scripted:
        top_level -= sum(calls for name, calls in delta.items() if name in SCRIPT_ONLY)
    return ServerCounts(after.cpu - before.cpu, commands, scripts, top_level)


def peak_rss_mb() -> float:
    """The process's peak RSS so far, in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One timed drain."""

    method: str
    concurrency: int | None
    jobs: int
    seconds: float
    round_trips: int
    cpu: float
    """Seconds of CPU this process used (all threads)."""
    server: ServerCounts
    rss_before: float
    rss_after: float
    peak_rss: float
    metrics: bool | None = None
    """exq-fast's ``metrics_enabled`` for this run (None for the yardstick)."""

    @property
    def rate(self) -> float:
        """Jobs per second."""
        return self.jobs / self.seconds


@dataclass(frozen=True)
class Bench:
    """What every run needs: the URL, the namespace, a plain client and an enqueuer."""

    url: str
    namespace: str
    keys: Keys
    plain: redis.Redis
    enqueuer: Enqueuer

    def config(self, queue: str, node_id: str, concurrency: int,
               metrics: bool = True) -> Config:
        """The node's config: defaults but for the URL, namespace, queue, node id and
        ``metrics_enabled``."""
        return Config(redis_url=self.url, namespace=self.namespace, queues=[queue],
                      concurrency=concurrency, node_id=node_id, metrics_enabled=metrics)


@dataclass
class Window:
    """Counters sampled at the start of a timed window."""

    counter: RequestCounter
    server: ServerSnapshot
    rss_before: float
    sent: int
    cpu: float
    start_ns: int

    @classmethod
    def open(cls, bench: Bench, counter: RequestCounter) -> Window:
        """Snapshot the server counters, RSS and CPU time, then start the clock."""
        server = ServerSnapshot.take(bench.plain)
        rss = rss_mb()
        return cls(counter, server, rss, counter.value, time.process_time(),
                   time.perf_counter_ns())

    def close(self, bench: Bench, method: str, concurrency: int | None, jobs: int) -> Result:
        """Stop the clock, then read the counters and memory (exq-fast runs scripts)."""
        seconds = (time.perf_counter_ns() - self.start_ns) / 1e9
        cpu = time.process_time() - self.cpu
        sent = self.counter.value - self.sent
        rss_after, peak = rss_mb(), peak_rss_mb()
        server = server_counts(self.server, ServerSnapshot.take(bench.plain),
                               scripted=concurrency is not None)
        return Result(method, concurrency, jobs, seconds, sent, cpu, server, self.rss_before,
                      rss_after, peak)




def pre_enqueue(bench: Bench, queue: str, jobs: int) -> None:
    """Push ``jobs`` no-op jobs to ``queue`` (not timed) and check they are all there."""
    for count in chunks(jobs, ENQUEUE_BATCH):
        bench.enqueuer.enqueue_all([(queue, WORKER, [])] * count)
    waiting = int(bench.plain.llen(bench.keys.queue(queue)))
    if waiting != jobs:
        raise RuntimeError(f"{waiting} jobs in {queue!r} after enqueueing, expected {jobs}")


def check_drained(bench: Bench, label: str, queue: str, node_id: str) -> None:
    """Fail loudly (not a timing check) if a job is left in the queue or the backup list."""
    left = int(bench.plain.llen(bench.keys.queue(queue)))
    unacked = int(bench.plain.llen(bench.keys.backup(node_id, queue)))
    if left or unacked:
        raise RuntimeError(f"{label}: {left} jobs left in the queue, {unacked} not acked")


def run_yardstick(bench: Bench, jobs: int) -> Result:
    """Drain ``jobs`` with RPOPLPUSH + LREM per job, single-threaded."""
    pre_enqueue(bench, RAW_QUEUE, jobs)
    counter = RequestCounter()
    config = bench.config(RAW_QUEUE, RAW_NODE_ID, 1)
    client = counting_client(config, counter)
    queue, backup = bench.keys.queue(RAW_QUEUE), bench.keys.backup(RAW_NODE_ID, RAW_QUEUE)
    rpoplpush, lrem = client.rpoplpush, client.lrem
    try:
        window = Window.open(bench, counter)
        for _ in range(jobs):
            raw = rpoplpush(queue, backup)
            if raw is None:
                raise RuntimeError("the raw queue ran dry early")
            lrem(backup, 1, raw)  # type: ignore[arg-type]  # typed str; bytes go as they are
        result = window.close(bench, "raw RPOPLPUSH+LREM", None, jobs)
    finally:
        client.close()
    check_drained(bench, "yardstick", RAW_QUEUE, RAW_NODE_ID)
    return result


def wait_processed(exq: Exq, jobs: int) -> None:
    """Sleep-poll until the node has acked ``jobs`` jobs; fail on a failed job or a timeout."""
    totals = exq.acks.totals
    deadline = time.monotonic() + max(MIN_DRAIN_TIMEOUT, jobs * SECONDS_PER_JOB_TIMEOUT)
    while totals["processed"] < jobs:
        if totals["failed"]:
            raise RuntimeError(f"{totals['failed']} no-op jobs failed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {totals['processed']} of {jobs} jobs processed")
        time.sleep(POLL_SECONDS)


def run_exq(bench: Bench, jobs: int, concurrency: int, metrics: bool = True) -> Result:
    """Drain ``jobs`` with one exq-fast node of the given concurrency and metrics switch."""
    switch = "on" if metrics else "off"
    method = f"exq-fast C={concurrency} m={switch}"
    queue = f"noop{concurrency}{switch}"
    pre_enqueue(bench, queue, jobs)
    counter = RequestCounter()
    config = bench.config(queue, NODE_ID, concurrency, metrics)
    exq = Exq(config, workers=Registry({WORKER: noop}), client=counting_client(config, counter))
    try:
        window = Window.open(bench, counter)
        exq.start()
        wait_processed(exq, jobs)
        result = replace(window.close(bench, method, concurrency, jobs), metrics=metrics)
    finally:
        if not exq.stop():
            print(f"warning: {method} did not stop cleanly", file=sys.stderr)
    check_drained(bench, result.method, queue, NODE_ID)
    return result


def metrics_order(index: int) -> tuple[bool, bool]:
    """The ``metrics_enabled`` values of the two runs of the ``index``-th concurrency:
    on then off, then off then on, and so on, so neither always runs first."""
    return (True, False) if index % 2 == 0 else (False, True)


# --- set-up and clean-up --------------------------------------------------------------------






def print_header(bench: Bench, private: bool, jobs: int) -> None:
    """Versions and settings, so a pasted table says what produced it."""
    payload = bench.enqueuer.build("noop", WORKER, [], None).payload
    defaults = Config()
    print(describe_server(bench.plain, bench.url, private))
    print(f"Python {platform.python_version()} ({platform.machine()}), "
          f"redis-py {redis.__version__}, namespace {bench.namespace}")
    print(f"{jobs} no-op jobs per run, {len(payload)} B payload; exq-fast defaults: "
          f"poll_timeout {defaults.poll_timeout} ms, stats_flush_interval "
          f"{defaults.stats_flush_interval} ms, stats_batch_size {defaults.stats_batch_size}")
    sys.stdout.flush()


def benchmark(url: str, private: bool, jobs: int, concurrencies: Sequence[int]) -> list[Result]:
    """The yardstick, then two nodes per concurrency (metrics on and off, the order
    alternating), under a fresh namespace."""
    namespace = "bench" + uuid.uuid4().hex
    keys = Keys(namespace)
    plain = redis.Redis.from_url(url)
    enqueuer = Enqueuer(Config(redis_url=url, namespace=namespace))
    bench = Bench(url, namespace, keys, plain, enqueuer)
    try:
        print_header(bench, private, jobs)
        results = [run_yardstick(bench, jobs)]
        for index, concurrency in enumerate(concurrencies):
            results += [run_exq(bench, jobs, concurrency, metrics)
                        for metrics in metrics_order(index)]
        return results
    finally:
        deleted = delete_namespace(plain, keys.namespace)
        print(f"clean-up: deleted {deleted} keys matching {keys.all_keys_pattern()}")
        enqueuer.close()
        plain.close()


# --- output ---------------------------------------------------------------------------------


def print_table(results: Sequence[Result]) -> None:
    """Throughput and client-side round trips, each rate as a ratio of the yardstick's."""
    reference = results[0].rate
    print()
    print(f"{'method':<20} {'conc':>5} {'jobs':>7} {'seconds':>8} {'jobs/s':>9} "
          f"{'RT/job':>7} {'ratio':>7}")
    print("-" * 69)
    for r in results:
        conc = "1" if r.concurrency is None else str(r.concurrency)
        print(f"{r.method:<20} {conc:>5} {r.jobs:>7} {r.seconds:>8.3f} {r.rate:>9,.0f} "
              f"{r.round_trips / r.jobs:>7.3f} {r.rate / reference:>6.2f}x")
    print()
    print("RT/job = client requests (packed sends, counted by a redis.Connection subclass) "
          "/ jobs")
    print("ratio  = jobs/s / yardstick jobs/s (above 1.00x = faster than the raw loop)")


def metrics_costs(results: Sequence[Result]) -> list[tuple[int, float]]:
    """``(concurrency, cost %)`` for each concurrency run with metrics on and off:
    ``(off jobs/s - on jobs/s) / off jobs/s * 100`` (positive = slower with metrics)."""
    rates: dict[int, dict[bool, float]] = {}
    for r in results:
        if r.concurrency is not None and r.metrics is not None:
            rates.setdefault(r.concurrency, {})[r.metrics] = r.rate
    return [(c, (pair[False] - pair[True]) / pair[False] * 100)
            for c, pair in rates.items() if True in pair and False in pair]


def print_metrics_cost(results: Sequence[Result]) -> None:
    """One "metrics cost" line per concurrency, from its two rows of the table."""
    print()
    for concurrency, cost in metrics_costs(results):
        print(f"C={concurrency}: metrics cost: {cost:+.1f}% of throughput")
    print("metrics cost = (m=off jobs/s - m=on jobs/s) / m=off jobs/s; positive = slower with")
    print("  metrics (metrics_enabled=True); runs alternate on/off, off/on by concurrency; a")
    print("  single pair is noisy, so a few percent either way is within run-to-run variation")


def print_memory_and_cpu(results: Sequence[Result]) -> None:
    """Memory and CPU time of this process for each run."""
    print()
    print(f"{'method':<20} {'RSS before':>10} {'RSS after':>10} {'peak RSS':>9} "
          f"{'CPU s':>7} {'CPU/wall':>8} {'CPU µs/job':>10}")
    print("-" * 80)
    for r in results:
        print(f"{r.method:<20} {r.rss_before:>8.1f}MB {r.rss_after:>8.1f}MB "
              f"{r.peak_rss:>7.1f}MB {r.cpu:>7.2f} {r.cpu / r.seconds:>8.2f} "
              f"{r.cpu / r.jobs * 1e6:>10.1f}")
    print()
    print("RSS before/after = VmRSS just before the run and right after the drain; peak RSS =")
    print("  ru_maxrss, process-wide and never decreasing (a row includes earlier rows' peaks);")
    print("  the kernel's RSS counters are approximate, so it may read a little under VmRSS")
    print("CPU = this process's user + system CPU time during the run, all threads")


def print_server(results: Sequence[Result], private: bool) -> None:
    """The server's own counts for each run."""
    print()
    print(f"{'method':<20} {'srv cmd/job':>11} {'scripts/job':>11} {'~top/job':>9} "
          f"{'srv CPU µs/job':>14}")
    print("-" * 69)
    for r in results:
        print(f"{r.method:<20} {r.server.commands / r.jobs:>11.3f} "
              f"{r.server.scripts / r.jobs:>11.4f} {r.server.top_level / r.jobs:>9.3f} "
              f"{r.server.cpu / r.jobs * 1e6:>14.1f}")
    print()
    print("srv cmd/job = INFO commandstats calls / jobs, including commands run inside Lua")
    print("  scripts; scripts/job = EVALSHA+EVAL calls / jobs; ~top/job = an approximation of")
    print("  client requests: all commands for the yardstick; for exq-fast, commands minus")
    print("  those it issues only inside scripts,")
    print(textwrap.fill(", ".join(sorted(SCRIPT_ONLY)) + "; pipelined commands count one each",
                        width=88, initial_indent="  ", subsequent_indent="  "))
    print("srv CPU = the Redis server's CPU time during the run (INFO cpu)")
    if not private:
        print("(an existing server: other clients' commands and CPU during a run count too)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"jobs per run (default {DEFAULT_JOBS}, or {QUICK_JOBS} with --quick)")
    parser.add_argument("--concurrency", type=int, action="append", default=None,
                        help="exq-fast concurrency; repeatable (default: "
                             f"{' and '.join(map(str, DEFAULT_CONCURRENCY))})")
    parser.add_argument("--quick", action="store_true", help=f"a short run: {QUICK_JOBS} jobs")
    parser.add_argument("--redis-url", default=None,
                        help="the Redis to use (default: REDIS_URL, else 127.0.0.1:6379, "
                             "else a private redis-server)")
    options = parser.parse_args(argv)
    if options.jobs is None:
        options.jobs = QUICK_JOBS if options.quick else DEFAULT_JOBS
    if options.jobs < 1:
        parser.error("--jobs must be at least 1")
    options.concurrency = options.concurrency or list(DEFAULT_CONCURRENCY)
    if min(options.concurrency) < 1:
        parser.error("--concurrency must be at least 1")
    return options


def main(argv: list[str] | None = None) -> int:
    """Find a Redis, run the benchmark, print the tables, stop any private server."""
    options = parse_args(argv)
    server: RedisServer | None = None
    if options.redis_url:
        url = options.redis_url
    else:
        url, server = find_redis()
    try:
        results = benchmark(url, server is not None, options.jobs, options.concurrency)
    finally:
        if server is not None:
            server.stop()
    print_table(results)
    print_metrics_cost(results)
    print_memory_and_cpu(results)
    print_server(results, server is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
