"""Several processes per host, a supervisor, a node gone for good, a forced stop.

Each scenario runs ``exq-fast run`` as a user would (default node ids unless
it says otherwise) against a private redis-server, and injects its fault for
real: SIGKILL, a second SIGINT, a process in another UTS namespace (another
hostname) that dies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exq_fast.connection import text

from .harness import Fleet, wait_until

pytestmark = pytest.mark.fault

FAST_MONITOR = {"EXQ_HEARTBEAT_INTERVAL": "500", "EXQ_MISSED_HEARTBEATS_ALLOWED": "2"}
"""Beat and monitor every 500 ms; a node elsewhere is dead after the 15 s floor."""


def info(fleet: Fleet, node_id: str) -> dict[str, object]:
    """The ``info`` JSON of a registered node."""
    raw = fleet.client.hget(fleet.keys.node(node_id), "info")
    assert raw is not None, f"{node_id} is not registered"
    data: dict[str, object] = json.loads(raw)
    return data


def registered(fleet: Fleet) -> set[str]:
    """The node ids in the process registry."""
    return {text(m) for m in fleet.client.smembers(fleet.keys.processes)}


def stop_pid(pid: int) -> None:
    """SIGSTOP a process and wait until the kernel says it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    stat = Path(f"/proc/{pid}/stat")
    wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"), 10,
               f"pid {pid} stopped")


