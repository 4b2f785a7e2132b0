"""Several processes running the scheduler at once; a mixed fleet of producers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import fixture_lines

from .harness import Fleet, wait_until

pytestmark = pytest.mark.fault

FIXTURE_FILES = ("exq-0.23.0/enqueued.jsonl", "sidekiq-6.4.1/enqueued.jsonl")
COPIES = 10
"""Copies of each fixture payload (each with its own jid, every other byte unchanged)."""


def test_three_schedulers_enqueue_each_due_job_once(fleet: Fleet) -> None:
    # Given three nodes polling the schedule every 20 ms
    env = {"EXQ_SCHEDULER_POLL_TIMEOUT": "20"}
    for n in range(3):
        fleet.start_node(f"sched-{n}", queues=("q:20",), env=env)
    # When 500 jobs are scheduled 1 s ahead
    tags = fleet.enqueue(500, prefix="sched", options={"in": 1.0})
    due = {json.loads(member)["jid"]: score for member, score
           in fleet.client.zrange(fleet.keys.schedule, 0, -1, withscores=True)}
    assert len(due) == 500
    # Then each is enqueued and run exactly once, never before it was due
    fleet.wait_done(tags, 30)
    early = {r["tag"]: due[r["tag"]] - r["t"] for r in fleet.records() if r["t"] < due[r["tag"]]}
    assert early == {}, f"jobs started this many seconds before they were due: {early}"
    figures = fleet.account("3 schedulers, 500 jobs due at once", tags, 0,
                            "each run exactly once (dup 0)")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates == 0, figures.duplicated_tags
    nodes = {r["node"] for r in fleet.records()}
    print(f"[fault]   the due jobs ran on {sorted(nodes)}")


def fixture_payloads() -> list[bytes]:
    """Every Exq 0.23.0 and Sidekiq 6.4.1 enqueued payload, ``COPIES`` times, jid renamed."""
    payloads: list[bytes] = []
    for relpath in FIXTURE_FILES:
        for line in fixture_lines(relpath):
            jid = json.loads(line)["jid"].encode()
            assert line.count(b'"' + jid + b'"') == 1, "the jid appears once in the payload"
            payloads += [line.replace(b'"' + jid + b'"', b'"' + jid + b"-%d" % i + b'"')
                         for i in range(COPIES)]
    return payloads


def test_mixed_fleet_survives_sigkill_and_restart(fleet: Fleet) -> None:
    # Given a queue mixing Fault.Record jobs with raw Exq and Sidekiq payloads
    first = fleet.enqueue(500, sleep=0.01, prefix="mixed-a")
    payloads = fixture_payloads()
    fleet.push_raw("q", payloads)
    foreign = [json.loads(raw)["jid"] for raw in payloads]
    second = fleet.enqueue(500, sleep=0.01, prefix="mixed-b")
    tags = first + foreign + second
    # When the node is killed mid-run and restarted with the same node id
    node = fleet.start_node("mixed", queues=("q:20",))
    wait_until(lambda: len(fleet.ended()) >= 400, 20, "400 jobs ended")
    in_flight = fleet.freeze_busy(node)
    node.kill()
    fleet.start_node("mixed", queues=("q:20",))
    # Then every job of every producer completed
    fleet.wait_done(tags, 40)
    figures = fleet.account(f"mixed fleet (Exq + Sidekiq payloads x{COPIES}), SIGKILL + "
                            "restart", tags, in_flight, "lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags
    assert fleet.dead() == {}
