"""Failure paths a user relies on and that nothing else executes.

Broken user middleware (before and after hooks), a key of the wrong type inside
a stats batch, a batch listener that raises, ``AckWriter.stop`` while Redis is
down, the ``exq-fast enqueue`` verb's options, the Sidekiq backoff's jitter, a
re-subscribe while a queue's jobs run (Exq #310), and the "started" mark of a
recovered (suspect) job. Every test runs against the real test Redis (or a
private ``redis-server``) and asserts what lands there.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
import redis

from exq_fast import Middleware, Pipeline, current_job, retry
from exq_fast._phash2 import unique_token
from exq_fast.acks import AckWriter
from exq_fast.config import Config
from exq_fast.embedded import RedisServer
from exq_fast.enqueuer import Enqueuer
from exq_fast.inflight import InFlight
from exq_fast.job import decode, encode
from exq_fast.keys import Keys, StatKind
from exq_fast.middleware import default_chain
from exq_fast.store.recovery import RECOVERY_TTL, job_digest
from tests.conftest import NodeFactory, finished, in_flight, put_in_backup, wait_for

QUEUE = "fq"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def nodes(make_config: Callable[..., Config]) -> Iterator[NodeFactory]:
    """In-process nodes; every gate is opened and every node stopped at the end."""
    factory = NodeFactory(make_config)
    yield factory
    factory.close()


class Runs:
    """What a worker saw: the jid of every execution, in order (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jids: list[str | None] = []

    def worker(self, *, fail: bool = False,
               gate: threading.Event | None = None) -> Callable[..., None]:
        def perform(*args: Any) -> None:
            job = current_job()
            with self.lock:
                self.jids.append(None if job is None else job.jid)
            if gate is not None:
                gate.wait(15)
            if fail:
                raise ValueError(f"job failed with {args!r}")

        return perform

    def count(self) -> int:
        with self.lock:
            return len(self.jids)

    def snapshot(self) -> list[str | None]:
        with self.lock:
            return list(self.jids)


def counter(client: redis.Redis, key: str) -> int:
    """An INCRBY counter (0 when absent)."""
    value = client.get(key)
    return int(value) if value is not None else 0


def day_count(client: redis.Redis, keys: Keys, kind: StatKind, before: float,
              after: float) -> int:
    """The per-day counter of the UTC day a flush ran in (it ran between ``before`` and
    ``after``; both days are read, in case the flush straddled midnight)."""
    day_keys = {keys.stat_day(kind, before), keys.stat_day(kind, after)}
    return sum(counter(client, key) for key in day_keys)


def members(client: redis.Redis, key: str) -> list[tuple[dict[str, Any], float]]:
    pairs = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
    return [(json.loads(member), score) for member, score in pairs]


def chain_after_job(extra: Middleware) -> tuple[Middleware, ...]:
    """The default chain with ``extra`` first (the worker's core decoded the job already)."""
    return (extra, *default_chain())


def backup_len(client: redis.Redis, flights: Sequence[InFlight]) -> int:
    return sum(int(client.llen(key)) for key in {f.backup for f in flights})


# -- 1. a before_work hook that raises ---------------------------------------------------


# What a broken hook may raise: an Exception, or a BaseException such as SystemExit
# (sys.exit() in a hook) or KeyboardInterrupt; none of them may cost the job its ack.
RAISED: dict[str, type[BaseException]] = {
    "RuntimeError": RuntimeError, "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt}


class RaisingBefore(Middleware):
    def __init__(self, kind: type[BaseException] = RuntimeError) -> None:
        self.kind = kind

    def before_work(self, pipeline: Pipeline) -> None:
        raise self.kind("before_work hook broke")


@pytest.mark.parametrize("raised", list(RAISED))
@pytest.mark.parametrize(("max_retries", "lands_in"), [(25, "retry"), (0, "dead")])
def test_a_before_work_hook_that_raises_fails_the_job_and_acks_it(
    max_retries: int, lands_in: str, raised: str, nodes: NodeFactory,
    redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer, node_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a node whose chain holds a user middleware raising in before_work
    caplog.set_level(logging.ERROR, logger="exq_fast")
    runs = Runs()
    config = nodes.config(queues=[QUEUE],
                          middleware=chain_after_job(RaisingBefore(RAISED[raised])),
                          scheduler_enable=False)
    nodes.start(config, {"Fp.Work": runs.worker()})

    # When a job is enqueued (retry 25: retried; retry 0: dead at once)
    jid = enqueuer.enqueue(QUEUE, "Fp.Work", [1, "x"], max_retries=max_retries)
    wait_for(lambda: counter(redis_client, keys.stat("failed")) == 1, what="the job failed")

    # Then it never ran, is counted failed (not processed) and went where its retry says,
    # with the hook's error, and it is acked (the batch is atomic: counted means acked)
    assert runs.count() == 0
    assert counter(redis_client, keys.stat("processed")) == 0
    assert redis_client.lrange(keys.backup(node_id, QUEUE), 0, -1) == []
    assert redis_client.llen(keys.queue(QUEUE)) == 0
    target, other = (keys.retry, keys.dead) if lands_in == "retry" else (keys.dead, keys.retry)
    [(entry, _)] = members(redis_client, target)
    assert entry["jid"] == jid and entry["args"] == [1, "x"]
    assert entry["error_class"] == raised
    assert entry["error_message"] == "before_work hook broke"
    assert entry["retry_count"] == (1 if lands_in == "retry" else 0)
    assert redis_client.zcard(other) == 0
    # and the broken hook was logged, named, with its traceback
    [record] = [r for r in caplog.records if "failed in before_work" in r.getMessage()]
    assert "RaisingBefore" in record.getMessage() and record.exc_info is not None


# -- 2. an after hook that raises ---------------------------------------------------------


class RaisingAfter(Middleware):
    def __init__(self, kind: type[BaseException] = RuntimeError) -> None:
        self.kind = kind
        self.calls: list[str] = []

    def after_processed_work(self, pipeline: Pipeline) -> None:
        self.calls.append("processed")
        raise self.kind("after_processed_work hook broke")

    def after_failed_work(self, pipeline: Pipeline) -> None:
        self.calls.append("failed")
        raise self.kind("after_failed_work hook broke")


@pytest.mark.parametrize("raised", list(RAISED))
@pytest.mark.parametrize("outcome", ["processed", "failed"])
def test_an_after_hook_that_raises_still_lets_the_ack_and_the_count_land(
    outcome: str, raised: str, nodes: NodeFactory, redis_client: redis.Redis, keys: Keys,
    enqueuer: Enqueuer, node_id: str,
) -> None:
    # Given a node (one slot) whose first middleware raises in its after hooks
    runs = Runs()
    hook = RaisingAfter(RAISED[raised])
    config = nodes.config(queues=[(QUEUE, 1)], middleware=(hook, *default_chain()),
                          scheduler_enable=False)
    nodes.start(config, {"Fp.Work": runs.worker(fail=outcome == "failed")})

    # When two jobs run one after the other and each ends (succeeds or fails)
    jids = [enqueuer.enqueue(QUEUE, "Fp.Work", [n]) for n in range(2)]
    kind = cast(StatKind, outcome)
    wait_for(lambda: counter(redis_client, keys.stat(kind)) == 2,
             what=f"two jobs counted {outcome}")

    # Then the broken hook ran for both, both are acked and counted (the slot was freed),
    # and a failed job still reached the retry set
    assert hook.calls == [outcome, outcome]
    assert sorted(j for j in runs.snapshot() if j) == sorted(cast(list[str], jids))
    assert redis_client.lrange(keys.backup(node_id, QUEUE), 0, -1) == []
    other: StatKind = "failed" if outcome == "processed" else "processed"
    assert counter(redis_client, keys.stat(other)) == 0
    retried = sorted(entry["jid"] for entry, _ in members(redis_client, keys.retry))
    assert retried == (sorted(cast(list[str], jids)) if outcome == "failed" else [])


# -- 3. a command refused with WRONGTYPE inside a stats batch ------------------------------


def test_a_command_refused_with_wrongtype_is_skipped_and_the_rest_of_the_batch_lands(
    redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a user broke two keys: the retry set is a string, stat:processed a list
    redis_client.set(keys.retry, b"not a zset")
    redis_client.rpush(keys.stat("processed"), b"not a counter")
    writer = AckWriter(redis_client, keys, "n1")
    flights = [in_flight(keys, "n1", n) for n in range(3)]
    put_in_backup(redis_client, flights)

    # When one batch holds a failed job whose retry write hits the broken retry key,
    # then a job with a dead-set write, then a plain job
    writer.job_done(finished(flights[0], "failed", [("ZADD", keys.retry, "100", b"retry-me")]))
    writer.job_done(finished(flights[1], "processed", [("ZADD", keys.dead, "200", b"bury-me")]))
    writer.job_done(finished(flights[2], "processed"))
    before = time.time()
    with caplog.at_level(logging.WARNING, logger="exq_fast"):
        assert writer.flush() is True
    after = time.time()

    # Then the two refused commands (ZADD retry, INCRBY stat:processed) are skipped and
    # logged, the broken keys are left as they were ...
    assert any("2 command(s) refused" in r.getMessage() for r in caplog.records), caplog.text
    assert redis_client.get(keys.retry) == b"not a zset"
    assert redis_client.lrange(keys.stat("processed"), 0, -1) == [b"not a counter"]
    # ... and everything else of the batch applied: every ack, the later write, the counters
    assert backup_len(redis_client, flights) == 0
    assert redis_client.zrange(keys.dead, 0, -1, withscores=True) == [(b"bury-me", 200.0)]
    assert counter(redis_client, keys.stat("failed")) == 1
    assert day_count(redis_client, keys, "processed", before, after) == 2
    assert day_count(redis_client, keys, "failed", before, after) == 1
    assert writer.totals == {"processed": 2, "failed": 1}
    assert writer.pending() == 0

    # And the next batch is not blocked either
    late = in_flight(keys, "n1", 3)
    put_in_backup(redis_client, [late])
    writer.job_done(finished(late, "failed"))
    assert writer.flush() is True
    assert backup_len(redis_client, [late]) == 0
    assert counter(redis_client, keys.stat("failed")) == 2


def test_a_failing_job_whose_retry_key_is_broken_is_still_acked_by_a_node(
    nodes: NodeFactory, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    node_id: str,
) -> None:
    # Given the retry set key is a string (a user broke it) and a node with a failing worker
    redis_client.set(keys.retry, b"broken")
    runs = Runs()
    nodes.start(nodes.config(queues=[QUEUE], scheduler_enable=False),
                {"Fp.Fail": runs.worker(fail=True)})

    # When a job fails: its retry write is refused with WRONGTYPE
    enqueuer.enqueue(QUEUE, "Fp.Fail", [1])
    wait_for(lambda: counter(redis_client, keys.stat("failed")) == 1, what="failure counted")

    # Then its ack landed anyway (the job is not re-run forever) and the key is untouched
    assert redis_client.lrange(keys.backup(node_id, QUEUE), 0, -1) == []
    assert redis_client.get(keys.retry) == b"broken"
    assert runs.count() == 1
    # and the node goes on acking later jobs
    enqueuer.enqueue(QUEUE, "Fp.Fail", [2])
    wait_for(lambda: counter(redis_client, keys.stat("failed")) == 2, what="second failure")
    assert redis_client.lrange(keys.backup(node_id, QUEUE), 0, -1) == []


# -- 4. a batch listener that raises --------------------------------------------------------


class BrokenListener:
    def __init__(self) -> None:
        self.calls = 0

    def batch_applied(self, done: Sequence[InFlight], seconds: float) -> None:
        self.calls += 1
        raise RuntimeError("listener broke")


class CountingListener:
    def __init__(self) -> None:
        self.jobs = 0

    def batch_applied(self, done: Sequence[InFlight], seconds: float) -> None:
        self.jobs += len(done)


def test_a_batch_listener_that_raises_stops_neither_the_flusher_nor_the_acks(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a running stats writer whose first listener raises on every batch
    broken, counting = BrokenListener(), CountingListener()
    writer = AckWriter(redis_client, keys, "n1", listeners=[broken, counting])
    writer.start()
    try:
        for round_ in range(3):
            # When a round of jobs ends (each round waits for the previous one's batch)
            flights = [in_flight(keys, "n1", round_ * 10 + n) for n in range(4)]
            put_in_backup(redis_client, flights)
            for flight in flights:
                writer.job_done(finished(flight, "processed"))
            # Then its acks and counts land, and the next listener was still told
            wait_for(lambda flights=flights: backup_len(redis_client, flights) == 0,
                     what=f"round {round_} acked")
            wait_for(lambda n=round_: counting.jobs == 4 * (n + 1),
                     what=f"round {round_} reported")
        assert counter(redis_client, keys.stat("processed")) == 12
        assert broken.calls >= 3
        # And the flusher thread is still alive
        assert writer._thread is not None and writer._thread.is_alive()
    finally:
        assert writer.stop(timeout=5) is True


# -- 5. AckWriter.stop() while Redis is down ------------------------------------------------


def test_stop_while_redis_is_down_returns_false_in_bounded_time_without_raising(
    private_redis: RedisServer,
) -> None:
    # Given a running stats writer that acked a first job, then Redis crashes
    client = redis.Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    keys = Keys("exq")
    failures: list[str] = []
    writer = AckWriter(client, keys, "n1", on_error=lambda op, exc: failures.append(op))
    writer.start()
    first, second = in_flight(keys, "n1", 1), in_flight(keys, "n1", 2)
    put_in_backup(client, [first, second])
    writer.job_done(finished(first, "processed"))
    wait_for(lambda: client.lrange(first.backup, 0, -1) == [second.raw], what="first acked")
    private_redis.kill()
    writer.job_done(finished(second, "processed"))

    # When the writer is stopped with a 0.5 s budget
    outcome: dict[str, object] = {}

    def stop() -> None:
        try:
            outcome["result"] = writer.stop(timeout=0.5)
        except BaseException as exc:  # reported below
            outcome["raised"] = exc

    stopper = threading.Thread(target=stop, daemon=True)  # a hang must not block exit
    started = time.monotonic()
    stopper.start()
    stopper.join(15)
    elapsed = time.monotonic() - started

    # Then it returned, False (not everything reached Redis), without raising, within
    # its budget (thread join + retry loop, 0.5 s each) plus one flush's socket timeout
    assert not stopper.is_alive(), "stop() hung with Redis down"
    assert outcome == {"result": False}
    assert elapsed < 3.5, elapsed
    # and the unacked job was kept, not dropped as if acked; a late ack is refused
    assert writer.pending() == 1
    assert failures and set(failures) == {"stats_flush"}
    assert writer.totals["processed"] == 1
    writer.job_done(finished(in_flight(keys, "n1", 3), "processed"))
    assert writer.pending() == 1
    client.close()


# -- 6. the enqueue verb of the CLI ---------------------------------------------------------


def run_cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m exq_fast ARGS`` on the test Redis and namespace (no EXQ_* environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_") and k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "exq_fast", *args, "--redis-url", redis_url,
         "--namespace", namespace],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=30,
        check=False)


def cli_ok(redis_url: str, namespace: str, *args: str) -> str:
    done = run_cli(redis_url, namespace, *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def test_cli_enqueue_pushes_exqs_six_fields_and_prints_the_jid(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # When a job with nested JSON args and --retry 4, then one with no args, are enqueued
    args = [1, "two", {"k": [3, None, True]}, "h\u00e9"]
    before = time.time()
    out = cli_ok(redis_url, namespace, "enqueue", "cliq", "App.Work", json.dumps(args),
                 "--retry", "4")
    plain = cli_ok(redis_url, namespace, "enqueue", "cliq", "Elixir.App.Plain")
    after = time.time()

    # Then each printed its jid alone, and the queue holds Exq's bytes for both
    jid, plain_jid = out.strip(), plain.strip()
    assert out == jid + "\n" and plain == plain_jid + "\n" and jid != plain_jid
    raw = cast(list[bytes], redis_client.lrange(keys.queue("cliq"), 0, -1))
    assert len(raw) == 2
    newest, oldest = (json.loads(r) for r in raw)
    assert list(oldest) == ["args", "class", "enqueued_at", "jid", "queue", "retry"]
    assert oldest["args"] == args and oldest["class"] == "App.Work"
    assert oldest["jid"] == jid and oldest["queue"] == "cliq" and oldest["retry"] == 4
    assert isinstance(oldest["enqueued_at"], float)
    assert before <= oldest["enqueued_at"] <= after
    assert newest["args"] == [] and newest["class"] == "App.Plain"
    assert newest["jid"] == plain_jid and newest["retry"] == 25
    assert redis_client.smembers(keys.queues) == {b"cliq"}
    assert redis_client.zcard(keys.schedule) == 0


def test_cli_enqueue_in_and_at_write_the_schedule_with_the_run_time_as_score(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # When jobs are enqueued --in 60 s, --at an ISO time, and --at Unix seconds
    before = time.time()
    later = cli_ok(redis_url, namespace, "enqueue", "sq", "App.Later", "[1]", "--in", "60")
    after = time.time()
    iso = cli_ok(redis_url, namespace, "enqueue", "sq", "App.Iso", "[2]",
                 "--at", "2030-01-02T03:04:05Z")
    unix = cli_ok(redis_url, namespace, "enqueue", "sq", "App.Unix", "[3]",
                  "--at", "1893553445.5")

    # Then nothing is queued yet, and the scheduled set holds each job scored by its run time,
    # which is also its enqueued_at (Exq 0.14+)
    assert redis_client.llen(keys.queue("sq")) == 0
    by_jid = {entry["jid"]: (entry, score) for entry, score in members(redis_client,
                                                                      keys.schedule)}
    assert set(by_jid) == {later.strip(), iso.strip(), unix.strip()}
    entry, score = by_jid[later.strip()]
    assert before + 60 <= score <= after + 60
    assert entry["enqueued_at"] == score and entry["args"] == [1]
    entry, score = by_jid[iso.strip()]
    assert score == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() == 1893553445.0
    assert entry["enqueued_at"] == score and entry["class"] == "App.Iso"
    entry, score = by_jid[unix.strip()]
    assert score == 1893553445.5 and entry["enqueued_at"] == 1893553445.5


def test_cli_enqueue_count_with_json_output_pushes_n_distinct_jobs(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # When three copies are enqueued in one call, with --json output
    out = cli_ok(redis_url, namespace, "enqueue", "cq", "App.Many", '[{"a": 1}]',
                 "--count", "3", "--json")

    # Then the output is a JSON list of three distinct jids, and the queue holds those jobs
    jids = json.loads(out)
    assert isinstance(jids, list) and len(jids) == 3 and len(set(jids)) == 3
    queued = [json.loads(r) for r in redis_client.lrange(keys.queue("cq"), 0, -1)]
    assert sorted(job["jid"] for job in queued) == sorted(jids)
    assert all(job["args"] == [{"a": 1}] and job["class"] == "App.Many" for job in queued)


def test_cli_enqueue_unique_for_takes_the_lock_and_reports_a_conflict(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # When a job is enqueued --unique-for 600
    out = cli_ok(redis_url, namespace, "enqueue", "uq", "App.Unique", '[7, "x"]',
                 "--unique-for", "600")
    jid = out.strip()

    # Then its payload carries Exq's unique fields and its token's lock holds its jid for 600 s
    [raw] = cast(list[bytes], redis_client.lrange(keys.queue("uq"), 0, -1))
    job = json.loads(raw)
    token = unique_token("uq", "App.Unique", [7, "x"])
    assert job["jid"] == jid
    assert job["unique_token"] == token and job["unique_until"] == "success"
    assert job["unique_for"] == 600
    assert job["unlocks_at"] == pytest.approx(job["enqueued_at"] + 600)
    assert redis_client.get(keys.unique(token)) == jid.encode()
    assert 590_000 < redis_client.pttl(keys.unique(token)) <= 600_000

    # When the same job is enqueued again, in text and in JSON
    again = run_cli(redis_url, namespace, "enqueue", "uq", "App.Unique", '[7, "x"]',
                    "--unique-for", "600")
    again_json = run_cli(redis_url, namespace, "enqueue", "uq", "App.Unique", '[7, "x"]',
                         "--unique-for", "600", "--json")

    # Then both say which job holds the lock, exit 1, and push nothing
    assert again.returncode == 1 and again.stderr == ""
    assert again.stdout == f"conflict: a unique lock is held by job {jid}\n"
    assert again_json.returncode == 1 and again_json.stderr == ""
    assert json.loads(again_json.stdout) == [{"conflict": jid}]
    assert redis_client.lrange(keys.queue("uq"), 0, -1) == [raw]


# -- 7. the backoff's jitter scales with count + 1 -------------------------------------------


@pytest.mark.parametrize("retry_count", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("pick", ["max", "min"])
def test_sidekiq_backoff_is_count4_plus_15_plus_jitter_times_count_plus_1(
    retry_count: int | None, pick: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the random draw pinned to one end of Sidekiq's rand(0..30)
    draws: list[tuple[int, int]] = []

    def randint(low: int, high: int) -> int:
        draws.append((low, high))
        return high if pick == "max" else low

    monkeypatch.setattr(retry, "random", SimpleNamespace(randint=randint))
    data: dict[str, Any] = {"class": "W", "args": [], "jid": "j", "queue": "q", "retry": 25}
    if retry_count is not None:
        data["retry_count"] = retry_count
    n = (retry_count or 0) + 1

    # When the delay of the job's next attempt is computed
    delay = retry.sidekiq_backoff(decode(encode(data)))

    # Then it is exactly n^4 + 15 + rand(0..30) * (n + 1)
    assert draws == [(0, 30)]
    assert delay == float(n**4 + 15 + (30 if pick == "max" else 0) * (n + 1))


def test_a_failed_jobs_retry_score_carries_the_scaled_jitter(
    nodes: NodeFactory, redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the jitter pinned to its maximum and a job on its fourth attempt (retry_count 3)
    monkeypatch.setattr(retry, "random", SimpleNamespace(randint=lambda low, high: high))
    raw = encode({"args": [], "class": "Fp.Fail", "enqueued_at": time.time(), "jid": "bk",
                  "queue": QUEUE, "retry": 25, "retry_count": 3})
    redis_client.lpush(keys.queue(QUEUE), raw)

    # When a node runs it and it fails
    nodes.start(nodes.config(queues=[QUEUE], scheduler_enable=False),
                {"Fp.Fail": Runs().worker(fail=True)})
    wait_for(lambda: redis_client.zcard(keys.retry) == 1, what="the retry entry")

    # Then its next attempt is 4^4 + 15 + 30 * 5 = 421 s after it failed
    [(entry, score)] = members(redis_client, keys.retry)
    assert entry["retry_count"] == 4
    assert score - entry["retried_at"] == pytest.approx(421.0, abs=1e-3)


# -- 8. a re-subscribe while the queue's jobs run (Exq #310) -----------------------------------


def test_resubscribe_never_requeues_running_jobs_but_recovers_strays_when_idle(
    nodes: NodeFactory, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    node_id: str,
) -> None:
    # Given a node (5 slots on q) running two gated jobs: they sit in its backup list
    gate = nodes.gate()
    gated, quick = Runs(), Runs()
    exq = nodes.start(nodes.config(queues=[(QUEUE, 5)], scheduler_enable=False),
                      {"Fp.Gated": gated.worker(gate=gate), "Fp.Quick": quick.worker()})
    jids = [enqueuer.enqueue(QUEUE, "Fp.Gated", [n]) for n in range(2)]
    wait_for(lambda: gated.count() == 2, what="both gated jobs running")
    backup_key = keys.backup(node_id, QUEUE)
    running_raw = set(cast(list[bytes], redis_client.lrange(backup_key, 0, -1)))
    assert len(running_raw) == 2

    # When q is unsubscribed and subscribed again while they run
    exq.unsubscribe(QUEUE)
    exq.subscribe(QUEUE, 5)
    # (a job enqueued after the re-subscribe runs: a fetch after it has surely happened,
    # and it would have fetched any job the re-subscribe had pushed back first)
    marker = enqueuer.enqueue(QUEUE, "Fp.Quick", ["marker"])
    wait_for(lambda: quick.snapshot() == [marker], what="the marker job ran")
    wait_for(lambda: counter(redis_client, keys.stat("processed")) == 1, what="marker acked")

    # Then the running jobs were not moved back to the queue, nor started a second time
    assert set(cast(list[bytes], redis_client.lrange(backup_key, 0, -1))) == running_raw
    assert redis_client.llen(keys.queue(QUEUE)) == 0
    assert sorted(j for j in gated.snapshot() if j) == sorted(cast(list[str], jids))
    assert (QUEUE, "subscribe") not in exq.recovered

    # When they finish, each was run exactly once and acked
    gate.set()
    wait_for(lambda: counter(redis_client, keys.stat("processed")) == 3, what="all acked")
    wait_for(lambda: exq.fetcher.busy() == 0, what="the node idle")
    assert sorted(j for j in gated.snapshot() if j) == sorted(cast(list[str], jids))
    assert redis_client.llen(backup_key) == 0

    # Given the node idle and unsubscribed, and a stray job in its backup list (fetched by
    # an earlier process of this node id and never acked)
    exq.unsubscribe(QUEUE)
    stray = encode({"args": ["stray"], "class": "Fp.Quick", "enqueued_at": time.time(),
                    "jid": "stray", "queue": QUEUE, "retry": 25})
    redis_client.lpush(backup_key, stray)

    # When q is subscribed again
    exq.subscribe(QUEUE, 5)

    # Then the stray job is recovered and run, once
    wait_for(lambda: "stray" in quick.snapshot(), what="the stray job ran")
    wait_for(lambda: counter(redis_client, keys.stat("processed")) == 4, what="stray acked")
    assert quick.snapshot() == [marker, "stray"]
    assert exq.recovered == {(QUEUE, "subscribe"): 1}
    assert redis_client.llen(backup_key) == 0


# -- 9. a recovered (suspect) job is marked started while it runs --------------------------------


def test_a_recovered_job_is_marked_started_while_it_runs_and_cleared_by_its_ack(
    nodes: NodeFactory, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    node_id: str,
) -> None:
    # Given a job an earlier process of this node id fetched and never acked (so the
    # recovery at start makes it a suspect), and a fresh job beside it
    suspect = encode({"args": ["suspect"], "class": "Fp.Gated", "enqueued_at": time.time(),
                      "jid": "suspect", "queue": QUEUE, "retry": 25})
    digest = job_digest(suspect)
    redis_client.lpush(keys.backup(node_id, QUEUE), suspect)
    gate = nodes.gate()
    runs = Runs()
    exq = nodes.start(nodes.config(queues=[QUEUE], scheduler_enable=False),
                      {"Fp.Gated": runs.worker(gate=gate)})
    fresh = enqueuer.enqueue(QUEUE, "Fp.Gated", ["fresh"])
    assert isinstance(fresh, str)

    # When both run (held by the gate)
    wait_for(lambda: sorted(j for j in runs.snapshot() if j) == sorted(["suspect", fresh]),
             what="both jobs running")

    # Then the recovered job is marked started in Redis (for poison detection), at the
    # time it started, and is a suspect with one counted recovery; the fresh job has no
    # mark
    assert exq.recovered == {(QUEUE, "startup"): 1}
    marked = redis_client.hget(keys.started, digest)
    assert marked is not None and abs(float(marked) - time.time()) < RECOVERY_TTL
    assert redis_client.zscore(keys.suspects, digest) is not None
    assert redis_client.hget(keys.recoveries, digest) == b"1"
    fresh_raw = [r for r in cast(list[bytes], redis_client.lrange(
        keys.backup(node_id, QUEUE), 0, -1)) if r != suspect]
    assert len(fresh_raw) == 1
    assert not redis_client.hexists(keys.started, job_digest(fresh_raw[0]))

    # When they finish and are acked
    gate.set()
    wait_for(lambda: counter(redis_client, keys.stat("processed")) == 2, what="both acked")

    # Then the ack cleared the mark, the suspect entry and the recovery count
    assert not redis_client.hexists(keys.started, digest)
    assert not redis_client.hexists(keys.recoveries, digest)
    assert redis_client.zscore(keys.suspects, digest) is None
    assert redis_client.llen(keys.backup(node_id, QUEUE)) == 0


def test_start_marks_refused_by_redis_are_logged_once_per_outage(
    private_redis: RedisServer, nodes: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 5 recovered jobs (suspects) waiting, a node not consuming their queue yet, and
    # a Redis that then refuses writes that grow memory (the fetch and the acks still run)
    client = redis.Redis.from_url(private_redis.url)
    config = nodes.config(redis_url=private_redis.url, queues=["idle"])
    keys = Keys(config.namespace)
    raws = [encode({"class": "F.Ok", "args": [n], "jid": f"s{n}", "queue": QUEUE})
            for n in range(5)]
    client.lpush(keys.queue(QUEUE), *raws)
    client.zadd(keys.suspects, {job_digest(raw): time.time() for raw in raws})
    runs = Runs()
    exq = nodes.start(config, {"F.Ok": runs.worker()})
    caplog.set_level(logging.WARNING, logger="exq_fast")
    client.config_set("maxmemory", 1)
    exq.subscribe(QUEUE, 5)
    try:
        # When they run
        wait_for(lambda: runs.count() == 5, what="the 5 jobs ran", detail=lambda: (
            f"ran {runs.count()}, queued {client.llen(keys.queue(QUEUE))}, fetched "
            f"{client.llen(keys.backup(config.node_id, QUEUE))}, busy {exq.fetcher.busy()}, "
            f"Redis errors {exq.redis_errors}"))
        # Then each ran, and the refused marks were logged once, not 5 times
        refused = [r for r in caplog.records if "could not mark" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in refused]
        # When Redis takes writes again and another recovered job runs
        client.config_set("maxmemory", 0)
        raw = encode({"class": "F.Ok", "args": [5], "jid": "s5", "queue": QUEUE})
        client.zadd(keys.suspects, {job_digest(raw): time.time()})
        client.lpush(keys.queue(QUEUE), raw)
        wait_for(lambda: runs.count() == 6, what="the 6th job ran")
        # Then the recovery is logged once, with how many were not marked
        wait_for(lambda: any("works again; 5 were not marked" in r.getMessage()
                             for r in caplog.records), what="the recovery line")
    finally:
        client.config_set("maxmemory", 0)
        exq.stop(timeout=5)
        client.close()
