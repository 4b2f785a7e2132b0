"""Unacked work is bounded: a node whose acks cannot be written stops fetching.

Redis at ``maxmemory`` with ``noeviction`` refuses the stats batches that carry
the acks (their first write grows memory), yet the fetch script still runs (its
first write, the ``RPOP``, frees memory, and a script that has written may go
on). Without a bound every job fetched in the spell would pile up in the
node's backup list and run again after a crash. With it the node stops
fetching once ``stats_batch_size`` finished jobs wait for their ack, so its
backup lists never hold more than ``stats_batch_size`` + its concurrency jobs:
that is also the most a crash can re-run.

The batch size is lowered to 200 here so the bound is reached within a
fraction of a second of the spell; the job records go to a second server.
"""

from __future__ import annotations

import time

import pytest

from .conftest import MakeFleet
from .harness import Fleet, Node, wait_until
from .test_memory import fill_memory, flush_errors, free_memory

pytestmark = pytest.mark.fault

BATCH = 200
"""``stats_batch_size`` of the nodes: the finished jobs that may wait for their ack."""
CONCURRENCY = 20
BOUND = BATCH + CONCURRENCY
"""The most jobs the node may hold fetched and unacked (its backup list's length)."""
LIMIT = "20mb"
NOEVICTION = ("--maxmemory", LIMIT, "--maxmemory-policy", "noeviction")
ENV = {"EXQ_STATS_BATCH_SIZE": str(BATCH)}
JOBS = 3000
"""The backlog: far more than the bound, so the queue is never empty during a spell."""
SLEEP = 0.02
"""Each job's duration: longer than a flush, so every batch starts with an in-progress
record (an ``HSET`` that grows memory, refused at maxmemory)."""
PAUSED = "fetching paused"
RESUMED = "fetching resumed"


def sample_backup(fleet: Fleet, node_id: str, seconds: float) -> int:
    """The longest the node's backup lists were, sampled every 20 ms for ``seconds``."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, fleet.backup_len(node_id))
        time.sleep(0.02)
    return peak


def count_lines(node: Node, needle: str) -> int:
    """Lines of ``node``'s log that contain ``needle``."""
    return sum(1 for line in node.stderr_text().splitlines() if needle in line)


def start(fleet: Fleet, node_id: str, **options: object) -> Node:
    return fleet.start_node(node_id, queues=(f"q:{CONCURRENCY}",), env=ENV, metrics=True,
                            **options)  # type: ignore[arg-type]


def test_a_node_whose_acks_are_refused_stops_fetching_at_the_bound(
        make_fleet: MakeFleet) -> None:
    fleet = make_fleet(extra_args=NOEVICTION, separate_recorder=True)
    # Given a node running jobs of 20 ms (concurrency 20, batches of 200) with a backlog of
    # 3000 jobs in its queue
    node = start(fleet, "bound")
    tags = fleet.enqueue(JOBS, sleep=SLEEP, prefix="bound")
    wait_until(lambda: len(fleet.ended()) >= 100, 20, "100 jobs ended", detail=fleet.logs)
    assert node.metric_sum("exq_fetch_paused") == 0
    # When Redis stays at maxmemory for 5 s: every ack batch is refused
    fill_memory(fleet)
    wait_until(lambda: flush_errors(node) > 0, 10, "an ack batch was refused",
               detail=fleet.logs)
    peak = sample_backup(fleet, "bound", 5.0)
    paused, pauses = node.metric_sum("exq_fetch_paused"), node.metric_sum("exq_fetch_pauses_total")
    queued = fleet.queue_len()
    # Then the node's backup list never held more than the bound, though jobs were waiting
    print(f"[fault]   backup peak during the spell: {peak} (bound {BOUND}), "
          f"queued {queued}, paused={paused}, pauses={pauses}")
    assert peak <= BOUND, f"{peak} jobs fetched and unacked (bound {BOUND})"
    assert queued > 0, "the queue was not empty: the bound stopped the fetching"
    # And the pause shows in the metrics and in one log line
    assert paused == 1
    assert pauses >= 1
    assert count_lines(node, PAUSED) == pauses
    assert count_lines(node, RESUMED) == pauses - 1
    # And once memory is freed the node resumes (one line) and every job completes once
    free_memory(fleet, LIMIT)
    fleet.wait_done(tags, 30, detail=fleet.logs())
    figures = fleet.account(f"acks refused (maxmemory) 5 s: backup <= {BOUND}", tags, peak,
                            f"backup <= batch + concurrency ({BOUND}), lost 0, dup 0")
    assert (figures.lost, figures.duplicates) == (0, 0), figures.lost_tags
    assert node.metric_sum("exq_fetch_paused") == 0
    assert count_lines(node, RESUMED) == count_lines(node, PAUSED)
    assert node.alive


def test_a_crash_during_the_spell_re_runs_at_most_the_bound(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(extra_args=NOEVICTION, separate_recorder=True)
    # Given a node running jobs of 20 ms with a backlog of 3000 jobs, and Redis at
    # maxmemory: every ack batch refused
    node = start(fleet, "bound-kill")
    tags = fleet.enqueue(JOBS, sleep=SLEEP, prefix="bound-kill")
    wait_until(lambda: len(fleet.ended()) >= 100, 20, "100 jobs ended", detail=fleet.logs)
    fill_memory(fleet)
    wait_until(lambda: flush_errors(node) > 0, 10, "an ack batch was refused",
               detail=fleet.logs)
    peak = sample_backup(fleet, "bound-kill", 3.0)
    # When the node is killed 3 s into the spell (a restart is refused while Redis is
    # full: claiming the node id is a write), and restarted once memory is freed
    node.kill()
    in_flight = fleet.backup_len("bound-kill")
    print(f"[fault]   backup peak before the kill: {peak}, at the kill: {in_flight}")
    free_memory(fleet, LIMIT)
    start(fleet, "bound-kill")
    # Then every job completes, and what ran twice is at most what the killed node held:
    # the bound (batch + concurrency)
    fleet.wait_done(tags, 30, detail=fleet.logs())
    figures = fleet.account(f"SIGKILL 3 s into an OOM spell, restart: dup <= {BOUND}", tags,
                            in_flight, f"lost 0, dup <= in flight <= batch + concurrency "
                            f"({BOUND})")
    assert figures.lost == 0, figures.lost_tags
    assert peak <= BOUND and in_flight <= BOUND, (peak, in_flight)
    assert figures.duplicates <= in_flight
