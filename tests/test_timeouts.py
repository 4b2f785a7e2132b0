"""Job time limits on a real node and a real Redis.

Issue 12 found no job timeout at all: a hung job held its slot for ever and
``enqueue(..., timeout=3)`` raised ``TypeError``. A limit now comes from the
enqueue option, ``@worker(timeout=)`` or ``Config.job_timeout`` (first found);
a sync job over it gets ``JobTimeout`` raised in its thread after its
``current_job().cancelled`` turned true; it fails with ``error_class``
``JobTimeout`` and follows the retry rule. A job that ignores it is reported.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from exq_fast import Config, Enqueuer, Exq, JobTimeout, current_job
from exq_fast.config import QueueInput
from exq_fast.define import worker
from exq_fast.keys import Keys
from exq_fast.registry import Registry
from tests.conftest import RunProcesses, fast_node, stat, wait_for, zset_jobs

QUEUE = "tq"
ConfigFactory = Callable[..., Config]


def node(make_config: ConfigFactory, workers: Mapping[str, object] | Registry, *,
         queues: Sequence[QueueInput] = (QUEUE,), **overrides: Any) -> Exq:
    """An (unstarted) node consuming ``queues`` with a fast poll and no scheduler."""
    return fast_node(make_config, workers, queues, **overrides)






def spin(seconds: float) -> None:
    """Pure Python busy work (interruptible at any bytecode)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


# -- from the outside --------------------------------------------------------------------


JOBS_PY = '''
import time
from exq_fast import worker

@worker("Ux.Hang", timeout=0.5)
def hang():
    while True:
        time.sleep(0.01)

@worker("Ux.Spin")
def spin():
    while True:
        time.sleep(0.01)
'''


