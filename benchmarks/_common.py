"""What the benchmark scripts share: server description, chunking, a process's RSS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import redis

from exq_fast.embedded import delete_namespace

__all__ = ["chunks", "delete_namespace", "describe_server", "rss_mb"]


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


def rss_mb(pid: int | str = "self") -> float:
    """``VmRSS`` of process ``pid`` (default: this one) in MB; NaN if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")
