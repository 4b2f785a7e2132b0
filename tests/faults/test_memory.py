"""Redis out of memory (``maxmemory`` with ``noeviction``), and an evicting policy.

The job records go to a second private server here: the first one refuses
writes on purpose.
"""

from __future__ import annotations

import pytest
import redis

from .conftest import MakeFleet
from .faultworkers import ENDS
from .harness import Fleet, Node, wait_until

pytestmark = pytest.mark.fault

NOEVICTION = ("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
HEARTBEAT = {"EXQ_HEARTBEAT_ENABLE": "true", "EXQ_HEARTBEAT_INTERVAL": "500",
             "EXQ_MISSED_HEARTBEATS_ALLOWED": "3"}
FILLER = "filler:"
"""Keys (outside the namespace) that push Redis over maxmemory."""


def fill_memory(fleet: Fleet) -> int:
    """Write filler keys until Redis refuses a write with OOM, then keep it full.

    The refusal comes as soon as used memory passes 2 MB, but Redis drops back
    under the limit by itself (a client's 16 KB query buffer freed, a worker's
    acks): as if other producers kept writing, the limit is then lowered to
    256 KB under the memory in use. Returns the filler keys written.
    """
    written = 0
    while True:
        try:
            fleet.client.set(f"{FILLER}{written}", b"x" * 16384)
        except redis.exceptions.ResponseError as exc:
            assert "OOM" in str(exc) or "maxmemory" in str(exc), exc
            break
        written += 1
        assert written < 10_000, "maxmemory never reached"
    used = int(fleet.client.info("memory")["used_memory"])
    fleet.client.config_set("maxmemory", used - 262144)
    return written


def free_memory(fleet: Fleet, limit: str = "2mb") -> None:
    """Delete the filler keys and put the limit back (``limit``: the server's own)."""
    keys = list(fleet.client.scan_iter(match=f"{FILLER}*", count=1000))
    if keys:
        fleet.client.delete(*keys)
    fleet.client.config_set("maxmemory", limit)


def test_out_of_memory_is_counted_and_drops_nothing(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(extra_args=NOEVICTION, separate_recorder=True)
    # Given a node running 400 jobs of 20 ms on a Redis limited to 2 MB
    node = fleet.start_node("oom", queues=("q:10",), env=HEARTBEAT, metrics=True)
    tags = fleet.enqueue(400, sleep=0.02, prefix="oom")
    wait_until(lambda: len(fleet.ended()) >= 50, 20, "50 jobs ended")
    # When Redis runs out of memory (noeviction: every write that grows memory fails)
    in_flight = fleet.backup_len("oom")
    fill_memory(fleet)
    # Then a producer is told (its enqueue raises) rather than silently dropped
    with pytest.raises(redis.exceptions.ResponseError, match=r"OOM|maxmemory"):
        fleet.enqueue(10, prefix="refused")
    # And the node counts the failed writes in exq_redis_errors_total
    wait_until(lambda: node.metric_sum("exq_redis_errors_total") > 0, 15,
               "the node counted Redis errors", detail=fleet.logs)
    wait_until(lambda: flush_errors(node) > 0, 15, "an ack batch was refused",
               detail=fleet.logs)
    errors = {labels: value for (name, labels), value in node.metrics().items()
              if name == "exq_redis_errors_total"}
    print(f"[fault]   redis errors under OOM: {errors}")
    # And once memory is freed every job completes, the refused ones enqueued again
    free_memory(fleet)
    retried = fleet.enqueue(10, prefix="refused")
    fleet.wait_done(tags + retried, 40, detail="jobs after memory was freed")
    figures = fleet.account("Redis at maxmemory (noeviction), then freed", tags + retried,
                            in_flight, "errors counted, lost 0, dup 0")
    assert figures.lost == 0, figures.lost_tags
    assert figures.duplicates == 0, figures.duplicated_tags
    assert node.alive
    assert fleet.stat("processed") == len(fleet.records(ENDS))
    assert "maxmemory-policy" not in node.stderr_text(), "noeviction needs no warning"


def test_job_failing_under_out_of_memory_is_retried_not_lost(make_fleet: MakeFleet) -> None:
    fleet = make_fleet(extra_args=NOEVICTION, separate_recorder=True)
    # Given a node running a job that will fail after 1 s (3 retries allowed), its
    # in-progress record already written
    node = fleet.start_node("oom-fail", queues=("q:5",), metrics=True)
    [tag] = fleet.enqueue(1, sleep=1.0, mode="fail", prefix="oom-fail",
                          options={"max_retries": 3})
    wait_until(lambda: fleet.client.hlen(fleet.keys.workers("oom-fail")) == 1, 15,
               "the job's in-progress record is written")
    # When Redis runs out of memory before the job fails
    fill_memory(fleet)
    wait_until(lambda: tag in fleet.ended(), 15, "the job ended")
    # Then the batch holding its failure is refused: nothing of it reaches Redis
    wait_until(lambda: flush_errors(node) > 0, 15, "the failure's batch was refused",
               detail=fleet.logs)
    assert fleet.stat("failed") == 0
    assert fleet.client.zcard(fleet.keys.retry) == 0
    assert fleet.backup_len("oom-fail") == 1, "unacked while Redis refuses the batch"
    # And once memory is freed the same batch lands whole: retry entry, ack and count
    free_memory(fleet)
    wait_until(lambda: fleet.stat("failed") == 1, 15, "the failure was flushed")
    figures = fleet.account("job failing while Redis is at maxmemory", [tag], 1,
                            "in the retry set, not lost", retry_ok=[tag])
    assert node.alive
    assert fleet.client.zcard(fleet.keys.retry) == 1
    assert fleet.backup_len("oom-fail") == 0
    assert figures.lost == 0


def flush_errors(node: Node) -> float:
    """Stats batches (acks and counts) the node's Redis refused."""
    return node.metric_sum("exq_redis_errors_total", operation="stats_flush")


def test_evicting_policy_logs_a_warning(make_fleet: MakeFleet) -> None:
    # Given a Redis that may evict keys (allkeys-lru)
    fleet = make_fleet(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"))
    # When a node starts against it
    node = fleet.start_node("lru")
    # Then it warns about the policy on stderr, and works
    wait_until(lambda: "maxmemory-policy is allkeys-lru" in node.stderr_text(), 10,
               "the eviction warning is logged", detail=fleet.logs)
    assert "WARNING" in next(line for line in node.stderr_text().splitlines()
                             if "maxmemory-policy" in line)
    tags = fleet.enqueue(20, prefix="lru")
    fleet.wait_done(tags, 15)
    figures = fleet.account("allkeys-lru policy: warning logged", tags, 0,
                            "warning on stderr, lost 0")
    assert (figures.lost, figures.duplicates) == (0, 0)
