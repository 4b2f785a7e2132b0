"""SIGTERM: a graceful stop while idle, while running short jobs, while running long ones."""

from __future__ import annotations

import signal

import pytest

from .faultworkers import STARTS
from .harness import Fleet, wait_until

pytestmark = pytest.mark.fault


def node_keys(fleet: Fleet, node_id: str) -> list[str]:
    """Every key of the namespace that names ``node_id``."""
    return sorted(key.decode() for key in fleet.client.scan_iter(match="*", count=1000)
                  if node_id in key.decode())


def test_sigterm_while_idle_exits_zero_and_unregisters(fleet: Fleet) -> None:
    # Given a node that ran a few jobs and is now idle
    node = fleet.start_node("idle")
    tags = fleet.enqueue(20, prefix="idle")
    fleet.wait_done(tags, 15)
    assert fleet.backup_len("idle") == 0
    # When it gets SIGTERM
    node.terminate()
    # Then it exits 0 and leaves no key of its own behind
    assert node.wait_exit(15) == 0
    assert node_keys(fleet, "idle") == []
    assert not fleet.client.sismember(fleet.keys.processes, "idle")
    figures = fleet.account("SIGTERM while idle", tags, 0, "exit 0, node keys gone, dup 0")
    assert (figures.lost, figures.duplicates) == (0, 0)


def test_sigterm_while_running_short_jobs_finishes_them(fleet: Fleet) -> None:
    # Given a node busy with 1000 jobs of 20 ms, 20 at a time
    node = fleet.start_node("short", queues=("q:20",))
    tags = fleet.enqueue(1000, sleep=0.02, prefix="short")
    wait_until(lambda: len(fleet.ended()) >= 200, 20, "200 jobs ended")
    # When it gets SIGTERM mid-run (frozen first so the in-flight count is exact)
    in_flight = fleet.freeze_busy(node)
    node.send(signal.SIGTERM)
    node.thaw()
    # Then it exits 0 with every job it had fetched finished and acked
    assert node.wait_exit(15) == 0
    assert fleet.backup_len("short") == 0
    assert fleet.queue_len() > 0, "the stop came before the queue was drained"
    # And a restart with the same node id runs the rest, each job exactly once
    fleet.start_node("short", queues=("q:20",))
    fleet.wait_done(tags, 30)
    figures = fleet.account("SIGTERM while running 20 ms jobs", tags, in_flight,
                            "lost 0, dup 0")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates == 0, figures.duplicated_tags
    assert fleet.stat("processed") == len(tags)


def test_sigterm_with_jobs_longer_than_shutdown_timeout(fleet: Fleet) -> None:
    # Given a node running 4 jobs of 1.5 s with 4 more queued, and a 300 ms shutdown timeout
    node = fleet.start_node("long", queues=("q:4",), shutdown_timeout=300)
    tags = fleet.enqueue(8, sleep=1.5, prefix="long")
    wait_until(lambda: fleet.recorder.llen(STARTS) >= 4, 15, "4 jobs started")
    node.freeze(fleet.client)
    interrupted = fleet.backup_len("long")
    started = {r["tag"] for r in fleet.records()}
    # When it gets SIGTERM
    node.send(signal.SIGTERM)
    node.thaw()
    # Then it exits 0 after the timeout, its unfinished jobs put back at the front of the
    # queue, uncounted (a stop is no crash: no recovery count, no suspect)
    assert node.wait_exit(10) == 0
    assert interrupted == 4
    assert fleet.backup_len("long") == 0
    assert fleet.queue_len() == 8
    assert not (fleet.ended() & started), "no job could finish within 300 ms"
    assert fleet.client.hlen(fleet.keys.recoveries) == 0
    assert fleet.client.zcard(fleet.keys.suspects) == 0
    assert "4 job(s) still running after the shutdown timeout" in node.stderr_text()
    # And a restart with the same node id runs them again, and the rest once
    fleet.start_node("long", queues=("q:4",), shutdown_timeout=300)
    fleet.wait_done(tags, 30)
    figures = fleet.account("SIGTERM, jobs longer than shutdown timeout", tags, interrupted,
                            "lost 0, dup <= interrupted")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= interrupted
    assert set(figures.duplicated_tags) <= started


@pytest.mark.slow  # three deploys of 10 s jobs: about 20 s
def test_three_deploys_never_bury_a_healthy_job(fleet: Fleet) -> None:
    # Given 20 healthy jobs of 10 s, and a node with a 2 s shutdown timeout
    tags = fleet.enqueue(20, sleep=10.0, prefix="deploy")
    for deploy in range(1, 4):
        # When the node starts, runs all 20 at once, and a deploy stops it (SIGTERM)
        node = fleet.start_node("n8", queues=("q:20",), shutdown_timeout=2000)
        wait_until(lambda deploy=deploy: len(fleet.records()) >= 20 * deploy, 15,
                   f"deploy {deploy}: all 20 jobs started at once", detail=fleet.logs)
        node.terminate()
        assert node.wait_exit(15) == 0
        # Then each stop put the 20 jobs back, counted as no crash: no suspect, no
        # recovery count, nothing dead, and the log counts the jobs that really ran
        assert fleet.backup_len("n8") == 0
        assert fleet.queue_len() == 20
        assert fleet.client.zcard(fleet.keys.suspects) == 0
        assert fleet.client.hlen(fleet.keys.recoveries) == 0
        assert fleet.dead() == {}
        assert "20 job(s) still running after the shutdown timeout" in node.stderr_text()
        assert "20 unfinished job(s) put back" in node.stderr_text()
    # And after the third deploy the jobs run to the end, 20 at once
    fleet.start_node("n8", queues=("q:20",), shutdown_timeout=2000)
    fleet.wait_done(tags, 30)
    figures = fleet.account("3 deploys (SIGTERM) of 20 jobs of 10 s, 2 s shutdown timeout",
                            tags, 60, "20 interrupted per stop; none buried; lost 0")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates == 60, "each job ran once per deploy, then to its end"
    assert fleet.dead() == {}
