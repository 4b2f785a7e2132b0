"""The life of one job in a real in-process ``Exq`` node on a real Redis.

Every test starts a node on its own random namespace (``make_config``), with a
10 ms poll and no scheduler unless it needs one, and always stops it (``with
Exq(...)``). Outcomes are polled with ``wait_for``; what is asserted is what a
user would look at: the queue, backup, retry and dead keys, the stat counters,
the unique locks, and the calls the jobs themselves recorded.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from exq_fast import Config, Enqueuer, Exq, Job, Middleware, Pipeline, Snooze, current_job
from exq_fast.config import QueueInput
from exq_fast.keys import Keys
from exq_fast.middleware import default_chain
from exq_fast.retry import REENCODED_FIELDS
from tests.conftest import fast_node, fixture_lines, stat, wait_for

QUEUE = "wq"
ConfigFactory = Callable[..., Config]

NESTED_ARGS: list[Any] = [
    1,
    "two",
    {"k": "v", "nested": {"list": [1, [2, 3], {"deep": "x"}], "null": None}},
    [1, [2, [3, "deep"]]],
    "h\u00e9llo \u2713 \u65e5\u672c \U0001f600",
    None,
    True,
    False,
    1.5,
    12345678901234,
]


# -- helpers ---------------------------------------------------------------------------



def node(make_config: ConfigFactory, workers: Mapping[str, object], *,
         queues: Sequence[QueueInput] = (QUEUE,), **overrides: Any) -> Exq:
    """An (unstarted) node consuming ``queues`` with a fast poll and no scheduler."""
    return fast_node(make_config, workers, queues, **overrides)




def zentries(client: redis.Redis, key: str) -> list[tuple[dict[str, Any], float]]:
    """The members of a zset, decoded, with their scores."""
    members = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
    return [(json.loads(member), score) for member, score in members]


def one_entry(client: redis.Redis, key: str) -> tuple[dict[str, Any], float]:
    """Wait for the zset ``key`` to hold exactly one member and return it."""
    wait_for(lambda: client.zcard(key) >= 1, what=f"an entry in {key}")
    [entry] = zentries(client, key)
    return entry


def backup(client: redis.Redis, exq: Exq, queue: str = QUEUE) -> list[bytes]:
    """The node's backup list of ``queue`` (jobs fetched and not acked)."""
    return cast(list[bytes], client.lrange(exq.keys.backup(exq.config.node_id, queue), 0, -1))


def first_queued(client: redis.Redis, keys: Keys, queue: str = QUEUE) -> dict[str, Any]:
    """The newest job of ``queue``, decoded."""
    raw = cast(bytes | None, client.lindex(keys.queue(queue), 0))
    assert raw is not None
    decoded: dict[str, Any] = json.loads(raw)
    return decoded


def assert_exq_fields(entry: Mapping[str, Any]) -> None:
    """The 13 fields Exq always writes when it re-encodes a job are present."""
    assert len(REENCODED_FIELDS) == 13
    missing = [name for name in REENCODED_FIELDS if name not in entry]
    assert not missing, f"fields missing from {entry}: {missing}"
    assert isinstance(entry["failed_at"], float)
    assert isinstance(entry["retried_at"], float)


def raw_job(job_class: str, args: list[Any], **fields: Any) -> bytes:
    """A Sidekiq-style job as another producer would LPUSH it."""
    job = {"class": job_class, "args": args, "jid": "raw-" + str(time.time_ns()),
           "queue": QUEUE, "enqueued_at": time.time(), **fields}
    return json.dumps(job).encode()


