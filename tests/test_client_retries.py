"""No Redis command is re-sent by redis-py behind exq-fast's back (issue 11, point 2).

The fetch script is not idempotent: a copy re-sent by the client library after
a timeout moves a second batch of jobs while the reply of the first copy, the
one that ran when Redis woke, is never read; its jobs stay in the backup list
until the node restarts. Retries are exq-fast's own decision (the manager's
fetch backoff and reconciliation, the stats writer's idempotent batches), so
every client ``exq_fast.connection.connect`` builds must carry a retry policy
of 0 retries, whatever the way Redis is addressed. redis-py 8 gives a client
built from host and port 10 retries by default, and one from a URL asking
``retry_on_timeout`` 1.

* configuration: for each way of addressing Redis (URL, host/port, rediss://,
  ``redis_tls`` with a URL or host/port, unix socket, a URL with
  ``retry_on_timeout``), every connection of the client's pool has 0 retries;
* behaviour: a command whose reply a proxy swallows reaches Redis once, and its
  failure reaches the caller, for a client built from a URL or host/port.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from exq_fast.config import Config
from exq_fast.connection import connect
from exq_fast.embedded import RedisServer
from tests.faults.proxy import TcpProxy

Address = Callable[[int, str], Config]
"""Builds a Config from the TCP port and the unix socket path of a Redis."""

PATHS: dict[str, Address] = {
    "redis:// url": lambda port, _: Config(redis_url=f"redis://127.0.0.1:{port}/0"),
    "host and port": lambda port, _: Config(redis_host="127.0.0.1", redis_port=port),
    "rediss:// url": lambda port, _: Config(redis_url=f"rediss://127.0.0.1:{port}/0",
                                            redis_tls_verify=False),
    "redis_tls with a redis:// url": lambda port, _: Config(
        redis_url=f"redis://127.0.0.1:{port}/0", redis_tls=True, redis_tls_verify=False),
    "redis_tls with host and port": lambda port, _: Config(
        redis_host="127.0.0.1", redis_port=port, redis_tls=True, redis_tls_verify=False),
    "unix:// url": lambda _, path: Config(redis_url=f"unix://{path}?db=0"),
    "url with retry_on_timeout": lambda port, _: Config(
        redis_url=f"redis://127.0.0.1:{port}/0?retry_on_timeout=yes"),
}
TLS = {"rediss:// url", "redis_tls with a redis:// url", "redis_tls with host and port"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, str]]:
    """A private redis-server listening on TCP and on a unix socket."""
    socket_path = str(Path(tmp_path_factory.mktemp("sock")) / "redis.sock")
    with RedisServer(extra_args=("--unixsocket", socket_path,
                                 "--unixsocketperm", "700")) as started:
        yield started, socket_path


def retries_of(client: redis.Redis) -> list[int]:
    """The retry count of a new connection of the client's pool and of those it holds."""
    pool = client.connection_pool
    connections = [pool.make_connection(), *getattr(pool, "_available_connections", [])]
    return [connection.retry.get_retries() for connection in connections]


@pytest.mark.parametrize("path", list(PATHS))
def test_every_client_has_no_retries(server: tuple[RedisServer, str], path: str) -> None:
    redis_server, socket_path = server
    # Given a client built by exq-fast for this way of addressing Redis
    client = connect(PATHS[path](redis_server.port, socket_path))
    try:
        if path not in TLS:  # the plain server cannot speak TLS: configuration only
            # When it has talked to Redis
            assert client.ping()
        # Then no connection of its pool would send a command twice
        retries = retries_of(client)
        assert retries == [0] * len(retries), (
            f"{path}: redis-py would re-send a command up to {max(retries)} times")
    finally:
        client.close()


@pytest.mark.parametrize("path", ["redis:// url", "host and port"])
def test_a_command_whose_reply_is_lost_runs_once(server: tuple[RedisServer, str],
                                                  path: str) -> None:
    redis_server, _ = server
    key = f"retries-test:{uuid.uuid4().hex}"
    direct = redis.Redis(port=redis_server.port, socket_timeout=5)
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        # Given a client of exq-fast through a proxy, with a short socket timeout
        config = PATHS[path](proxy.port, "").replace(redis_timeout=300)
        client = connect(config)
        try:
            assert client.incr(key) == 1
            # When the reply of a non-idempotent command is swallowed, and the link
            # comes back 0.5 s later (after the timeout, within a retry window)
            proxy.swallow_replies()
            timer = threading.Timer(0.5, proxy.restore)
            timer.start()
            try:
                client.incr(key)
                outcome = "a reply (from a copy of the command re-sent by redis-py)"
            except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError) as exc:
                outcome = type(exc).__name__
            timer.join()
            # Then the command ran exactly once, and its failure reached the caller
            runs = int(direct.get(key) or 0) - 1
            assert runs == 1, f"{path}: INCR ran {runs} times; the caller got {outcome}"
            assert outcome in ("TimeoutError", "ConnectionError")
        finally:
            client.close()
            direct.delete(key)
            direct.close()
