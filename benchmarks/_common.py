"""What the benchmark scripts share: server description and chunking."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import redis

from exq_fast.embedded import delete_namespace

__all__ = ["chunks", "delete_namespace", "describe_server"]


def chunks(n: int, size: int) -> Iterator[int]:
    """Sizes of the batches that make up ``n`` items, ``size`` at most each."""
    for start in range(0, n, size):
        yield min(size, n - start)


def describe_server(client: redis.Redis, url: str, private: bool) -> str:
    """Where the Redis is (host and port only, never credentials) and its version."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port}" if parts.hostname else url.split("?", 1)[0]
    version = client.info("server").get("redis_version", "?")
    kind = "private server started for this run" if private else "existing server"
    return f"Redis {version} at {where} ({kind})"