class Recorder(Middleware):
    """Records ``(name, hook, detail)`` for every hook into a shared list."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]]) -> None:
        self.name = name
        self.log = log

    def before_work(self, pipeline: Pipeline) -> None:
        self.log.append((self.name, "before_work", None))

    def after_processed_work(self, pipeline: Pipeline) -> None:
        self.log.append((self.name, "after_processed_work", pipeline.result))

    def after_failed_work(self, pipeline: Pipeline) -> None:
        self.log.append((self.name, "after_failed_work", pipeline.error))


def chain_with(*extra: Middleware) -> tuple[Middleware, ...]:
    """``extra`` followed by the default chain (the job is decoded before any middleware)."""
    return (*extra, *default_chain())


# -- 1. a successful job ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["function", "class"])
def test_worker_runs_with_exact_args_then_is_acked_and_counted(
    kind: str, make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a registered function worker or class worker that records its args
    calls: list[tuple[Any, ...]] = []

    def perform(*args: Any) -> str:
        calls.append(args)
        return "ok"

    class ClassWorker:
        def perform(self, *args: Any) -> str:
            calls.append(args)
            return "ok"

    target: object = perform if kind == "function" else ClassWorker
    with node(make_config, {"MyApp.Worker": target}) as exq:
        # When a job with nested, unicode args is enqueued
        jid = exq.enqueue(QUEUE, "MyApp.Worker", NESTED_ARGS)
        # Then it runs once with exactly those args
        wait_for(lambda: stat(redis_client, keys, "processed") == 1, what="processed 1")
        assert calls == [tuple(NESTED_ARGS)]
        # and it has left the backup list, is counted processed, and went nowhere else
        assert backup(redis_client, exq) == []
        assert redis_client.llen(keys.queue(QUEUE)) == 0
        assert stat(redis_client, keys, "failed") == 0
        assert redis_client.zcard(keys.retry) == 0
        assert redis_client.zcard(keys.dead) == 0
        assert isinstance(jid, str)
        wait_for(lambda: exq.acks.totals["processed"] == 1)


def test_class_worker_gets_a_new_instance_per_job(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a class worker that records its instance (kept alive: ids are not reused)
    seen: list[object] = []

    class Counter:
        def perform(self, n: int) -> None:
            seen.append(self)

    with node(make_config, {"Counter": Counter}, queues=[(QUEUE, 1)]) as exq:
        # When two jobs run
        exq.enqueue(QUEUE, "Counter", [1])
        exq.enqueue(QUEUE, "Counter", [2])
        wait_for(lambda: stat(redis_client, keys, "processed") == 2)
    # Then each ran on its own instance
    assert len(seen) == 2
    assert seen[0] is not seen[1]


# -- 2. current_job() --------------------------------------------------------------------------


def test_current_job_is_the_running_job_inside_and_none_outside(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker that records current_job(), and a middleware that records it after the job
    inside: list[Job | None] = []
    after: list[Job | None] = []

    def perform(*args: Any) -> None:
        inside.append(current_job())

    class AfterHook(Middleware):
        def after_processed_work(self, pipeline: Pipeline) -> None:
            after.append(current_job())

    chain = (*default_chain(), AfterHook())
    assert current_job() is None  # outside any job
    with node(make_config, {"Inspect.Worker": perform}, middleware=chain) as exq:
        # When a job runs
        jid = exq.enqueue(QUEUE, "Inspect.Worker", [{"a": [1, "é"]}, 2])
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
    # Then inside it, current_job() was that job
    [job] = inside
    assert job is not None
    assert job.jid == jid
    assert job.args == [{"a": [1, "é"]}, 2]
    assert job.job_class == "Inspect.Worker"
    assert job.queue == QUEUE
    # and outside it (this thread; the worker thread once perform returned) it is None
    assert after == [None]
    assert current_job() is None


# -- 3. failures: retry and dead ---------------------------------------------------------------


def test_failing_job_goes_to_retry_with_error_fields_and_sidekiq_backoff(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker that raises
    def perform(*args: Any) -> None:
        raise ValueError("bad input: \u00fcber")

    with node(make_config, {"Failing": perform}) as exq:
        # When its job runs
        before = time.time()
        jid = exq.enqueue(QUEUE, "Failing", [1, {"x": [2]}])
        entry, score = one_entry(redis_client, keys.retry)
        after = time.time()
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then it is in the retry set once, with the error recorded Sidekiq style
        assert entry["jid"] == jid
        assert entry["args"] == [1, {"x": [2]}]
        assert entry["class"] == "Failing"
        assert entry["queue"] == QUEUE
        assert entry["retry"] == 25
        assert entry["retry_count"] == 1
        assert entry["error_class"] == "ValueError"
        assert entry["error_message"] == "bad input: \u00fcber"
        assert_exq_fields(entry)
        assert before - 1 <= entry["failed_at"] <= after + 1
        assert before - 1 <= entry["retried_at"] <= after + 1
        # and scheduled for the first Sidekiq backoff, 16..76 s from now
        assert before + 16 - 0.01 <= score <= after + 76 + 0.01
        # and counted failed, not processed, and acked
        assert stat(redis_client, keys, "failed") == 1
        assert stat(redis_client, keys, "processed") == 0
        assert redis_client.zcard(keys.dead) == 0
        assert backup(redis_client, exq) == []


def test_failing_job_with_max_retries_0_goes_to_dead(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node (and so an enqueue) with max_retries 0 and a worker that raises
    def perform(*args: Any) -> None:
        raise RuntimeError("no second chance")

    with node(make_config, {"Failing": perform}, max_retries=0) as exq:
        # When its job runs
        before = time.time()
        jid = exq.enqueue(QUEUE, "Failing", ["x"])
        entry, score = one_entry(redis_client, keys.dead)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then it is dead at once, not retried
        assert entry["jid"] == jid
        assert entry["retry"] == 0
        assert entry["retry_count"] == 0
        assert entry["error_class"] == "RuntimeError"
        assert entry["error_message"] == "no second chance"
        assert_exq_fields(entry)
        assert before - 1 <= score <= time.time() + 1
        assert redis_client.zcard(keys.retry) == 0
        assert stat(redis_client, keys, "processed") == 0
        assert backup(redis_client, exq) == []


@pytest.mark.parametrize(("retry", "lands_in"), [(True, "retry"), (False, "dead")])
def test_sidekiq_boolean_retry_field_decides_retry_or_dead(
    retry: bool, lands_in: str, make_config: ConfigFactory, redis_client: redis.Redis,
    keys: Keys
) -> None:
    # Given a raw Sidekiq-style job with "retry": true/false and a worker that raises
    def perform(*args: Any) -> None:
        raise KeyError("k")

    payload = raw_job("Failing", [7], retry=retry)
    with node(make_config, {"Failing": perform}) as exq:
        # When it is LPUSHed raw and runs
        redis_client.lpush(keys.queue(QUEUE), payload)
        target = keys.retry if lands_in == "retry" else keys.dead
        other = keys.dead if lands_in == "retry" else keys.retry
        entry, _ = one_entry(redis_client, target)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then retry: true retries (count 1), retry: false is dead at once (count 0)
        assert entry["retry"] is retry
        assert entry["retry_count"] == (1 if retry else 0)
        assert entry["error_class"] == "KeyError"
        assert entry["error_message"] == "'k'"
        assert redis_client.zcard(other) == 0
        assert backup(redis_client, exq) == []


# -- 4. SystemExit / KeyboardInterrupt ------------------------------------------------------


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_system_exit_and_keyboard_interrupt_fail_only_their_job(
    exc_type: type[BaseException], make_config: ConfigFactory, redis_client: redis.Redis,
    keys: Keys
) -> None:
    # Given a worker raising SystemExit / KeyboardInterrupt and a well-behaved one
    done: list[str] = []

    def bad(*args: Any) -> None:
        raise exc_type("leaving")

    def good(word: str) -> None:
        done.append(word)

    with node(make_config, {"Bad": bad, "Good": good}, queues=[(QUEUE, 1)]) as exq:
        # When the bad job runs
        exq.enqueue(QUEUE, "Bad", [])
        entry, _ = one_entry(redis_client, keys.retry)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then only that job failed (retry set, ordinary failure)
        assert entry["error_class"] == exc_type.__name__
        assert entry["retry_count"] == 1
        assert not exq.stopped.is_set()
        # and the node keeps running: a following job (same single slot) succeeds
        exq.enqueue(QUEUE, "Good", ["after"])
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        assert done == ["after"]
        assert not exq.stopped.is_set()
        assert exq.subscriptions() == [QUEUE]
        assert backup(redis_client, exq) == []


# -- 5. signature mismatch ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["function", "class"])
def test_perform_signature_mismatch_is_an_ordinary_failure(
    kind: str, make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker taking exactly two args
    calls: list[tuple[int, int]] = []

    def two(a: int, b: int) -> None:
        calls.append((a, b))

    class Two:
        def perform(self, a: int, b: int) -> None:
            calls.append((a, b))

    target: object = two if kind == "function" else Two
    with node(make_config, {"Two": target}) as exq:
        # When a job with three args runs
        exq.enqueue(QUEUE, "Two", [1, 2, 3])
        entry, _ = one_entry(redis_client, keys.retry)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then it fails like any exception: retry set (not dead), TypeError
        assert entry["error_class"] == "TypeError"
        assert "argument" in entry["error_message"]
        assert entry["retry_count"] == 1
        assert redis_client.zcard(keys.dead) == 0
        assert calls == []
        assert backup(redis_client, exq) == []


# -- 6. unknown and dangerous class names ---------------------------------------------------


def test_unknown_worker_is_retried_with_backoff_and_nothing_runs(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node with one registered worker (an older release in a rolling deploy)
    calls: list[Any] = []
    with node(make_config, {"Known": lambda *a: calls.append(a)}) as exq:
        # When a job names a class this node does not know
        jid = exq.enqueue(QUEUE, "Nobody.Home", [1])
        entry, score = one_entry(redis_client, keys.retry)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then it is retried with Sidekiq's backoff (a node that knows it runs it), not buried
        assert entry["jid"] == jid
        assert entry["error_class"] == "UnknownWorker"
        assert "Nobody.Home" in entry["error_message"]
        assert entry["retry_count"] == 1
        assert score - entry["failed_at"] >= 15  # 1^4 + 15 + rand(0..30) * 2
        assert_exq_fields(entry)
        assert calls == []
        assert redis_client.zcard(keys.dead) == 0
        assert stat(redis_client, keys, "processed") == 0
        assert backup(redis_client, exq) == []


def test_unknown_worker_without_retries_is_dead(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a job of an unknown class that allows no retry
    with node(make_config, {"Known": lambda *a: None}) as exq:
        jid = exq.enqueue(QUEUE, "Nobody.Home", [1], max_retries=0)
        # Then the retry rule buries it, saying why
        entry, _ = one_entry(redis_client, keys.dead)
        assert entry["jid"] == jid
        assert entry["error_class"] == "UnknownWorker"
        assert redis_client.zcard(keys.retry) == 0


@pytest.mark.parametrize("job_class", ["os.system", "builtins.eval", "Elixir.os.system",
                                       "subprocess::run"])
def test_payload_naming_a_builtin_callable_runs_nothing(
    job_class: str, tmp_path: Path, make_config: ConfigFactory, redis_client: redis.Redis,
    keys: Keys
) -> None:
    # Given a marker file a successful call would create
    marker = tmp_path / "pwned"
    args: list[Any]
    if job_class.endswith("eval"):
        args = [f"open({str(marker)!r}, 'w').close()"]
    elif job_class.endswith("run"):
        args = [["touch", str(marker)]]
    else:
        args = [f"touch '{marker}'"]
    with node(make_config, {}) as exq:
        # When a payload names a standard-library callable
        exq.enqueue(QUEUE, job_class, args)
        entry, _ = one_entry(redis_client, keys.retry)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then nothing ran, and the job waits in the retry set as an unknown worker
        assert not marker.exists()
        assert entry["error_class"] == "UnknownWorker"
        assert "unknown worker" in entry["error_message"]
        assert entry["args"] == args
        assert backup(redis_client, exq) == []
    assert not marker.exists()


# -- 7. malformed payloads -----------------------------------------------------------------


@pytest.mark.parametrize(("raw", "why"), [
    (b"not json", "not valid JSON"),
    (b"[1,2]", "not a JSON object"),
    (b'{"args":[]}', "no class"),
    (b'{"class":"W","args":{}}', "args is not a list"),
    (b"\xff\xfe", "not valid UTF-8"),
], ids=["not-json", "array", "no-class", "args-object", "bad-utf8"])
def test_malformed_payload_is_wrapped_into_the_dead_set_and_the_queue_goes_on(
    raw: bytes, why: str, make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a malformed payload pushed raw, then a valid job behind it
    ran: list[str] = []
    with node(make_config, {"Good": ran.append, "W": lambda: None},
              queues=[(QUEUE, 1)]) as exq:
        redis_client.lpush(keys.queue(QUEUE), raw)
        exq.enqueue(QUEUE, "Good", ["next"])
        # When the node works through both
        wait_for(lambda: stat(redis_client, keys, "processed") == 1, what="valid job done")
        entry, _ = one_entry(redis_client, keys.dead)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then the bad payload is dead, wrapped, with the verbatim bytes and the reason
        assert entry["class"] == "ExqFast.InvalidPayload"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert entry["args"] == []
            assert base64.b64decode(entry["payload_base64"]) == raw
        else:
            assert entry["args"] == [text]
        assert why in entry["error_message"]
        assert entry["queue"] == QUEUE
        assert_exq_fields(entry)
        # and counted failed; the backup list is empty; the valid job still ran
        assert stat(redis_client, keys, "failed") == 1
        assert backup(redis_client, exq) == []
        assert ran == ["next"]
        assert redis_client.zcard(keys.retry) == 0


# -- 8. custom middleware -------------------------------------------------------------------


def test_custom_middleware_hooks_run_in_chain_order_with_result_and_error(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given two recording middlewares around the default chain, and a job logging into the same log
    log: list[tuple[str, str, Any]] = []
    failure = ValueError("nope")

    def perform(outcome: str) -> dict[str, int]:
        log.append(("job", "perform", outcome))
        if outcome == "fail":
            raise failure
        return {"answer": 42}

    chain = (Recorder("first", log), *default_chain(), Recorder("last", log))
    with node(make_config, {"W": perform}, queues=[(QUEUE, 1)], middleware=chain):
        # When a job succeeds
        redis_client.lpush(keys.queue(QUEUE), raw_job("W", ["ok"], retry=5))
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        # Then hooks ran in chain order around the job, and after-hooks saw the result
        assert log == [
            ("first", "before_work", None),
            ("last", "before_work", None),
            ("job", "perform", "ok"),
            ("first", "after_processed_work", {"answer": 42}),
            ("last", "after_processed_work", {"answer": 42}),
        ]
        log.clear()
        # When a job fails
        redis_client.lpush(keys.queue(QUEUE), raw_job("W", ["fail"], retry=5))
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then the failed hooks ran, in order, with the exception itself
        assert log == [
            ("first", "before_work", None),
            ("last", "before_work", None),
            ("job", "perform", "fail"),
            ("first", "after_failed_work", failure),
            ("last", "after_failed_work", failure),
        ]
        assert log[-1][2] is failure


@pytest.mark.parametrize("chain", [(), "recorder"], ids=["empty chain", "user hook only"])
def test_a_chain_without_any_built_in_middleware_still_acks_and_counts_every_job(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys, chain: Any
) -> None:
    # Given a node whose chain holds none of the built-in middleware
    log: list[tuple[str, str, Any]] = []
    middleware = () if chain == () else (Recorder("only", log),)

    def perform(outcome: str) -> str:
        if outcome == "fail":
            raise ValueError("nope")
        return outcome

    with node(make_config, {"W": perform}, middleware=middleware) as exq:
        # When a job succeeds, one fails with retries left, one fails with none,
        # a payload is not JSON and one names no worker
        for raw in (raw_job("W", ["ok"]), raw_job("W", ["fail"], retry=5),
                    raw_job("W", ["fail"], retry=0), b"not json {",
                    raw_job("Nobody.Knows", [], retry=5)):
            redis_client.lpush(keys.queue(QUEUE), raw)
        # Then every job is counted and acked: nothing is left in the backup list
        wait_for(lambda: (stat(redis_client, keys, "processed"),
                          stat(redis_client, keys, "failed")) == (1, 4), what="5 jobs counted")
        wait_for(lambda: backup(redis_client, exq) == [], what="every job acked")
        # and each failure went where the retry rule sends it
        retries = sorted(json.loads(m)["class"] for m in redis_client.zrange(keys.retry, 0, -1))
        dead = sorted(json.loads(m)["class"] for m in redis_client.zrange(keys.dead, 0, -1))
        assert retries == ["Nobody.Knows", "W"]
        assert dead == ["ExqFast.InvalidPayload", "W"]
    if middleware:
        assert [hook for _, hook, _ in log].count("after_failed_work") == 4


def test_halt_skips_the_remaining_before_hooks_but_the_job_runs_and_after_hooks_run(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a middleware that halts, placed before a recording one
    log: list[tuple[str, str, Any]] = []

    class Halter(Recorder):
        def before_work(self, pipeline: Pipeline) -> None:
            super().before_work(pipeline)
            pipeline.halt()

    def perform(n: int) -> int:
        log.append(("job", "perform", n))
        return n * 2

    chain = chain_with(Halter("halter", log), Recorder("skipped", log))
    with node(make_config, {"W": perform}, middleware=chain) as exq:
        # When a job runs
        exq.enqueue(QUEUE, "W", [21])
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        # Then the hook after the halt did not see before_work, but the job ran,
        # every after-hook ran, and the job was acked
        assert log == [
            ("halter", "before_work", None),
            ("job", "perform", 21),
            ("halter", "after_processed_work", 42),
            ("skipped", "after_processed_work", 42),
        ]
        assert backup(redis_client, exq) == []


def test_terminate_stops_the_job_keeps_it_in_backup_and_frees_the_slot(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a middleware that terminates jobs whose first arg is "stop", concurrency 1
    log: list[tuple[str, str, Any]] = []
    terminated = threading.Event()

    class Terminator(Middleware):
        def before_work(self, pipeline: Pipeline) -> None:
            if pipeline.job is not None and pipeline.job.args[0] == "stop":
                pipeline.terminate()
                terminated.set()

    def perform(word: str) -> str:
        log.append(("job", "perform", word))
        return word

    chain = chain_with(Terminator(), Recorder("rec", log))
    with node(make_config, {"W": perform}, queues=[(QUEUE, 1)], middleware=chain) as exq:
        # When a terminated job is fetched
        exq.enqueue(QUEUE, "W", ["stop"])
        [stop_raw] = wait_for(lambda: backup(redis_client, exq), what="job fetched")
        wait_for(terminated.is_set, what="terminate")
        # and then another job is enqueued
        exq.enqueue(QUEUE, "W", ["go"])
        wait_for(lambda: stat(redis_client, keys, "processed") == 1, what="second job")
        # Then the terminated job never ran, no after-hook ran for it
        assert log == [
            ("rec", "before_work", None),
            ("job", "perform", "go"),
            ("rec", "after_processed_work", "go"),
        ]
        # and it stays in the backup list, counted neither way
        assert backup(redis_client, exq) == [stop_raw]
        assert json.loads(stop_raw)["args"] == ["stop"]
        assert stat(redis_client, keys, "failed") == 0
        assert redis_client.zcard(keys.retry) == 0
        assert redis_client.zcard(keys.dead) == 0


# -- 9. snooze -------------------------------------------------------------------------------


def test_snoozed_job_goes_back_to_retry_with_count_unchanged_and_counts_processed(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker that snoozes, and a job that has already been retried twice
    def perform(*args: Any) -> Snooze:
        return Snooze(10)

    payload = raw_job("Snoozer", ["a"], retry=25, retry_count=2, error_message="old")
    with node(make_config, {"Snoozer": perform}) as exq:
        # When the job runs
        before = time.time()
        redis_client.lpush(keys.queue(QUEUE), payload)
        entry, score = one_entry(redis_client, keys.retry)
        after = time.time()
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        # Then it is in the retry set ~10 s ahead, retry_count unchanged
        assert entry["error_message"] == "Snoozed for 10 seconds"
        assert entry["retry_count"] == 2
        assert entry["args"] == ["a"]
        assert_exq_fields(entry)
        assert before + 10 - 0.01 <= score <= after + 10 + 0.01
        # and it counted as processed, not failed, and was acked
        assert stat(redis_client, keys, "processed") == 1
        assert stat(redis_client, keys, "failed") == 0
        assert redis_client.zcard(keys.dead) == 0
        assert backup(redis_client, exq) == []


def test_snoozed_unique_job_keeps_its_lock(
    make_config: ConfigFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a unique job (unique_for 60, until success) holding its lock
    jid = enqueuer.enqueue(QUEUE, "Snoozer", [1], unique_for=60)
    assert isinstance(jid, str)
    token = first_queued(redis_client, keys)["unique_token"]
    assert redis_client.get(keys.unique(token)) == jid.encode()
    with node(make_config, {"Snoozer": lambda n: Snooze(10)}):
        # When it snoozes
        entry, _ = one_entry(redis_client, keys.retry)
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        # Then the lock is kept (still held by the job's jid)
        assert entry["error_message"] == "Snoozed for 10 seconds"
        assert entry["unique_token"] == token
        assert redis_client.get(keys.unique(token)) == jid.encode()
        assert redis_client.pttl(keys.unique(token)) > 0


# -- 10. unique release --------------------------------------------------------------------


def _enqueue_unique(enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys, worker: str,
                    **options: Any) -> tuple[str, str]:
    jid = enqueuer.enqueue(QUEUE, worker, [1], unique_for=60, **options)
    assert isinstance(jid, str)
    token = first_queued(redis_client, keys)["unique_token"]
    assert redis_client.get(keys.unique(token)) == jid.encode()  # the lock is held
    return jid, token


def _raise(*args: Any) -> None:
    raise ValueError("fail")


def test_unique_until_success_is_released_after_success(
    make_config: ConfigFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a unique job, until success
    _, token = _enqueue_unique(enqueuer, redis_client, keys, "Ok", unique_until="success")
    with node(make_config, {"Ok": lambda n: None}):
        # When it succeeds
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        # Then its lock is gone
        assert redis_client.exists(keys.unique(token)) == 0


def test_unique_until_success_is_kept_after_a_retryable_failure(
    make_config: ConfigFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a unique job, until success, with retries left
    jid, token = _enqueue_unique(enqueuer, redis_client, keys, "Bad")
    with node(make_config, {"Bad": _raise}):
        # When it fails and goes to the retry set
        one_entry(redis_client, keys.retry)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then its lock is still held by it
        assert redis_client.get(keys.unique(token)) == jid.encode()


def test_unique_until_success_is_released_when_the_job_dies(
    make_config: ConfigFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a unique job, until success, with no retries
    _, token = _enqueue_unique(enqueuer, redis_client, keys, "Bad", max_retries=0)
    with node(make_config, {"Bad": _raise}):
        # When it fails and dies
        one_entry(redis_client, keys.dead)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then its lock is released
        assert redis_client.exists(keys.unique(token)) == 0


def test_unique_until_start_is_released_before_the_job_runs(
    make_config: ConfigFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a unique job, until start, and a worker that looks at its own lock
    seen: list[int] = []

    def perform(n: int) -> None:
        job = current_job()
        assert job is not None and job.unique_token is not None
        seen.append(redis_client.exists(keys.unique(job.unique_token)))

    _enqueue_unique(enqueuer, redis_client, keys, "Look", unique_until="start")
    with node(make_config, {"Look": perform}):
        # When it runs
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
    # Then, inside the job, the lock was already gone
    assert seen == [0]


def test_unique_until_expiry_is_never_released_by_the_worker(
    make_config: ConfigFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a unique job, until expiry
    jid, token = _enqueue_unique(enqueuer, redis_client, keys, "Ok", unique_until="expiry")
    with node(make_config, {"Ok": lambda n: None}):
        # When it succeeds
        wait_for(lambda: stat(redis_client, keys, "processed") == 1)
        # Then the lock is still there, expiring on its own
        assert redis_client.get(keys.unique(token)) == jid.encode()
        assert 0 < redis_client.pttl(keys.unique(token)) <= 60_000


# -- 11. cancel ----------------------------------------------------------------------------


def test_cancel_signal_stops_a_cooperative_job_which_goes_to_dead(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a cooperative job that loops until it is cancelled
    started = threading.Event()
    outcome: list[str] = []

    def perform(*args: Any) -> None:
        job = current_job()
        assert job is not None
        started.set()
        deadline = time.monotonic() + 8
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome.append("cancelled" if job.cancelled else "timed out")

    with node(make_config, {"Loop": perform}) as exq:
        jid = exq.enqueue(QUEUE, "Loop", [1])
        assert started.wait(10)
        # (while it runs, the node shows it in its in-progress hash)
        workers_key = keys.workers(exq.config.node_id)
        [record] = wait_for(lambda: redis_client.hvals(workers_key), what="in-progress record")
        assert json.loads(json.loads(record)["payload"])["jid"] == jid
        # When a CANCEL signal naming its jid is sent and delivered
        signal = "CANCEL:" + json.dumps({"pid": "x", "jid": jid})
        redis_client.lpush(keys.signals(exq.config.node_id), signal)
        exq.pinger.run_once()
        # Then the job stops, and is dead with "Canceled" (despite retries left)
        entry, _ = one_entry(redis_client, keys.dead)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        assert outcome == ["cancelled"]
        assert entry["jid"] == jid
        assert entry["error_message"] == "Canceled"
        assert_exq_fields(entry)
        assert redis_client.zcard(keys.retry) == 0
        assert stat(redis_client, keys, "processed") == 0
        assert backup(redis_client, exq) == []
        assert redis_client.hlen(workers_key) == 0


# -- 12. node signals ----------------------------------------------------------------------


def test_tstp_signal_makes_the_node_quiet_and_stops_fetching(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a running node
    ran: list[int] = []
    markers: list[int] = []
    with node(make_config, {"W": ran.append, "M": markers.append}) as exq:
        node_id = exq.config.node_id
        assert exq.subscriptions() == [QUEUE]
        wait_for(lambda: redis_client.hget(keys.node(node_id), "quiet") == b"false")
        # When TSTP is sent and delivered (by this call, or by the node's own pinger
        # thread if it reads the list first)
        redis_client.lpush(keys.signals(node_id), "TSTP")
        exq.pinger.run_once()
        # Then it unsubscribes from every queue and reports quiet at its next ping
        wait_for(lambda: exq.subscriptions() == [], what="unsubscribed")
        wait_for(lambda: exq.pinger.run_once() is not None
                 and redis_client.hget(keys.node(node_id), "quiet") == b"true",
                 what="quiet reported")
        # and a job enqueued afterwards is not fetched. (Absence is checked against
        # fetches that demonstrably happened: the node is given a marker queue, and
        # its one fetcher thread fetching marker 1 means any fetch in flight at TSTP
        # time has landed; fetching marker 2, enqueued after the job, means a fetch
        # ran while the job was there to be taken wrongly.)
        exq.subscribe("markers")
        exq.enqueue("markers", "M", [1])
        wait_for(lambda: 1 in markers, what="marker 1 run (a fetch after TSTP)")
        exq.enqueue(QUEUE, "W", [1])
        exq.enqueue("markers", "M", [2])
        wait_for(lambda: 2 in markers, what="marker 2 run (a fetch after the job came)")
        assert exq.subscriptions() == ["markers"]
        assert redis_client.llen(keys.queue(QUEUE)) == 1
        assert backup(redis_client, exq) == []
        assert ran == []


def test_term_signal_stops_the_node(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a running node
    with node(make_config, {}) as exq:
        node_id = exq.config.node_id
        wait_for(lambda: redis_client.exists(keys.node(node_id)), what="registered")
        # When TERM is sent and delivered
        redis_client.lpush(keys.signals(node_id), "TERM")
        exq.pinger.run_once()
        # Then the node stops (idle: it has no job to wait for) and unregisters
        wait_for(exq.stopped.is_set, what="stopped")
        assert redis_client.exists(keys.node(node_id)) == 0
        assert node_id.encode() not in redis_client.smembers(keys.processes)


# -- 13. unknown Sidekiq fields survive ------------------------------------------------------


SIDEKIQ_CUSTOM = fixture_lines("sidekiq-6.4.1/enqueued.jsonl")[7]


@pytest.mark.parametrize(("max_retries", "lands_in"), [(25, "retry"), (0, "dead")])
def test_retry_and_dead_entries_keep_unknown_sidekiq_fields(
    max_retries: int, lands_in: str, make_config: ConfigFactory, redis_client: redis.Redis,
    keys: Keys
) -> None:
    # Given Sidekiq's job with tags, bid, custom and created_at, and a failing NoopWorker
    original = json.loads(SIDEKIQ_CUSTOM)
    assert {"tags", "bid", "custom", "created_at"} <= set(original)

    def noop(*args: Any) -> None:
        raise RuntimeError("NoopWorker fails here")

    with node(make_config, {"NoopWorker": noop}, queues=[original["queue"]],
              max_retries=max_retries) as exq:
        # When it is LPUSHed raw and fails
        redis_client.lpush(keys.queue(original["queue"]), SIDEKIQ_CUSTOM)
        key = keys.retry if lands_in == "retry" else keys.dead
        entry, _ = one_entry(redis_client, key)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then the entry keeps every field Sidekiq wrote, unknown ones included
        for name in ("tags", "bid", "custom", "jid", "args", "class", "queue", "retry"):
            assert entry[name] == original[name], name
        assert entry["created_at"] == pytest.approx(original["created_at"], abs=1e-6)
        assert entry["enqueued_at"] == pytest.approx(original["enqueued_at"], abs=1e-6)
        assert entry["error_class"] == "RuntimeError"
        assert entry["error_message"] == "NoopWorker fails here"
        assert entry["retry_count"] == (1 if lands_in == "retry" else 0)
        assert_exq_fields(entry)
        assert backup(redis_client, exq, original["queue"]) == []


# -- failures whose text cannot be written as-is --------------------------------


def test_error_message_with_a_lone_surrogate_still_retries_the_job(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker whose error names a file whose name is not UTF-8
    name = os.fsdecode(b"report-\xff.csv")  # "report-\udcff.csv", as os.listdir returns it

    def perform(*args: Any) -> None:
        raise ValueError(f"cannot parse {name}")

    with node(make_config, {"Parse": perform}) as exq:
        # When its job fails
        jid = exq.enqueue(QUEUE, "Parse", [1])
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then it is in the retry set and acked, like any failure
        assert [e["jid"] for e, _ in zentries(redis_client, keys.retry)] == [jid]
        assert backup(redis_client, exq) == []


def test_failed_job_with_an_escaped_lone_surrogate_in_args_is_retried(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a valid JSON job whose string arg is the escape \ud800, and a failing worker
    payload = b'{"class":"Failing","args":["\\ud800"],"retry":3,"jid":"surrogate-1"}'
    assert json.loads(payload)["args"] == ["\ud800"]

    def perform(*args: Any) -> None:
        raise ValueError("fail")

    with node(make_config, {"Failing": perform}) as exq:
        # When it runs and fails
        redis_client.lpush(keys.queue(QUEUE), payload)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1)
        # Then it is in the retry set and acked
        assert [e["jid"] for e, _ in zentries(redis_client, keys.retry)] == ["surrogate-1"]
        assert backup(redis_client, exq) == []


def test_exception_whose_str_raises_still_fails_the_job_normally(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker raising an exception that cannot be turned into text
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    def perform(*args: Any) -> None:
        raise Unprintable()

    with node(make_config, {"W": perform}) as exq:
        # When its job runs
        jid = exq.enqueue(QUEUE, "W", [1])
        # Then it is retried like any other failure, counted and acked
        entry, _ = wait_for(lambda: zentries(redis_client, keys.retry), what="a retry entry")[0]
        assert entry["jid"] == jid
        wait_for(lambda: stat(redis_client, keys, "failed") == 1, what="failed 1")
        assert backup(redis_client, exq) == []
