"""The fault proxy itself: it forwards, cuts (refused or silent), restores and delays."""

from __future__ import annotations

import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .harness import Fleet

pytestmark = pytest.mark.fault


def client(port: int) -> redis.Redis:
    """A client without retries, so every fault shows."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5,
                       socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def test_proxy_forwards_cuts_restores_and_delays(fleet: Fleet) -> None:
    # Given a proxy in front of the fleet's Redis
    proxy = fleet.proxy()
    through = client(proxy.port)
    try:
        # Then it forwards
        assert through.ping()
        assert proxy.connections == 1
        # When it is cut, the open connection breaks and new ones are refused
        proxy.cut()
        with pytest.raises(redis.exceptions.ConnectionError):
            through.ping()
        with client(proxy.port) as other, pytest.raises(redis.exceptions.ConnectionError):
            other.ping()
        # When it is restored, on the same port, it forwards again
        proxy.restore()
        assert through.ping()
        # When it is cut silently, new connections hang until the client's timeout
        proxy.cut(blackhole=True)
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            through.ping()
        proxy.restore()
        assert through.ping()
        # When every chunk is delayed 100 ms, a round trip takes at least 200 ms
        proxy.delay(0.1)
        started = time.monotonic()
        assert through.ping()
        assert time.monotonic() - started >= 0.2
        proxy.delay(0)
    finally:
        through.close()
    # And stop() ends it for good
    proxy.stop()
    proxy.stop()
    with client(proxy.port) as other, pytest.raises(redis.exceptions.ConnectionError):
        other.ping()
