"""Redis killed and restarted (AOF, fsync always) under a running worker process."""

from __future__ import annotations

import time

import pytest

from .faultworkers import ENDS
from .harness import Fleet, Node, wait_until

pytestmark = pytest.mark.fault

OUTAGE = 0.8
"""Seconds Redis stays down: the fault itself, not a wait for a condition."""


def restart_redis(fleet: Fleet) -> None:
    """Kill redis-server at once (a crash) and start it again on the same port and data."""
    fleet.server.kill()
    time.sleep(OUTAGE)
    fleet.server.start()


def assert_still_working(fleet: Fleet, node: Node, prefix: str) -> list[str]:
    """The node is alive and runs new jobs after the outage; returns their tags."""
    assert node.alive, fleet.logs()
    after = fleet.enqueue(100, sleep=0.0, prefix=prefix)
    fleet.wait_done(after, 30, "jobs enqueued after the restart")
    assert node.alive
    return after


def test_redis_restart_while_idle(durable_fleet: Fleet) -> None:
    fleet = durable_fleet
    # Given an idle node that already ran 100 jobs
    node = fleet.start_node("rr-idle", metrics=True)
    before = fleet.enqueue(100, sleep=0.0, prefix="before")
    fleet.wait_done(before, 20)
    # When Redis crashes and comes back
    restart_redis(fleet)
    # Then the node is still alive and still processing
    after = assert_still_working(fleet, node, "after")
    tags = before + after
    figures = fleet.account("Redis restart while idle", tags, 0,
                            "alive, lost 0, dup 0, stat:processed == successes")
    assert (figures.lost, figures.duplicates) == (0, 0), figures
    assert fleet.stat("processed") == len(fleet.records(ENDS))
    errors = node.metric_sum("exq_redis_errors_total")
    print(f"[fault]   redis errors counted by the idle node during the outage: {errors:.0f}")
    assert errors > 0, "the outage was seen and counted"


def test_redis_restart_while_fully_busy(durable_fleet: Fleet) -> None:
    fleet = durable_fleet
    # Given a node with all 20 slots busy and a deep queue of 10 ms jobs
    node = fleet.start_node("rr-busy", queues=("q:20",), metrics=True)
    tags = fleet.enqueue(2000, sleep=0.01, prefix="busy")
    wait_until(lambda: len(fleet.ended()) >= 300, 20, "300 jobs ended")
    # When Redis crashes mid-run and comes back
    in_flight = fleet.freeze_busy(node)
    fleet.server.kill()
    node.thaw()
    time.sleep(OUTAGE)
    fleet.server.start()
    # Then every job completes, the node lives on and the counters match the work done
    fleet.wait_done(tags, 60)
    more = assert_still_working(fleet, node, "more")
    figures = fleet.account("Redis restart while 100% busy", tags + more, in_flight,
                            "alive, lost 0, dup <= in flight, stat:processed == successes")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags
    assert fleet.stat("processed") == len(fleet.records(ENDS))
    assert node.metric_sum("exq_redis_errors_total") > 0, "the outage was seen and counted"