def test_two_processes_without_node_id_never_share_jobs(fleet: Fleet) -> None:
    # Given two `exq-fast run` on one host with no --node-id, sharing one queue
    first = fleet.start_node("a", queues=("q:10",), explicit_id=False)
    second = fleet.start_node("b", queues=("q:10",), explicit_id=False)
    tags = fleet.enqueue(1500, sleep=0.01, prefix="two")
    # Then each has its own id, and both are listed
    assert len(first.ids) == len(second.ids) == 1 and first.ids != second.ids
    assert registered(fleet) == {*first.ids, *second.ids}
    wait_until(lambda: len(fleet.ended()) >= 300, 20, "300 jobs ended")
    # When the first is killed mid-run and started again (a new default id)
    in_flight = fleet.freeze_busy(first)
    first.kill()
    again = fleet.start_node("a2", queues=("q:10",), explicit_id=False)
    # Then every job completes; only jobs in flight at the kill ran twice
    fleet.wait_done(tags, 40)
    figures = fleet.account("2 processes, default ids, SIGKILL + restart of one", tags,
                            in_flight, "lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags
    assert not second.stderr_text().count("re-enqueued"), "the live node lost nothing"
    # And the dead node was recovered at the restart's start-up and forgotten
    assert "re-enqueued" in again.stderr_text()
    assert registered(fleet) == {*second.ids, *again.ids}
    # When one node is told to stop by its id
    subprocess.run([sys.executable, "-m", "exq_fast", "signal", second.ids[0], "stop", "--yes",
                    "--redis-url", fleet.url, "--namespace", fleet.namespace],
                   check=True, capture_output=True, timeout=30)
    # Then exactly that node stops
    assert second.wait_exit(20) == 0
    assert again.alive
    assert registered(fleet) == set(again.ids)


def child_pid(fleet: Fleet, node_id: str) -> int:
    """The pid of a supervised child, from its process record."""
    pid = info(fleet, node_id)["pid"]
    assert isinstance(pid, int)
    return pid


def test_supervisor_restarts_a_killed_child_and_loses_nothing(fleet: Fleet) -> None:
    # Given `exq-fast run --processes 3` with one /metrics port, busy with 1500 jobs
    supervisor = fleet.start_node("sup", queues=("q:5",), processes=3, metrics=True)
    assert supervisor.ids == ["sup.1", "sup.2", "sup.3"]
    tags = fleet.enqueue(1500, sleep=0.01, prefix="sup")
    wait_until(lambda: len(fleet.ended()) >= 300, 20, "300 jobs ended")
    # And the supervisor's /metrics shows each child, labelled
    nodes = {dict(labels).get("node") for (name, labels) in supervisor.metrics()
             if name == "exq_jobs_processed_total"}
    assert {"sup.1", "sup.2", "sup.3"} <= nodes
    # When one child is killed mid-run
    victim = child_pid(fleet, "sup.2")
    stop_pid(victim)
    fleet.client.ping()
    in_flight = fleet.backup_len("sup.2")
    os.kill(victim, signal.SIGKILL)
    # Then the supervisor restarts it under the same id and every job completes
    wait_until(lambda: "sup.2" in registered(fleet) and child_pid(fleet, "sup.2") != victim,
               30, "sup.2 restarted", detail=fleet.logs)
    fleet.wait_done(tags, 40)
    figures = fleet.account("--processes 3, one child SIGKILLed", tags, in_flight,
                            "restarted; lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags
    assert "sup.2" in supervisor.stderr_text() and "SIGKILL; restarting" in \
        supervisor.stderr_text()
    # When the supervisor gets SIGTERM
    supervisor.terminate()
    # Then every child stops gracefully and the supervisor exits 0
    assert supervisor.wait_exit(20) == 0
    assert registered(fleet) == set()


def test_an_explicit_node_id_in_use_is_refused_until_its_holder_dies(fleet: Fleet) -> None:
    # Given a live node with an explicit id, running jobs
    holder = fleet.start_node("dup", queues=("q:5",))
    tags = fleet.enqueue(200, sleep=0.02, prefix="dup")
    wait_until(lambda: len(fleet.ended()) >= 20, 20, "20 jobs ended")
    # When a second process is started with the same id
    second = fleet.start_node("dup", queues=("q:5",), wait=False)
    # Then it refuses to start, in one line naming the holder, and takes nothing
    assert second.wait_exit(20) == 2
    error = second.stderr_text().strip()
    assert len(error.splitlines()) == 1, error
    assert f"node id 'dup' is in use by pid {holder.pid}" in error
    # When the holder dies, a stale record must not block the restart
    in_flight = fleet.freeze_busy(holder)
    holder.kill()
    fleet.start_node("dup", queues=("q:5",))
    fleet.wait_done(tags, 30)
    figures = fleet.account("explicit id in use refused; restart after SIGKILL", tags,
                            in_flight, "lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= in_flight, figures.duplicated_tags


def elsewhere(hostname: str) -> list[str]:
    """A command prefix that runs the command under another hostname (a UTS namespace):
    to this host's nodes it is a node on another machine."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        message = "needs unshare and root to give a node another hostname"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return [unshare, "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"]


@pytest.mark.slow  # the 15 s window a node elsewhere gets before it is taken for dead
def test_a_node_gone_for_good_elsewhere_is_recovered_within_the_window(fleet: Fleet) -> None:
    # Given a node on "another host", with its heartbeat off, running 10 long jobs
    victim = fleet.start_node("far", queues=("far:10",), prefix=elsewhere("far-host"),
                              extra=("--no-heartbeat",))
    [far_id] = victim.ids
    assert info(fleet, far_id)["hostname"] == "far-host"
    tags = fleet.enqueue(10, queue="far", sleep=60.0, mode="slow_once", prefix="far")
    wait_until(lambda: fleet.backup_len(far_id) == 10, 15, "the 10 jobs fetched")
    # And a node here that does not consume that queue, but monitors
    watcher = fleet.start_node("watch", queues=("other:1",), env=FAST_MONITOR, metrics=True)
    # When the far node dies and never comes back
    victim.kill()
    killed = time.time()
    assert fleet.client.zscore(fleet.keys.heartbeats, far_id) is None, "it never beat"
    # Then the watcher puts its jobs back within the window (15 s) and its tick, not before
    wait_until(lambda: fleet.queue_len("far") == 10, 40, "the far node's jobs back",
               detail=fleet.logs)
    recovered_after = time.time() - killed
    assert fleet.backup_len(far_id) == 0
    # (counted once the recovery call returned: a moment after the queue shows them)
    wait_until(lambda: watcher.metric_sum("exq_jobs_recovered_total", reason="heartbeat")
               == 10, 5, "the recovery counted")
    print(f"[fault]   a dead node elsewhere was recovered {recovered_after:.1f} s after its "
          "death (window 15 s)")
    assert recovered_after < 15 + 10
    # And a node for that queue runs them, each once more
    fleet.start_node("runner", queues=("far:10",))
    fleet.wait_done(tags, 30)
    figures = fleet.account("node elsewhere (heartbeat off) dies for good: monitor", tags, 10,
                            "lost 0, dup <= in flight")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= 10, figures.duplicated_tags


def test_a_second_sigint_stops_at_once_and_puts_the_jobs_back(fleet: Fleet) -> None:
    # Given a node running 4 jobs of 60 s (only their first run is slow), with a long
    # shutdown timeout
    node = fleet.start_node("ctrl-c", queues=("q:4",), shutdown_timeout=60_000)
    tags = fleet.enqueue(4, sleep=60.0, mode="slow_once", prefix="ctrlc")
    wait_until(lambda: len(fleet.records()) >= 4, 15, "4 jobs started")
    # When it gets Ctrl-C, then Ctrl-C again
    node.send(signal.SIGINT)
    wait_until(lambda: "stopping gracefully" in node.stderr_text(), 10, "the graceful stop")
    second = time.monotonic()
    node.send(signal.SIGINT)
    # Then it exits within a second, saying how many jobs it put back
    assert node.wait_exit(5) == 1
    assert time.monotonic() - second < 1.5
    assert "forced stop: 4 job(s) were running; 4 unfinished job(s) put back" in \
        node.stderr_text()
    assert fleet.backup_len("ctrl-c") == 0
    assert fleet.queue_len() == 4
    # And nothing says it still runs them: no process record, no in-progress record
    assert registered(fleet) == set()
    assert not fleet.client.exists(fleet.keys.workers("ctrl-c"), fleet.keys.node("ctrl-c"))
    assert fleet.client.hlen(fleet.keys.recoveries) == 0
    # And a restart runs every job once more
    fleet.start_node("ctrl-c", queues=("q:4",))
    fleet.wait_done(tags, 30)
    figures = fleet.account("second Ctrl-C: forced stop", tags, 4,
                            "exit < 1.5 s, lost 0, dup <= interrupted")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates <= 4, figures.duplicated_tags
