"""``async def`` workers on a real node and a real Redis.

Issue 12 found an ``async def`` worker counted as processed while its body never
ran. Here coroutine workers (functions, and classes whose ``perform`` is
``async def``) run on the node's one event loop, mixed with sync workers in one
queue, and behave as sync ones do: concurrency, failures, retries, the dead
set, snooze, unique locks, cancel, timeouts, graceful stop, ``current_job()``.
The first test runs ``exq-fast run`` as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import redis

from exq_fast import Config, Exq, Snooze, current_job
from exq_fast.config import QueueInput
from exq_fast.keys import Keys
from tests.conftest import fast_node, stat, threads_named, wait_for, zset_jobs

QUEUE = "aq"
ConfigFactory = Callable[..., Config]


def node(make_config: ConfigFactory, workers: Mapping[str, object], *,
         queues: Sequence[QueueInput] = (QUEUE,), **overrides: Any) -> Exq:
    """An (unstarted) node consuming ``queues`` with a fast poll and no scheduler."""
    return fast_node(make_config, workers, queues, **overrides)






# -- from the outside: exq-fast run ----------------------------------------------------


JOBS_PY = '''
import asyncio, os
import redis
from exq_fast import worker, current_job

r = redis.Redis.from_url(os.environ["REDIS_URL"])

@worker("Ux.AsyncJob")
async def async_job(key, value):
    await asyncio.sleep(0.05)
    r.set(key, f"{value}:{current_job().jid}")

class Mailer:
    async def perform(self, key):
        await asyncio.sleep(0.01)
        r.set(key, "class")

worker("Ux.Mailer")(Mailer)
'''


def test_exq_fast_run_runs_the_body_of_async_def_workers(
    tmp_path: Path, redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a jobs file with an async function worker and an async class worker
    (tmp_path / "jobs.py").write_text(JOBS_PY)
    env = {**os.environ, "REDIS_URL": redis_url, "EXQ_NAMESPACE": namespace}
    done_key, class_key = keys.p("test:done"), keys.p("test:class")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exq_fast", "run", "--workers", "jobs.py"], cwd=tmp_path,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # When jobs of both are enqueued from the shell
        for args in ([done_key, "v1"],):
            subprocess.run([sys.executable, "-m", "exq_fast", "enqueue", "default",
                            "Ux.AsyncJob", json.dumps(args)], env=env, check=True,
                           capture_output=True)
        subprocess.run([sys.executable, "-m", "exq_fast", "enqueue", "default", "Ux.Mailer",
                        json.dumps([class_key])], env=env, check=True, capture_output=True)
        # Then their bodies ran (the original bug: counted, never run)
        value = wait_for(lambda: redis_client.get(done_key), what="the async job's write")
        assert value.startswith(b"v1:")  # current_job() worked inside the coroutine
        assert wait_for(lambda: redis_client.get(class_key)) == b"class"
        wait_for(lambda: stat(redis_client, keys, "processed") == 2)
        assert stat(redis_client, keys, "failed") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "never awaited" not in out


# -- in process ------------------------------------------------------------------------


def test_async_and_sync_workers_mix_in_one_queue_with_current_job(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given async and sync workers on one queue
    seen: list[tuple[str, Any, str | None]] = []

    async def coro_job(n: int) -> None:
        await asyncio.sleep(0.01)
        job = current_job()
        seen.append(("async", n, job.jid if job else None))

    def sync_job(n: int) -> None:
        job = current_job()
        seen.append(("sync", n, job.jid if job else None))

    class AsyncClass:
        async def perform(self, n: int) -> None:
            job = current_job()
            seen.append(("class", n, job.jid if job else None))

    with node(make_config, {"A": coro_job, "S": sync_job, "C": AsyncClass}) as exq:
        jids = {}
        for n in range(10):
            for cls in ("A", "S", "C"):
                jids[(cls, n)] = exq.enqueue(QUEUE, cls, [n])
        # When they all run
        wait_for(lambda: stat(redis_client, keys, "processed") == 30, what="30 processed")
        # Then each ran once, saw its own job, and nothing failed
        assert len(seen) == 30
        names = {"A": "async", "S": "sync", "C": "class"}
        assert sorted(seen) == sorted((names[c], n, jid) for (c, n), jid in jids.items())
        assert stat(redis_client, keys, "failed") == 0
    assert current_job() is None


def test_async_jobs_count_in_the_queue_concurrency_and_hold_no_thread(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a queue limited to 5 and 40 async jobs that wait on one gate
    gate = asyncio.Event()
    loops: set[asyncio.AbstractEventLoop] = set()
    running = [0]
    peak = [0]

    async def wait_gate(n: int) -> None:
        loops.add(asyncio.get_running_loop())
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await gate.wait()
        running[0] -= 1

    with node(make_config, {"G": wait_gate}, queues=[(QUEUE, 5)]) as exq:
        for n in range(40):
            exq.enqueue(QUEUE, "G", [n])
        # When the first five run (all on the node's one loop)
        wait_for(lambda: running[0] == 5, what="5 async jobs running")
        time.sleep(0.2)  # a chance for a sixth to start wrongly (checked below)
        # Then no more than 5 run, and they hold no executor thread
        assert running[0] == 5
        assert exq.fetcher.busy() == 5
        busy_threads = [t for t in threading.enumerate() if t.name.startswith("exq-worker")]
        assert all(not _in_job(t) for t in busy_threads)
        [loop] = loops  # one loop, the node's
        loop.call_soon_threadsafe(gate.set)
        wait_for(lambda: stat(redis_client, keys, "processed") == 40, what="40 processed")
        assert peak[0] == 5
        assert len(loops) == 1


def test_a_burst_of_async_jobs_starts_on_a_few_threads_while_sync_jobs_get_their_own(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node with 300 slots, 300 async jobs waiting on a gate and 20 sync ones
    # waiting on another, all in one queue
    gate = asyncio.Event()
    loops: set[asyncio.AbstractEventLoop] = set()
    sync_gate = threading.Event()
    running = [0]
    sync_running = threading.Semaphore(0)

    async def wait_async(n: int) -> None:
        loops.add(asyncio.get_running_loop())
        running[0] += 1
        await gate.wait()

    def wait_sync(n: int) -> None:
        sync_running.release()
        sync_gate.wait(10)

    workers = {"A": wait_async, "S": wait_sync}
    # (threads of earlier tests' nodes may still be alive: count this node's only)
    before = threads_named("exq-starter_") | threads_named("exq-worker_")
    with node(make_config, workers, queues=[(QUEUE, 400)]) as exq:
        exq.enqueue_all([(QUEUE, "A", [n]) for n in range(300)]
                        + [(QUEUE, "S", [n]) for n in range(20)])
        # When they all start
        wait_for(lambda: running[0] == 300, what="300 async jobs running")
        for _ in range(20):
            assert sync_running.acquire(timeout=10), "a sync job did not start"
        # Then the async ones were started by a few threads, not one thread each,
        # while every sync job has a thread of its own
        assert len(threads_named("exq-starter_") - before) <= 4
        assert 20 <= len(threads_named("exq-worker_") - before) <= 40
        [loop] = loops
        loop.call_soon_threadsafe(gate.set)
        sync_gate.set()
        wait_for(lambda: stat(redis_client, keys, "processed") == 320, what="320 processed")


def _in_job(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside a job's code now (its stack shows wait_gate)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "wait_gate":
            return True
        frame = frame.f_back
    return False


def test_async_failures_retry_then_die_like_sync_ones(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given an async worker that raises
    async def boom(n: int) -> None:
        await asyncio.sleep(0)
        raise ValueError(f"boom {n}")

    with node(make_config, {"Boom": boom}) as exq:
        retried = exq.enqueue(QUEUE, "Boom", [1])
        dead = exq.enqueue(QUEUE, "Boom", [2], max_retries=0)
        wait_for(lambda: stat(redis_client, keys, "failed") == 2, what="2 failures")
        wait_for(lambda: redis_client.zcard(keys.retry) == 1 and redis_client.zcard(keys.dead))
        # Then the one with retries left is in the retry set, the other dead
        [retry] = zset_jobs(redis_client, keys.retry)
        [buried] = zset_jobs(redis_client, keys.dead)
        assert (retry["jid"], retry["error_class"], retry["error_message"]) == \
            (retried, "ValueError", "boom 1")
        assert retry["retry_count"] == 1
        assert (buried["jid"], buried["error_class"]) == (dead, "ValueError")
        assert stat(redis_client, keys, "processed") == 0


def test_async_snooze_and_unique_lock(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given an async worker that snoozes, and a unique async job
    async def snoozer() -> Snooze:
        return Snooze(60)

    async def unique(n: int) -> int:
        return n

    with node(make_config, {"Snz": snoozer, "U": unique}) as exq:
        snoozed = exq.enqueue(QUEUE, "Snz", [])
        assert isinstance(exq.enqueue(QUEUE, "U", [1], unique_for=300), str)
        wait_for(lambda: stat(redis_client, keys, "processed") == 2, what="2 processed")
        # Then the snoozed job is back in the retry set, retry_count unchanged
        [entry] = zset_jobs(redis_client, keys.retry)
        assert entry["jid"] == snoozed and entry.get("retry_count") in (None, 0)
        assert "Snoozed" in entry["error_message"]
        # and the unique lock was released at success: the same job enqueues again
        wait_for(lambda: redis_client.keys(keys.p("unique:*")) == [], what="lock released")
        assert isinstance(exq.enqueue(QUEUE, "U", [1], unique_for=300), str)


def test_cancel_cancels_the_async_task_and_the_job_is_dead(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given an async job awaiting for a long time
    started = threading.Event()
    cleaned: list[str] = []

    async def long_wait() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            raise

    with node(make_config, {"L": long_wait}) as exq:
        jid = exq.enqueue(QUEUE, "L", [])
        assert started.wait(10)
        # When a CANCEL signal names it
        redis_client.lpush(keys.signals(exq.config.node_id),
                           "CANCEL:" + json.dumps({"pid": "x", "jid": jid}))
        exq.pinger.run_once()
        # Then its task is cancelled at once and the job is dead with "Canceled"
        wait_for(lambda: redis_client.zcard(keys.dead) == 1, timeout=5, what="dead entry")
        [entry] = zset_jobs(redis_client, keys.dead)
        assert (entry["jid"], entry["error_message"]) == (jid, "Canceled")
        assert cleaned == ["cancelled"]
        assert redis_client.zcard(keys.retry) == 0


def test_async_job_over_its_timeout_fails_with_job_timeout_and_is_retried(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given an async job that would sleep 30 s, with a 0.3 s limit given at enqueue
    async def sleepy() -> None:
        await asyncio.sleep(30)

    with node(make_config, {"Z": sleepy}) as exq:
        began = time.monotonic()
        jid = exq.enqueue(QUEUE, "Z", [], timeout=0.3)
        # Then it fails as a timeout soon after 0.3 s and follows the retry rule
        wait_for(lambda: redis_client.zcard(keys.retry) == 1, timeout=5, what="retry entry")
        assert time.monotonic() - began < 5
        [entry] = zset_jobs(redis_client, keys.retry)
        assert (entry["jid"], entry["error_class"]) == (jid, "JobTimeout")
        assert entry["retry_count"] == 1
        assert entry["timeout"] == 0.3
        assert exq.fetcher.busy() == 0


def test_graceful_stop_waits_for_async_jobs_and_puts_back_the_late_ones(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given two async jobs running at a stop: one ends within the shutdown timeout
    started = threading.Event()
    count = [0]

    async def short() -> None:
        count[0] += 1
        started.set()
        await asyncio.sleep(0.3)

    async def long() -> None:
        count[0] += 1
        await asyncio.sleep(30)

    exq = node(make_config, {"Short": short, "Long": long}, shutdown_timeout=1500).start()
    try:
        exq.enqueue(QUEUE, "Short", [])
        long_jid = exq.enqueue(QUEUE, "Long", [])
        wait_for(lambda: count[0] == 2, what="both running")
    finally:
        # When the node stops
        idle = exq.stop()
    # Then the short one was acked, the long one is back at the front of its queue
    assert not idle
    assert stat(redis_client, keys, "processed") == 1
    queued = cast(list[bytes], redis_client.lrange(keys.queue(QUEUE), 0, -1))
    assert [json.loads(raw)["jid"] for raw in queued] == [long_jid]
    assert redis_client.llen(keys.backup(exq.config.node_id, QUEUE)) == 0
    # and the node's event loop thread is gone
    loop_thread = exq.server.loop._thread
    assert loop_thread is not None and not loop_thread.is_alive()