def test_exq_fast_run_times_out_hung_jobs_and_frees_their_slot(
    tmp_path: Path, redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node of concurrency 1, default limit 1 s (--job-timeout), running
    # workers that never return: one with its own limit of 0.5 s
    (tmp_path / "jobs.py").write_text(JOBS_PY)
    env = {**os.environ, "REDIS_URL": redis_url, "EXQ_NAMESPACE": namespace}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exq_fast", "run", "--workers", "jobs.py", "--queue",
         "default:1", "--job-timeout", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        # When jobs of both are enqueued, one with its own limit (enqueue --timeout)
        for extra in (["Ux.Hang"], ["Ux.Spin"], ["Ux.Spin", "[]", "--timeout", "0.2"]):
            subprocess.run([sys.executable, "-m", "exq_fast", "enqueue", "default", *extra],
                           env=env, check=True, capture_output=True)
        # Then all fail as timeouts one after the other (the slot was freed) and wait
        # in the retry set, each after its own limit
        wait_for(lambda: redis_client.zcard(keys.retry) == 3, timeout=20, what="3 retries")
        failed = zset_jobs(redis_client, keys.retry)
        assert {e["error_class"] for e in failed} == {"JobTimeout"}
        assert sorted(e["error_message"] for e in failed) == [
            "job timed out after 0.2 s", "job timed out after 0.5 s", "job timed out after 1 s"]
        assert stat(redis_client, keys, "failed") == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_enqueue_takes_a_timeout_option_written_in_the_payload(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # The TypeError of the issue: enqueue(..., timeout=3)
    with Exq(make_config(queues=[QUEUE])) as exq:
        exq.unsubscribe_all()
        exq.enqueue(QUEUE, "X", [1], timeout=3)
    raw = cast(bytes, redis_client.lindex(keys.queue(QUEUE), 0))
    assert json.loads(raw)["timeout"] == 3.0
    assert raw.index(b'"retry"') < raw.index(b'"timeout"')  # alphabetical, as Exq writes


# -- sync jobs ---------------------------------------------------------------------------


def test_sync_job_over_its_limit_sees_cancelled_first_then_gets_job_timeout(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a job that spins for 30 s and records what it sees when interrupted
    seen: list[Any] = []

    def spinner() -> None:
        job = current_job()
        assert job is not None
        try:
            spin(30)
        except JobTimeout as exc:
            seen.extend([type(exc).__name__, job.cancelled])
            raise
        finally:
            seen.append("cleanup")

    with node(make_config, {"Spin": spinner}) as exq:
        began = time.monotonic()
        jid = exq.enqueue(QUEUE, "Spin", [], timeout=0.3)
        # Then it fails with JobTimeout after about 0.3 s, retried with backoff
        wait_for(lambda: redis_client.zcard(keys.retry) == 1, timeout=5, what="retry entry")
        elapsed = time.monotonic() - began
        [entry] = zset_jobs(redis_client, keys.retry)
        assert (entry["jid"], entry["error_class"]) == (jid, "JobTimeout")
        assert "0.3" in entry["error_message"]
        assert entry["retry_count"] == 1
        assert seen == ["JobTimeout", True, "cleanup"]
        assert 0.25 < elapsed < 5
        assert exq.fetcher.busy() == 0


def test_limit_precedence_payload_then_worker_then_config(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker with its own 5 s limit, on a node whose default is 0.2 s
    reg = Registry()
    ends: dict[str, float] = {}

    @worker("W.Limited", registry=reg, timeout=5)
    def limited(tag: str, seconds: float) -> None:
        try:
            spin(seconds)
        finally:
            ends[tag] = time.monotonic()

    @worker("W.Default", registry=reg)
    def default(tag: str, seconds: float) -> None:
        try:
            spin(seconds)
        finally:
            ends[tag] = time.monotonic()

    with node(make_config, reg, queues=[(QUEUE, 3)], job_timeout=0.2) as exq:
        exq.enqueue(QUEUE, limited, ["worker", 0.6])           # worker's 5 s: completes
        exq.enqueue(QUEUE, limited, ["payload", 30], timeout=0.3)  # payload's 0.3 s wins
        exq.enqueue(QUEUE, default, ["config", 30])            # the config's 0.2 s
        wait_for(lambda: stat(redis_client, keys, "processed") == 1
                 and redis_client.zcard(keys.retry) == 2, timeout=10, what="outcomes")
        failed = {e["args"][0]: e["error_class"] for e in zset_jobs(redis_client, keys.retry)}
        assert failed == {"payload": "JobTimeout", "config": "JobTimeout"}
        assert set(ends) == {"worker", "payload", "config"}


def test_config_job_timeout_from_the_environment() -> None:
    assert Config.from_env({"EXQ_JOB_TIMEOUT": "2.5"}).job_timeout == 2.5
    assert Config.from_env({"EXQ_JOB_TIMEOUT": "none"}).job_timeout is None
    with pytest.raises(ValueError, match="job_timeout"):
        Config(job_timeout=-1)


def test_many_jobs_ending_at_their_limit_never_leak_the_exception(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys,
    caplog: pytest.LogCaptureFixture
) -> None:
    # Given 300 jobs whose run time straddles their 20 ms limit (so the watchdog
    # fires as many of them return)
    def straddle(seconds: float) -> None:
        spin(seconds)

    caplog.set_level(logging.WARNING, logger="exq_fast")
    rng = random.Random(7)
    with node(make_config, {"S": straddle}, queues=[(QUEUE, 20)]) as exq:
        for _ in range(300):
            exq.enqueue(QUEUE, "S", [rng.uniform(0.015, 0.025)], timeout=0.02)
        # Then every job ends as done or as a timeout, all acked, none lost
        wait_for(lambda: stat(redis_client, keys, "processed")
                 + stat(redis_client, keys, "failed") == 300, timeout=60, what="300 ends")
        assert redis_client.zcard(keys.retry) == stat(redis_client, keys, "failed")
        assert {e["error_class"] for e in zset_jobs(redis_client, keys.retry)} <= {"JobTimeout"}
        wait_for(lambda: redis_client.llen(keys.backup(exq.config.node_id, QUEUE)) == 0)
        # and no JobTimeout ever escaped into exq-fast's own code
        assert "internal error" not in caplog.text
        exq.enqueue(QUEUE, "S", [0.0])
        wait_for(lambda: stat(redis_client, keys, "processed")
                 + stat(redis_client, keys, "failed") == 301, what="the node still works")


GUARD_CLOSING = """
import sys

from exq_fast import JobTimeout, worker


def inject(frame, event, arg):
    # The first function the worker calls once the job returned: a JobTimeout
    # lands at its entry, before any try in it, as an asynchronous one may.
    if event == "call" and frame.f_back is not None \\
            and frame.f_back.f_code.co_name == "_perform":
        sys.settrace(None)
        print("injected", file=sys.stderr, flush=True)
        raise JobTimeout(0.02)


@worker("Guard.Job", timeout=30)
def job():
    sys.settrace(inject)  # this worker thread only, from the job's return on
"""


def test_a_timeout_landing_as_the_guard_closes_is_absorbed_not_an_internal_error(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    processes = RunProcesses(tmp_path, "guardjobs", GUARD_CLOSING)
    try:
        processes.start("--redis-url", redis_url, "--namespace", namespace, "--queue", "q:1",
                        "--workers", "guardjobs")
        wait_for(lambda: "consuming" in processes.stderr(), 20, "the node's start",
                 detail=processes.stderr)
        with Enqueuer(Config(redis_url=redis_url, namespace=namespace)) as enqueuer:
            enqueuer.enqueue("q", "Guard.Job", [])
        # Then the job ends like any other (counted, acked), not as an internal error
        wait_for(lambda: stat(redis_client, keys, "processed")
                 + stat(redis_client, keys, "failed") == 1, 15, "the job's end",
                 detail=processes.stderr)
        assert "injected" in processes.stderr()
        assert "internal error" not in processes.stderr()
    finally:
        processes.close()


def test_job_ignoring_its_timeout_keeps_its_slot_and_is_reported(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys,
    caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job in a C call (time.sleep) that outlasts its 0.2 s limit by far
    caplog.set_level(logging.WARNING, logger="exq_fast")
    release = threading.Event()

    def blocked() -> None:
        release.wait(20)  # one C call that returns only when released

    with node(make_config, {"B": blocked}, heartbeat_interval=200,
              metrics_port=0) as exq:
        jid = exq.enqueue(QUEUE, "B", [], timeout=0.2)
        # Then it is reported as stuck: log, metric, node record
        wait_for(lambda: "ignored its timeout" in caplog.text, timeout=10, what="stuck log")
        assert jid in caplog.text
        assert exq.fetcher.busy() == 1  # the slot stays taken
        metrics = _scrape(exq)
        assert "exq_jobs_stuck 1.0" in metrics
        info = wait_for(lambda: _node_info(redis_client, keys, exq).get("stuck") == 1,
                        timeout=5, what="stuck in the node record")
        assert info
        # When it finally returns, it fails as a timeout and is no longer stuck
        release.set()
        wait_for(lambda: redis_client.zcard(keys.retry) == 1, timeout=10, what="retry entry")
        [entry] = zset_jobs(redis_client, keys.retry)
        assert entry["error_class"] == "JobTimeout"
        assert "exq_jobs_stuck 0.0" in _scrape(exq)


def _scrape(exq: Exq) -> str:
    assert exq.metrics_url is not None
    with urllib.request.urlopen(exq.metrics_url, timeout=5) as response:
        return cast(bytes, response.read()).decode()


def _node_info(client: redis.Redis, keys: Keys, exq: Exq) -> dict[str, Any]:
    raw = client.hget(keys.node(exq.config.node_id), "info")
    return cast(dict[str, Any], json.loads(raw)) if raw else {}
