"""Scheduler: due jobs of ``schedule`` and ``retry`` reach their queues, once, on a real Redis."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from exq_fast.config import Config
from exq_fast.embedded import RedisServer, free_port
from exq_fast.keys import Keys
from exq_fast.scheduler import Scheduler
from exq_fast.store import scheduled
from tests.conftest import fixture_members, wait_for


def job(queue_name: str, n: int) -> bytes:
    """A compact Exq job for ``queue_name``."""
    body = {"args": [n], "class": "W", "jid": f"jid-{n}", "queue": queue_name, "retry": 25}
    return json.dumps(body, separators=(",", ":")).encode()


def queued(client: redis.Redis, keys: Keys, queue_name: str) -> list[bytes]:
    """A queue's members in enqueue order (LRANGE reversed: LPUSH puts new ones left)."""
    return list(reversed(cast(list[bytes], client.lrange(keys.queue(queue_name), 0, -1))))


def quick_client(url: str) -> redis.Redis:
    """A client that fails fast when the server is gone (no retry back-off of its own)."""
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1,
                                retry=Retry(NoBackoff(), 0))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "exq_fast" and r.levelno == logging.WARNING]


@pytest.fixture
def scheduler(redis_client: redis.Redis, keys: Keys, config: Config) -> Iterator[Scheduler]:
    sched = Scheduler(redis_client, keys, config)
    yield sched
    sched.stop(5)


