"""A fetch is never re-sent by the Redis client library (issue 11, point 2).

The node is configured by host and port (``EXQ_REDIS_HOST``/``EXQ_REDIS_PORT``,
what a bare ``exq-fast run`` does), the way redis-py would by default retry a
command 10 times after a timeout. The fetch script is not idempotent: a copy
re-sent after a timeout moves a second batch while the first copy, which ran
when Redis woke, has its reply never read. Its jobs are not tracked, and since
the manager saw no failure it never reconciles: they stay in the backup list
until a node with the same id restarts.

* Redis frozen (SIGSTOP) longer than the node's socket timeout (2 s), then
  thawed, while the node fetches 10 ms jobs;
* the replies of Redis to the node swallowed by a proxy (the commands run)
  longer than the socket timeout, then the link restored.

Either way every job completes, the backup list ends empty, and duplicates
stay within the jobs in flight at the fault.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .faultworkers import ENDS
from .harness import Fleet, Node, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

JOBS = 3000
FREEZE = 6.0
"""Seconds Redis stays stopped: above the 2 s socket timeout, within redis-py's
default retry window (10 retries of a 2 s timeout), where a re-sent fetch lands."""
SWALLOW = 3.0
"""Seconds the proxy swallows Redis's replies: above the 2 s socket timeout."""
SETTLE = 20.0
"""Seconds given to the node to finish every job after the fault."""


def settle(fleet: Fleet, node: Node, tags: list[str]) -> None:
    """Wait (bounded) until every job is done and the backup list is empty; no failure
    here: the accounting that follows says what is missing."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        if fleet.all_done(tags) and fleet.backup_len(node.node_id) == 0:
            return
        time.sleep(0.1)


def check(fleet: Fleet, node: Node, scenario: str, tags: list[str], in_flight: int) -> None:
    """Lost 0, backup list empty, duplicates <= in flight, the node alive and counting right."""
    settle(fleet, node, tags)
    figures = fleet.account(scenario, tags, in_flight,
                            "lost 0, backup empty, dup <= in flight")
    stranded = fleet.backup_len(node.node_id)
    assert node.alive, fleet.logs()
    assert figures.lost == 0, (f"{figures.lost} lost, {stranded} stranded in the backup list: "
                               f"{figures.lost_tags[:10]}\n{fleet.logs()}")
    assert stranded == 0, fleet.logs()
    assert figures.duplicates <= in_flight, figures.duplicated_tags
    assert fleet.stat("processed") == len(fleet.records(ENDS))


def test_fetch_not_resent_when_redis_freezes(fleet: Fleet) -> None:
    # Given a node configured by host and port, busy with a deep queue of 10 ms jobs
    node = fleet.start_node("cr-stop", queues=("q:20",), host_port=True)
    tags = fleet.enqueue(JOBS, sleep=0.01, prefix="stop")
    wait_until(lambda: len(fleet.ended()) >= 300, 20, "300 jobs ended")
    # When Redis stops answering for longer than the node's socket timeout
    process = fleet.server.process
    assert process is not None
    in_flight = fleet.freeze_busy(node)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        node.thaw()
        time.sleep(FREEZE)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    # Then every job completes and nothing is left in the backup list
    check(fleet, node, "Redis frozen 6 s, node by host/port", tags, in_flight)


def test_fetch_not_resent_when_replies_are_lost(fleet: Fleet) -> None:
    # Given a node configured by host and port of a proxy, busy with 10 ms jobs
    proxy = fleet.proxy()
    node = fleet.start_node("cr-swallow", queues=("q:20",), host_port=True,
                            redis_url=fleet.proxied_url(proxy))
    tags = fleet.enqueue(JOBS, sleep=0.01, prefix="swallow")
    wait_until(lambda: len(fleet.ended()) >= 300, 20, "300 jobs ended")
    # When Redis's replies to the node are lost for longer than its socket timeout
    in_flight = fleet.freeze_busy(node)
    proxy.swallow_replies()
    try:
        node.thaw()
        time.sleep(SWALLOW)
    finally:
        proxy.restore()
    # Then every job completes and nothing is left in the backup list
    check(fleet, node, "replies lost 3 s, node by host/port", tags, in_flight)
