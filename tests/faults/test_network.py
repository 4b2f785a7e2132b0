"""Network faults between one node and Redis (a ``TcpProxy``), watched by a monitor node.

The node under test (``net``) reaches Redis only through the proxy; the
monitor (``net-mon``) talks to Redis directly, consumes another queue and runs
the heartbeat monitor. Both beat every 500 ms; a node is dead after 4 missed
beats (2 s). The job records go to Redis directly, so they are not cut.
"""

from __future__ import annotations

import time

import pytest

from .harness import Fleet, Node, wait_until
from .proxy import TcpProxy

pytestmark = pytest.mark.fault

HEARTBEAT = {"EXQ_HEARTBEAT_ENABLE": "true", "EXQ_HEARTBEAT_INTERVAL": "500",
             "EXQ_MISSED_HEARTBEATS_ALLOWED": "3"}
HEARTBEAT_TIMEOUT = 2.0
"""Seconds without a heartbeat after which Exq's monitor would take a node for dead."""


def start_pair(fleet: Fleet, concurrency: int) -> tuple[TcpProxy, Node, Node]:
    """The proxy, the node behind it and the monitor, all running."""
    proxy = fleet.proxy()
    node = fleet.start_node("net", queues=(f"q:{concurrency}",), env=HEARTBEAT,
                            redis_url=fleet.proxied_url(proxy), metrics=True)
    monitor = fleet.start_node("net-mon", queues=("mon:1",), env=HEARTBEAT, metrics=True)
    return proxy, node, monitor


def recovered_by(monitor: Node) -> float:
    """Jobs the monitor re-enqueued from dead nodes' backups."""
    return monitor.metric_sum("exq_jobs_recovered_total", reason="heartbeat")


def beat_after(fleet: Fleet, node_id: str, moment: float) -> bool:
    """True once ``node_id`` has beaten after the Unix time ``moment``."""
    score = fleet.client.zscore(fleet.keys.heartbeats, node_id)
    return score is not None and score > moment


def cut_for(fleet: Fleet, proxy: TcpProxy, node_id: str, seconds: float, *,
            blackhole: bool) -> int:
    """Cut the link for ``seconds`` (the fault's length); return the node's backup
    length at the cut (it cannot change while the link is down)."""
    cut_at = time.monotonic()
    proxy.cut(blackhole=blackhole)
    # Once the proxy has closed every link no byte of the node reaches Redis.
    wait_until(lambda: proxy.connections == 0, 5, "every proxied link is closed")
    fleet.client.ping()  # two round trips: Redis has run what the links delivered
    fleet.client.ping()
    in_flight = fleet.backup_len(node_id)
    time.sleep(max(seconds - (time.monotonic() - cut_at), 0.0))  # the fault's own length
    proxy.restore()
    return in_flight


def test_short_cut_recovers_nothing(fleet: Fleet) -> None:
    # Given a node behind a proxy running 600 jobs of 50 ms, 10 at a time
    proxy, node, monitor = start_pair(fleet, 10)
    tags = fleet.enqueue(600, sleep=0.05, prefix="short-cut")
    wait_until(lambda: len(fleet.ended()) >= 100, 20, "100 jobs ended")
    # When its link is cut for 0.4 s (well under the 2 s heartbeat timeout)
    in_flight = cut_for(fleet, proxy, "net", 0.4, blackhole=False)
    restored = time.time()
    # Then every job completes exactly once and the monitor recovered nothing
    fleet.wait_done(tags, 60)
    wait_until(lambda: beat_after(fleet, "net", restored + HEARTBEAT_TIMEOUT), 10,
               "the node beat again well after the cut")
    assert recovered_by(monitor) == 0, monitor.stderr_text()
    figures = fleet.account("connection cut 0.4 s (< heartbeat timeout)", tags, in_flight,
                            "lost 0, dup 0, no recovery by the monitor")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates == 0, figures.duplicated_tags
    assert node.alive and monitor.alive
    assert node.metric_sum("exq_redis_errors_total") > 0, "the cut was seen and counted"


def test_long_silent_cut_is_not_taken_for_death(fleet: Fleet) -> None:
    # Given a node behind a proxy running 600 jobs of 50 ms, 10 at a time
    proxy, node, monitor = start_pair(fleet, 10)
    tags = fleet.enqueue(600, sleep=0.05, prefix="long-cut")
    wait_until(lambda: len(fleet.ended()) >= 100, 20, "100 jobs ended")
    # When its link goes silent for 4 s (twice its 2 s heartbeat allowance)
    in_flight = cut_for(fleet, proxy, "net", 4.0, blackhole=True)
    assert in_flight > 0, "the cut caught no job in flight: nothing was tested"
    # Then the monitor took nothing from it (its process runs on this host, so it is alive
    # whatever its heartbeat says), and every job ran exactly once
    fleet.wait_done(tags, 60)
    assert recovered_by(monitor) == 0, monitor.stderr_text()
    figures = fleet.account("connection cut 4 s, silent (> heartbeat allowance)", tags,
                            in_flight, "lost 0, dup 0: a live node is never recovered")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates == 0, figures.duplicated_tags
    assert node.alive and monitor.alive


def test_latency_slows_but_loses_nothing(fleet: Fleet) -> None:
    # Given a node behind a proxy and a monitor
    proxy, node, monitor = start_pair(fleet, 20)
    rates: dict[float, float] = {}
    for latency in (0.001, 0.05):
        # When every chunk through the proxy waits `latency`
        proxy.delay(latency)
        started = time.monotonic()
        tags = fleet.enqueue(300, sleep=0.0, prefix=f"latency-{latency * 1000:g}ms")
        # Then every job completes once, only more slowly
        fleet.wait_done(tags, 60)
        rates[latency] = len(tags) / (time.monotonic() - started)
        figures = fleet.account(f"latency {latency * 1000:g} ms per chunk "
                                f"({rates[latency]:.0f} jobs/s)", tags, 0,
                                "lost 0, dup 0, no spurious recovery")
        assert figures.lost == 0, figures.lost_tags
        assert figures.duplicates == 0, figures.duplicated_tags
    assert rates[0.05] < rates[0.001]
    assert recovered_by(monitor) == 0, monitor.stderr_text()
    assert node.metric_sum("exq_redis_errors_total") == 0
