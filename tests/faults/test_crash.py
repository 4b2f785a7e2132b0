"""SIGKILL: restart with the same node id, recovery by a live node's heartbeat
monitor, a kill between a job's end and its ack, and a poison job."""

from __future__ import annotations

import pytest

from .faultworkers import STARTS
from .harness import Fleet, Node, wait_until

pytestmark = pytest.mark.fault

HEARTBEAT = {"EXQ_HEARTBEAT_ENABLE": "true", "EXQ_HEARTBEAT_INTERVAL": "500",
             "EXQ_MISSED_HEARTBEATS_ALLOWED": "2"}
"""A node is dead after 3 missed beats of 500 ms (1.5 s)."""


def test_sigkill_mid_run_then_restart_with_same_node_id(fleet: Fleet) -> None:
    # Given a node busy with 1500 jobs of 10 ms, 20 at a time
    node = fleet.start_node("kill", queues=("q:20",))
    tags = fleet.enqueue(1500, sleep=0.01, prefix="kill")
    wait_until(lambda: len(fleet.ended()) >= 300, 20, "300 jobs ended")
    # When it is killed mid-run
    in_flight = fleet.freeze_busy(node)
    assert node.kill() == -9
    # Then a restart with the same node id re-runs what it had fetched, and the rest
    fleet.start_node("kill", queues=("q:20",))
    fleet.wait_done(tags, 40)
    figures = fleet.account("SIGKILL mid-run, restart same node id", tags, in_flight,
                            "lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags


def test_heartbeat_monitor_recovers_a_dead_node_and_spares_a_live_one(fleet: Fleet) -> None:
    # Given a live node running 4 jobs of 5 s on its own queue
    live = fleet.start_node("hb-live", queues=("long:4",), env=HEARTBEAT, metrics=True)
    live_tags = fleet.enqueue(4, queue="long", sleep=5.0, prefix="live")
    wait_until(lambda: fleet.recorder.llen(STARTS) >= 4, 15, "the live node's jobs started")
    # And a victim and a monitor sharing 1500 jobs of 10 ms, all three beating every 500 ms
    victim = fleet.start_node("hb-dead", queues=("q:20",), env=HEARTBEAT)
    monitor = fleet.start_node("hb-monitor", queues=("q:20",), env=HEARTBEAT, metrics=True)
    tags = fleet.enqueue(1500, sleep=0.01, prefix="hb")
    wait_until(lambda: len(fleet.ended()) >= 200, 20, "200 jobs ended")
    # When the victim is killed and never restarted
    in_flight = fleet.freeze_busy(victim)
    victim.kill()
    # Then a surviving node (either one: both run the monitor) re-enqueues exactly the
    # victim's backup while the live node's jobs still run
    def recovered() -> float:
        return sum(node.metric_sum("exq_jobs_recovered_total", reason="heartbeat")
                   for node in (live, monitor))

    wait_until(recovered, 15, "a surviving node recovered the dead node's backup",
               detail=fleet.logs)
    assert recovered() == in_flight
    assert fleet.backup_len("hb-dead") == 0
    assert fleet.backup_len("hb-live") == 4
    assert not (fleet.ended() & set(live_tags)), "the live jobs were still running"
    fleet.wait_done(tags, 40)
    figures = fleet.account("SIGKILL, no restart: heartbeat monitor recovers", tags, in_flight,
                            "lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags
    # And the live node's jobs were never taken: each ran exactly once, on it
    fleet.wait_done(live_tags, 15)
    live_figures = fleet.account("live node beside the dead one (its own jobs)", live_tags, 4,
                                 "never recovered: dup 0")
    assert (live_figures.lost, live_figures.duplicates) == (0, 0)
    assert {r["node"] for r in fleet.records() if r["tag"] in live_tags} == {"hb-live"}
    for survivor in (live, monitor):
        assert "dead node 'hb-live'" not in survivor.stderr_text()
    assert live.alive


def test_kill_between_job_end_and_ack_reruns_the_job_once(fleet: Fleet) -> None:
    # Given a node that flushes acks only every 5 s
    node = fleet.start_node("ack", queues=("q:5",), env={"EXQ_STATS_FLUSH_INTERVAL": "5000"})
    # When a job ends and its process is killed 0.1 s later, before the ack is flushed
    [tag] = fleet.enqueue(1, sleep=0.05, mode="exit_after", prefix="ack")
    assert node.wait_exit(10) == -9
    assert tag in fleet.ended()
    in_flight = fleet.backup_len("ack")
    assert in_flight == 1, "the job is still in the backup list: not acked"
    assert fleet.stat("processed") == 0
    # Then a restart with the same node id runs it again, exactly once more
    fleet.start_node("ack", queues=("q:5",))
    fleet.wait_done([tag], 15)
    figures = fleet.account("kill between job end and ack", [tag], in_flight,
                            "the job re-runs exactly once (dup == 1)")
    assert figures.lost == 0
    assert figures.duplicates == 1
    assert fleet.stat("processed") == 1



def supervise(fleet: Fleet, node_id: str, poison: str, *,
              max_restarts: int) -> tuple[int, int, Node]:
    """Run ``node_id``, restarting it whenever it dies, until no job is pending and
    ``poison`` is in the dead set. Returns (deaths, jobs in its backup lists at its
    deaths, summed, the last node)."""
    deaths = in_flight = 0
    node = fleet.start_node(node_id, queues=("q:5",), wait=False)
    while True:
        def settled(current: Node = node) -> bool:
            return not current.alive or (not fleet.pending_jids() and poison in fleet.dead())

        wait_until(settled, 30, f"{node_id} died or every job settled",
                   detail=fleet.logs)
        if node.alive:
            return deaths, in_flight, node
        deaths += 1
        in_flight += fleet.backup_len(node_id)
        assert deaths <= max_restarts, f"still dying after {max_restarts} restarts\n{fleet.logs()}"
        node = fleet.start_node(node_id, queues=("q:5",), wait=False)


def test_poison_job_goes_dead_after_three_recoveries(fleet: Fleet) -> None:
    # Given a job that kills its process after 0.3 s of work, queued before 200 good jobs
    [poison] = fleet.enqueue(1, sleep=0.3, mode="exit", prefix="poison")
    tags = fleet.enqueue(200, sleep=0.01, prefix="good")
    # When its node is restarted every time it dies (at most 6 times)
    deaths, in_flight, node = supervise(fleet, "poisoned", poison, max_restarts=6)
    # Then it died 3 times, the job is dead as JobCrashedWorker, and the node lives on
    assert deaths == 3
    assert fleet.executions(poison) == 3
    assert fleet.dead()[poison]["error_class"] == "JobCrashedWorker"
    assert node.alive
    # And every other job completed
    figures = fleet.account("poison job (dies after 0.3 s), supervisor restarts",
                            [*tags, poison], in_flight, "poison dead after 3 recoveries; "
                            "others lost 0, dup <= in flight", dead_ok=[poison])
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags


def test_poison_job_that_dies_at_once_spares_the_jobs_fetched_with_it(fleet: Fleet) -> None:
    # Given a job that kills its process as soon as it starts, queued before 200 good jobs
    [poison] = fleet.enqueue(1, sleep=0.0, mode="exit", prefix="instant")
    tags = fleet.enqueue(200, sleep=0.05, prefix="bystander")
    # When its node is restarted every time it dies
    deaths, in_flight, _ = supervise(fleet, "poisoned-at-once", poison, max_restarts=6)
    # Then only the poison job is dead; every job fetched beside it still runs
    figures = fleet.account("poison job (dies at once), supervisor restarts", [*tags, poison],
                            in_flight, "only the poison job dead; others lost 0",
                            dead_ok=[poison])
    assert deaths == 3
    assert figures.lost == 0, {t: fleet.dead().get(t, {}).get("error_class")
                               for t in figures.lost_tags}