def test_due_scheduled_and_retry_jobs_move_to_their_own_queues_in_due_order(
    scheduler: Scheduler, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given three scheduled jobs for "a" and two retries for "b", all due
    now = time.time()
    redis_client.zadd(keys.schedule, {job("a", 2): now - 20, job("a", 3): now - 10,
                                      job("a", 1): now - 30})
    redis_client.zadd(keys.retry, {job("b", 5): now - 1, job("b", 4): now - 2})
    # When the scheduler ticks
    moved = scheduler.run_once()
    # Then each job is in its own queue, earliest due first, and the zsets are empty
    assert moved == 5
    assert queued(redis_client, keys, "a") == [job("a", 1), job("a", 2), job("a", 3)]
    assert queued(redis_client, keys, "b") == [job("b", 4), job("b", 5)]
    assert redis_client.zcard(keys.schedule) == 0
    assert redis_client.zcard(keys.retry) == 0
    assert redis_client.smembers(keys.queues) == {b"a", b"b"}


def test_jobs_not_yet_due_stay_where_they_are(
    scheduler: Scheduler, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given one job due in an hour in each zset, and one due now
    later = time.time() + 3600
    redis_client.zadd(keys.schedule, {job("a", 1): later, job("a", 2): 0})
    redis_client.zadd(keys.retry, {job("a", 3): later})
    # When the scheduler ticks
    moved = scheduler.run_once()
    # Then only the due one moved
    assert moved == 1
    assert queued(redis_client, keys, "a") == [job("a", 2)]
    assert redis_client.zrange(keys.schedule, 0, -1) == [job("a", 1)]
    assert redis_client.zrange(keys.retry, 0, -1) == [job("a", 3)]


def test_more_than_one_page_moves_in_one_tick(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given 35 due jobs and a page size of 10
    redis_client.zadd(keys.schedule, {job("a", n): n for n in range(35)})
    sched = Scheduler(redis_client, keys, make_config(scheduler_page_size=10))
    # When the scheduler ticks once
    moved = sched.run_once()
    # Then all 35 are queued, in due order
    assert moved == 35
    assert queued(redis_client, keys, "a") == [job("a", n) for n in range(35)]
    assert redis_client.zcard(keys.schedule) == 0


def test_exq_retry_members_are_moved_byte_for_byte(
    scheduler: Scheduler, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.23.0's own retry entries, made due now (as the fixture capture did)
    members = [member for member, _score in fixture_members("exq-0.23.0/retry.jsonl")]
    redis_client.zadd(keys.retry, dict.fromkeys(members, 0))
    # When the scheduler ticks
    scheduler.run_once()
    # Then the queue named in them holds exactly those bytes (same score: member order)
    assert queued(redis_client, keys, "fxq") == sorted(members)
    assert redis_client.smembers(keys.queues) == {b"fxq"}


def test_a_member_that_is_not_a_job_goes_to_default_and_blocks_nothing(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given two unreadable members due first, then five good jobs, with a page of 2
    bad = [b"not json {", b'{"queue":5}']
    redis_client.zadd(keys.schedule, {bad[0]: 0, bad[1]: 0})
    redis_client.zadd(keys.schedule, {job("a", n): n + 1 for n in range(5)})
    sched = Scheduler(redis_client, keys, make_config(scheduler_page_size=2))
    # When the scheduler ticks
    moved = sched.run_once()
    # Then the bad ones wait in "default" (where a worker sends them to dead) and the
    # good ones are in their queue
    assert moved == 7
    assert sorted(queued(redis_client, keys, "default")) == sorted(bad)
    assert queued(redis_client, keys, "a") == [job("a", n) for n in range(5)]


def test_several_schedulers_at_once_enqueue_each_job_exactly_once(
    redis_url: str, keys: Keys, make_config: Callable[..., Config], redis_client: redis.Redis
) -> None:
    # Given four schedulers running in threads, each with its own connection
    config = make_config(scheduler_poll_timeout=2, scheduler_page_size=10)
    clients = [redis.Redis.from_url(redis_url) for _ in range(4)]
    failures: list[str] = []
    schedulers = [Scheduler(c, keys, config, on_error=lambda op, _exc: failures.append(op))
                  for c in clients]
    for sched in schedulers:
        sched.start()
    try:
        # When 500 due jobs arrive in batches while they run (schedule and retry)
        expected = [job("c", n) for n in range(500)]
        for start in range(0, 500, 50):
            zset = keys.schedule if start % 100 == 0 else keys.retry
            redis_client.zadd(zset, {member: 0 for member in expected[start:start + 50]})
        wait_for(lambda: redis_client.llen(keys.queue("c")) >= 500, what="500 jobs queued")
        wait_for(lambda: redis_client.zcard(keys.schedule) + redis_client.zcard(keys.retry) == 0)
    finally:
        assert all(sched.stop(5) for sched in schedulers)
        for client in clients:
            client.close()
    # Then the queue holds each job exactly once
    members = redis_client.lrange(keys.queue("c"), 0, -1)
    assert len(members) == 500
    assert sorted(members) == sorted(expected)
    assert failures == []


def test_the_thread_survives_a_redis_outage_and_resumes(
    private_redis: RedisServer, make_config: Callable[..., Config],
    caplog: pytest.LogCaptureFixture
) -> None:
    # Given a scheduler thread on a private Redis, moving jobs
    caplog.set_level(logging.WARNING, logger="exq_fast")
    keys = Keys("exq")
    client = quick_client(private_redis.url)
    operations: list[str] = []
    sched = Scheduler(client, keys, make_config(namespace="exq", scheduler_poll_timeout=20),
                      on_error=lambda op, _exc: operations.append(op))
    sched.start()
    try:
        client.zadd(keys.schedule, {job("q", 1): 0})
        wait_for(lambda: client.llen(keys.queue("q")) == 1, what="first job moved")
        # When Redis dies for a while, then comes back (empty) on the same port
        private_redis.kill()
        wait_for(lambda: len(operations) >= 2, what="failed ticks")
        assert sched.running
        private_redis.start()
        # Then the scheduler moves a job added after the restart
        client.zadd(keys.schedule, {job("q", 2): 0})
        wait_for(lambda: client.lrange(keys.queue("q"), 0, -1) == [job("q", 2)],
                 timeout=20, what="job moved after restart")
        assert sched.running
    finally:
        assert sched.stop(5)
        client.close()
    # And the outage was logged once (failure, recovery), every error was reported
    messages = [r.getMessage() for r in warnings_of(caplog)]
    assert len(messages) == 2, messages
    assert "retrying" in messages[0]
    assert "reachable again" in messages[1]
    assert operations and set(operations) == {"scheduler"}


def test_outage_logged_once_counted_every_time_and_recovery_logged(
    redis_client: redis.Redis, keys: Keys, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a scheduler whose Redis does not answer
    caplog.set_level(logging.WARNING, logger="exq_fast")
    seen: list[tuple[str, BaseException]] = []
    dead = quick_client(f"redis://127.0.0.1:{free_port()}/0")
    sched = Scheduler(dead, keys, config, on_error=lambda op, exc: seen.append((op, exc)))
    # When three ticks fail
    delays = [sched.tick() for _ in range(3)]
    # Then each is counted and reported, one warning is logged, and the waits grow
    assert [op for op, _ in seen] == ["scheduler"] * 3
    assert all(isinstance(exc, redis.exceptions.ConnectionError) for _, exc in seen)
    assert len(warnings_of(caplog)) == 1
    assert delays == [0.4, 0.8, 1.6]
    # When Redis answers again
    sched.client = redis_client
    delay = sched.tick()
    # Then the recovery is logged once and the normal interval is back
    assert delay == pytest.approx(0.2)
    assert len(warnings_of(caplog)) == 2
    assert sched.tick() == pytest.approx(0.2)
    assert len(warnings_of(caplog)) == 2
    assert len(seen) == 3
    dead.close()


def test_backoff_doubles_and_is_capped(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given the default 200 ms poll, and a 2 s poll
    fast = Scheduler(redis_client, keys, make_config())
    slow = Scheduler(redis_client, keys, make_config(scheduler_poll_timeout=2000))
    # Then the wait doubles up to max(10 intervals, 5 s)
    assert [fast.error_delay(n) for n in (1, 2, 3, 4, 5, 1000)] == [0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert [slow.error_delay(n) for n in (1, 2, 3, 4)] == [4.0, 8.0, 16.0, 20.0]


def test_a_non_redis_error_is_logged_with_traceback_and_the_thread_goes_on(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a scheduler whose first two moves hit a bug
    calls = {"n": 0}
    real_move_due = scheduled.move_due

    def flaky(*args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ValueError("boom")
        return real_move_due(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduled, "move_due", flaky)
    redis_client.zadd(keys.schedule, {job("a", 1): 0})
    failed: list[str] = []
    sched = Scheduler(redis_client, keys, make_config(scheduler_poll_timeout=5),
                      on_error=lambda op, _exc: failed.append(op))
    # When its thread runs
    sched.start()
    try:
        # Then the job still gets moved, and each bug was logged with its traceback
        wait_for(lambda: redis_client.llen(keys.queue("a")) == 1, what="job moved")
        assert sched.running
    finally:
        assert sched.stop(5)
    assert failed == ["scheduler", "scheduler"]
    errors = [r for r in caplog.records if r.name == "exq_fast" and r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in errors)


def test_start_is_idempotent_and_stop_joins_the_named_daemon_thread(
    scheduler: Scheduler
) -> None:
    # When the scheduler is started twice
    scheduler.start()
    scheduler.start()
    # Then one daemon thread named exq-scheduler runs, and stop() ends it
    threads = [t for t in threading.enumerate() if t.name == "exq-scheduler"]
    assert len(threads) == 1
    assert threads[0].daemon
    assert scheduler.stop(5)
    assert not scheduler.running
    assert not threads[0].is_alive()
