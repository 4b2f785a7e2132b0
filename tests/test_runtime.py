"""The in-process node (``Exq``) on a real Redis: fixture payloads, Redis shapes,
concurrency, recovery, shutdown, subscriptions, heartbeats, outages, poison input.

Every test starts its nodes through the ``runtime`` fixture, which releases every
gate a test created and then stops every node, whatever the outcome.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from exq_fast import current_job, scripts
from exq_fast.config import Config
from exq_fast.embedded import RedisServer
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from tests.conftest import NodeFactory, fixture_json, fixture_lines, fixture_members, stat, wait_for

POLL_MS = 10
EXQ_VERSIONS = ("exq-0.13.2", "exq-0.23.0")
ALL_VERSIONS = (*EXQ_VERSIONS, "sidekiq-6.4.1")
QUEUE_FILES = (
    "exq-0.13.2/enqueued.jsonl",
    "exq-0.23.0/enqueued.jsonl",
    "sidekiq-6.4.1/enqueued.jsonl",
    "exq-0.13.2/requeued.jsonl",
    "exq-0.23.0/requeued.jsonl",
)
ZSET_FILES = tuple(f"{v}/{name}.jsonl" for v in ALL_VERSIONS for name in ("retry", "dead"))
FIXTURE_CLASSES = {
    "Bench.NoopWorker", "Bench.FailingWorker", "Bench.SlowWorker", "MyApp.Worker",
    "NoopWorker", "MyApp::HardWorker", "FailingWorker", "FailingBacktraceWorker", "SlowWorker",
}


# -- helpers -------------------------------------------------------------------



def compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def typed(value: Any) -> Any:
    """``value`` with every scalar tagged by its type: 1 != 1.0 != True, -0.0 != 0.0."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def exq_job(queue: str, job_class: str, args: list[Any], jid: str, retry: int = 25) -> bytes:
    """A job as Exq's enqueuer writes it (alphabetical keys, float enqueued_at)."""
    return compact({"args": args, "class": job_class, "enqueued_at": time.time(), "jid": jid,
                    "queue": queue, "retry": retry})


def key_shape(key: str, namespace: str, node: str) -> str:
    """A key with its namespace, node id, date and second replaced by placeholders."""
    assert key.startswith(namespace + ":"), key
    rest = key[len(namespace) + 1:]
    rest = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z", "<T>", rest)
    rest = re.sub(r"\d{4}-\d{2}-\d{2}", "<D>", rest)
    parts = re.split(r"(:+)", rest)
    return "".join("<node>" if part == node else part for part in parts)


def key_names(client: redis.Redis, namespace: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=f"{namespace}:*", count=1000)}


def decoded_members(client: redis.Redis, zset: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in client.zrange(zset, 0, -1)]


@dataclass
class Run:
    """One execution seen by a recording worker."""

    worker: str
    args: list[Any]
    raw: bytes
    jid: str | None
    queue: str | None


@dataclass
class Recorder:
    """Workers that record every call; optionally they fail or block."""

    runs: list[Run] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def worker(self, name: str, *, fail: bool = False,
               gate: threading.Event | None = None) -> Callable[..., None]:
        def perform(*args: Any) -> None:
            job = current_job()
            assert job is not None
            with self.lock:
                self.runs.append(Run(name, list(args), job.raw, job.jid, job.queue))
            if gate is not None:
                gate.wait(15)
            if fail:
                raise RuntimeError(f"{name} failure for job {args[0] if args else '?'}")

        return perform

    def count(self) -> int:
        with self.lock:
            return len(self.runs)

    def snapshot(self) -> list[Run]:
        with self.lock:
            return list(self.runs)

    def jids(self) -> list[str | None]:
        return [r.jid for r in self.snapshot()]


@pytest.fixture
def runtime(make_config: Callable[..., Config]) -> Iterator[NodeFactory]:
    rt = NodeFactory(make_config)
    yield rt
    rt.close()


def fixture_payloads() -> list[bytes]:
    """Every raw job of the fixtures: queue lists, retry/dead members, in-flight jobs."""
    payloads = [line for name in QUEUE_FILES for line in fixture_lines(name)]
    payloads += [member for name in ZSET_FILES for member, _ in fixture_members(name)]
    for version in EXQ_VERSIONS:
        inflight = fixture_json(f"{version}/inflight.json")
        payloads += [m.encode() for m in inflight["backup_list"]["members_lrange_order"]]
    sidekiq = fixture_json("sidekiq-6.4.1/inflight.json")["workers_hash"]["fields_hgetall_order"]
    payloads += [json.loads(v)["payload"].encode() for v in sidekiq.values()]
    return payloads


# -- 1. every fixture payload runs once, with its exact args --------------------------


def test_every_fixture_payload_runs_once_with_its_exact_args(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given every raw payload Exq 0.13.2 / 0.23.0 and Sidekiq 6.4.1 wrote, LPUSHed
    # unchanged into the queue its own "queue" field names
    payloads = fixture_payloads()
    decoded = [json.loads(p) for p in payloads]
    assert {d["class"] for d in decoded} == FIXTURE_CLASSES
    queues = sorted({d["queue"] for d in decoded})
    assert queues == ["default", "fxq"]
    for raw, job in zip(payloads, decoded, strict=True):
        redis_client.lpush(keys.queue(job["queue"]), raw)
    recorder = Recorder()
    workers = {name.replace("::", "."): recorder.worker(name) for name in FIXTURE_CLASSES}

    # When a node consumes those queues
    exq = runtime.start(runtime.config(queues=queues), workers)
    wait_for(lambda: exq.acks.totals["processed"] == len(payloads), what="all jobs acked")

    # Then each payload ran exactly as many times as it was pushed, with exactly its args
    runs = recorder.snapshot()
    assert Counter(r.raw for r in runs) == Counter(payloads)
    expected_args = {raw: typed(job["args"]) for raw, job in zip(payloads, decoded, strict=True)}
    for run in runs:
        assert typed(run.args) == expected_args[run.raw], run.raw
        assert run.worker == json.loads(run.raw)["class"]
    # ... and nothing is left behind: no retry, no death, no backup, counts exact
    assert exq.acks.totals == {"processed": len(payloads), "failed": 0}
    assert redis_client.zcard(keys.retry) == 0
    assert redis_client.zcard(keys.dead) == 0
    for queue in queues:
        assert redis_client.llen(keys.queue(queue)) == 0
        assert redis_client.llen(keys.backup(node_id, queue)) == 0
    assert redis_client.get(keys.stat("processed")) == str(len(payloads)).encode()


# -- 2. Sidekiq extra fields survive a retry and a death ---------------------------------


def test_sidekiq_extra_fields_survive_retry_and_death(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Sidekiq jobs carrying tags/bid/custom and backtrace (lines 8 and 9), whose
    # worker always fails, on a node allowing one retry
    lines = fixture_lines("sidekiq-6.4.1/enqueued.jsonl")
    originals = [json.loads(lines[7]), json.loads(lines[8])]
    assert {"tags", "bid", "custom"} <= originals[0].keys()
    assert "backtrace" in originals[1]
    for raw in (lines[7], lines[8]):
        redis_client.lpush(keys.queue("default"), raw)
    recorder = Recorder()
    config = runtime.config(queues=["default"], max_retries=1, scheduler_poll_timeout=20)
    exq = runtime.start(config, {"NoopWorker": recorder.worker("NoopWorker", fail=True)})

    def extras(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: entry.get(k) for k in ("tags", "bid", "custom", "created_at", "backtrace")}

    # When both fail once
    retries = wait_for(lambda: len(decoded_members(redis_client, keys.retry)) == 2
                       and decoded_members(redis_client, keys.retry), what="2 retry entries")

    # Then the retry entries keep every extra field with its value
    by_jid = {o["jid"]: o for o in originals}
    for entry in retries:
        assert extras(entry) == extras(by_jid[entry["jid"]])
        assert entry["retry_count"] == 1
        assert entry["error_class"] == "RuntimeError"

    # When they are due again and fail a second time (out of retries)
    for member in redis_client.zrange(keys.retry, 0, -1):
        redis_client.zadd(keys.retry, {member: 0}, xx=True)
    dead = wait_for(lambda: len(decoded_members(redis_client, keys.dead)) == 2
                    and decoded_members(redis_client, keys.dead), what="2 dead entries")

    # Then the dead entries still carry them, and the jobs ran exactly twice each
    for entry in dead:
        assert extras(entry) == extras(by_jid[entry["jid"]])
        assert entry["retry_count"] == 1
    assert Counter(recorder.jids()) == {o["jid"]: 2 for o in originals}
    assert redis_client.zcard(keys.retry) == 0
    wait_for(lambda: exq.acks.totals["failed"] == 4, what="4 failures counted")


# -- 3. Redis shapes compared with Exq 0.23.0's --------------------------------------


def test_stat_keys_have_the_shapes_and_values_of_exq(
    runtime: NodeFactory, redis_client: redis.Redis, namespace: str, node_id: str
) -> None:
    # Given 5 succeeding and 3 failing jobs (max_retries 0), as in the stats fixture
    fixture = fixture_json("exq-0.23.0/stats.json")
    recorder = Recorder()
    workers = {"Bench.NoopWorker": recorder.worker("Bench.NoopWorker"),
               "Bench.FailingWorker": recorder.worker("Bench.FailingWorker", fail=True)}
    exq = runtime.start(runtime.config(queues=["fxq"], concurrency=1), workers)
    for i in range(1, 6):
        exq.enqueue("fxq", "Bench.NoopWorker", [i, "ok"])
    for i in range(6, 9):
        exq.enqueue("fxq", "Bench.FailingWorker", [i, "fail"], max_retries=0)

    # When all ran and the stats are flushed
    wait_for(lambda: exq.acks.totals == {"processed": 5, "failed": 3}, what="stats flushed")

    # Then the stat keys are exactly Exq's shapes, with Exq's values and TTLs
    def shapes_and_values(entries: dict[str, tuple[int, int]], ns: str, node: str
                          ) -> dict[str, int]:
        out: Counter[str] = Counter()
        for key, (value, _) in entries.items():
            out[key_shape(key, ns, node)] += value
        return dict(out)

    expected = {k: (int(v["value"]), v["ttl"]) for k, v in fixture["stat_keys"].items()}
    stat_keys = [k for k in key_names(redis_client, namespace) if ":stat:" in k]
    actual = {k: (int(redis_client.get(k) or 0), redis_client.ttl(k)) for k in stat_keys}
    assert shapes_and_values(actual, namespace, node_id) == \
        shapes_and_values(expected, fixture["namespace"], "vm")
    assert shapes_and_values(expected, fixture["namespace"], "vm") == {
        "stat:failed": 3, "stat:failed:<D>": 3, "stat:failed_rt:<T>": 3,
        "stat:processed": 5, "stat:processed:<D>": 5, "stat:processed_rt:<T>": 5,
    }
    for key, (_, ttl) in actual.items():
        if "_rt:" in key:
            assert 1 <= ttl <= 120, (key, ttl)
        else:
            assert ttl == -1, (key, ttl)
    assert recorder.count() == 8


def test_retry_and_dead_entries_have_the_fields_of_exq(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq's retry and dead entries for the same kind of failing job
    fixture_retry = [json.loads(m) for m, _ in fixture_members("exq-0.23.0/retry.jsonl")]
    fixture_dead = [json.loads(m) for m, _ in fixture_members("exq-0.23.0/dead.jsonl")]
    retry_fields = {frozenset(e) for e in fixture_retry}
    dead_fields = {frozenset(e) for e in fixture_dead}
    assert len(retry_fields) == 1
    assert len(dead_fields) == 1
    recorder = Recorder()
    workers = {"Bench.FailingWorker": recorder.worker("Bench.FailingWorker", fail=True)}
    exq = runtime.start(runtime.config(queues=["fxq"]), workers)

    # When one job with retries left and one without fail
    retry_jid = exq.enqueue("fxq", "Bench.FailingWorker", [1, "retry-me"], max_retries=3)
    dead_jid = exq.enqueue("fxq", "Bench.FailingWorker", [2, "dead-me"], max_retries=0)
    wait_for(lambda: redis_client.zcard(keys.retry) == 1 and redis_client.zcard(keys.dead) == 1,
             what="one retry and one dead entry")

    # Then both entries have exactly Exq's 13 fields; error_class is the Python
    # exception's name (documented difference from Exq's null / "ExqGenericError")
    [retry_entry] = decoded_members(redis_client, keys.retry)
    [dead_entry] = decoded_members(redis_client, keys.dead)
    assert {frozenset(retry_entry)} == retry_fields
    assert {frozenset(dead_entry)} == dead_fields
    assert retry_entry["jid"] == retry_jid
    assert retry_entry["args"] == [1, "retry-me"]
    assert retry_entry["retry_count"] == 1
    assert retry_entry["error_class"] == "RuntimeError"
    assert retry_entry["error_message"] == "Bench.FailingWorker failure for job 1"
    assert isinstance(retry_entry["failed_at"], float)
    assert retry_entry["failed_at"] == retry_entry["retried_at"]
    assert dead_entry["jid"] == dead_jid
    assert dead_entry["retry_count"] == 0
    assert dead_entry["error_class"] == "RuntimeError"
    assert dead_entry["error_message"] == "Bench.FailingWorker failure for job 2"
    for entry in (retry_entry, dead_entry):
        assert entry["finished_at"] is None
        assert entry["processor"] is None
    # the retry score lies in the future by Exq's first backoff (16..76 s)
    [(_, score)] = redis_client.zrange(keys.retry, 0, -1, withscores=True)
    assert 15 < score - retry_entry["retried_at"] <= 76


def test_in_flight_keys_have_the_shapes_of_exq(
    runtime: NodeFactory, redis_client: redis.Redis, enqueuer: Enqueuer, keys: Keys,
    namespace: str, node_id: str
) -> None:
    # Given two slow jobs, as in Exq's inflight fixture (concurrency 2)
    fixture = fixture_json("exq-0.23.0/inflight.json")
    release = runtime.gate()
    recorder = Recorder()
    jids = [enqueuer.enqueue("fxq", "Bench.SlowWorker", [i, "slow"]) for i in (1, 2)]
    raws = list(reversed(redis_client.lrange(keys.queue("fxq"), 0, -1)))  # enqueue order
    workers = {"Bench.SlowWorker": recorder.worker("Bench.SlowWorker", gate=release)}
    exq = runtime.start(runtime.config(queues=[("fxq", 2)]), workers)
    workers_key = keys.workers(node_id)

    # When both run, have outlived a stats flush, and the node has pinged
    wait_for(lambda: redis_client.hlen(workers_key) == 2, what="workers hash with 2 jobs")
    exq.pinger.run_once()

    # Then the keys present are Exq's shapes (plus exq-fast's documented additions)
    shapes = {key_shape(k, namespace, node_id) for k in key_names(redis_client, namespace)}
    exq_shapes = {key_shape(k, fixture["namespace"], "vm") for k in fixture["key_names"]}
    assert exq_shapes == {"processes", "queue:backup::<node>::fxq", "queues", "<node>",
                          "<node>:workers"}
    assert exq_shapes <= shapes
    # the Sidekiq >= 6.5 work hash (docs/wire-format.md §8.3), the stats-batch marker
    # and the node registry are additions; the heartbeat is Exq's (opt-in there)
    assert shapes - exq_shapes <= {"<node>:work", "<node>:stats-batch", "nodes", "heartbeats"}
    # the backup list holds the raw jobs, newest fetched first, as RPOPLPUSH leaves them
    assert redis_client.lrange(keys.backup(node_id, "fxq"), 0, -1) == list(reversed(raws))
    assert redis_client.smembers(keys.processes) == {node_id.encode()}
    node_hash = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.node(node_id))
                 .items()}
    assert set(fixture["node_hash"]["fields_hgetall_order"]) <= set(node_hash)
    assert node_hash["busy"] == "2"
    assert node_hash["quiet"] == "false"
    assert isinstance(float(node_hash["beat"]), float)
    assert json.loads(node_hash["info"])["identity"] == node_id
    assert 55 <= redis_client.ttl(keys.node(node_id)) <= 60
    exq_record_fields = {frozenset(json.loads(v)) for v in
                         fixture["workers_hash"]["fields_hgetall_order"].values()}
    records = {k.decode(): json.loads(v) for k, v in redis_client.hgetall(workers_key).items()}
    for pid, record in records.items():
        assert {frozenset(record)} == exq_record_fields
        assert record["pid"] == pid
        assert record["host"] == node_id
        assert record["queue"] == "fxq"
        assert isinstance(record["run_at"], float)
        assert isinstance(record["payload"], str)  # double-encoded, as Exq
    assert sorted(json.loads(r["payload"])["jid"] for r in records.values()) == sorted(jids)

    # When both jobs finish
    release.set()
    wait_for(lambda: exq.acks.totals["processed"] == 2, what="both jobs acked")

    # Then the backup list and the workers hash are gone, the registry stays
    names = key_names(redis_client, namespace)
    assert keys.backup(node_id, "fxq") not in names
    assert workers_key not in names
    assert keys.processes in names
    assert redis_client.get(keys.stat("processed")) == b"2"


# -- 4. per-queue concurrency ---------------------------------------------------------


def test_per_queue_concurrency_is_reached_and_never_exceeded(
    runtime: NodeFactory, enqueuer: Enqueuer
) -> None:
    # Given two queues limited to 2 and 3, with 40 jobs of ~20 ms each
    limits = {"two": 2, "three": 3}
    lock = threading.Lock()
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    done: Counter[str] = Counter()

    def slow(queue: str) -> None:
        with lock:
            running[queue] += 1
            peak[queue] = max(peak[queue], running[queue])
        time.sleep(0.02)
        with lock:
            running[queue] -= 1
            done[queue] += 1

    enqueuer.enqueue_all([(q, "Limit.Slow", [q]) for q in limits for _ in range(40)])

    # When a node runs them
    runtime.start(runtime.config(queues=list(limits.items())), {"Limit.Slow": slow})
    wait_for(lambda: done == {"two": 40, "three": 40}, timeout=15, what="80 jobs done")

    # Then each queue ran exactly as many jobs at once as its limit, never more
    assert dict(peak) == limits


# -- 5. backup recovery at start --------------------------------------------------------


def test_backup_jobs_run_first_and_in_order_at_start(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given 30 jobs an earlier process with this node id fetched (RPOPLPUSH order:
    # the first fetched is at the tail) and 5 jobs still queued
    backup = [exq_job("q", "Order.Job", [f"backup-{i}"], f"b{i}") for i in range(1, 31)]
    queued = [exq_job("q", "Order.Job", [f"queued-{i}"], f"q{i}") for i in range(1, 6)]
    for raw in backup:
        redis_client.lpush(keys.backup(node_id, "q"), raw)
    for raw in queued:
        redis_client.lpush(keys.queue("q"), raw)
    order: list[str] = []

    def record(name: str) -> None:
        order.append(name)

    # When a node with that node id starts (concurrency 1)
    runtime.start(runtime.config(queues=[("q", 1)]), {"Order.Job": record})
    wait_for(lambda: len(order) == 35, what="35 jobs run")

    # Then the recovered jobs run first, oldest fetched first, then the queued ones
    assert order == [f"backup-{i}" for i in range(1, 31)] + [f"queued-{i}" for i in range(1, 6)]
    wait_for(lambda: redis_client.llen(keys.backup(node_id, "q")) == 0, what="backup acked")


# -- 6. graceful stop -----------------------------------------------------------------------


def test_job_outliving_shutdown_timeout_is_put_back_uncounted_and_runs_at_next_start(
    runtime: NodeFactory, redis_client: redis.Redis, enqueuer: Enqueuer, keys: Keys, node_id: str
) -> None:
    # Given a job that blocks longer than the shutdown timeout (300 ms)
    release = runtime.gate()
    recorder = Recorder()
    config = runtime.config(queues=["q"], shutdown_timeout=300)
    old = runtime.start(config, {"Stop.Long": recorder.worker("Stop.Long", gate=release)})
    jid = enqueuer.enqueue("q", "Stop.Long", ["long"])
    wait_for(lambda: recorder.count() == 1, what="the long job started")
    raw = recorder.snapshot()[0].raw

    # When the node stops
    started = time.monotonic()
    assert old.stop() is False
    elapsed = time.monotonic() - started

    # Then stop gave up after about the timeout and put the job back at the front of its
    # queue, uncounted: a graceful stop is no crash (no recovery count, no suspect)
    # (the bound is the assertion: stop does not wait for the job, held up to 15 s)
    assert elapsed < 3
    assert redis_client.llen(keys.backup(node_id, "q")) == 0
    assert redis_client.lrange(keys.queue("q"), 0, -1) == [raw]
    assert redis_client.hlen(keys.recoveries) == 0
    assert redis_client.zcard(keys.suspects) == 0
    # And nothing of the node is left registered
    assert not redis_client.hexists(keys.nodes, node_id)
    assert not redis_client.sismember(keys.processes, node_id)

    # When the old job's thread ends (its late completion is not acked) ...
    release.set()
    wait_for(lambda: old.fetcher.busy() == 0, what="old thread done")
    assert redis_client.lrange(keys.queue("q"), 0, -1) == [raw]
    assert redis_client.get(keys.stat("processed")) is None
    # ... and a new node starts
    new = runtime.start(config, {"Stop.Long": recorder.worker("Stop.Long", gate=release)})

    # Then it runs the job again and acks it
    wait_for(lambda: new.acks.totals["processed"] == 1, what="job re-run and acked")
    assert recorder.jids() == [jid, jid]
    assert redis_client.llen(keys.backup(node_id, "q")) == 0
    assert redis_client.llen(keys.queue("q")) == 0


def test_stop_with_short_jobs_returns_true_and_unregisters_the_node(
    runtime: NodeFactory, redis_client: redis.Redis, enqueuer: Enqueuer, keys: Keys, node_id: str
) -> None:
    # Given a running node that processed short jobs and is registered
    recorder = Recorder()
    exq = runtime.start(runtime.config(queues=["q"]), {"Stop.Short": recorder.worker("x")})
    enqueuer.enqueue_all([("q", "Stop.Short", [i]) for i in range(20)])
    wait_for(lambda: recorder.count() == 20, what="20 jobs run")
    wait_for(lambda: redis_client.exists(keys.node(node_id)), what="node registered")
    assert redis_client.sismember(keys.processes, node_id)

    # When it stops
    assert exq.stop() is True

    # Then every job is acked and counted, and the node's keys are gone
    assert exq.acks.totals == {"processed": 20, "failed": 0}
    assert redis_client.get(keys.stat("processed")) == b"20"
    assert redis_client.llen(keys.backup(node_id, "q")) == 0
    assert redis_client.exists(keys.node(node_id), keys.workers(node_id)) == 0
    assert not redis_client.sismember(keys.processes, node_id)


def test_stop_while_redis_is_down_does_not_raise(
    private_redis: RedisServer, runtime: NodeFactory  # in this order: the node stops first
) -> None:
    # Given a running node whose Redis then crashes
    config = runtime.config(redis_url=private_redis.url, queues=["q"], redis_timeout=500)
    exq = runtime.start(config, {})
    wait_for(lambda: exq.pinger.pings > 0, what="the node registered")
    private_redis.kill()
    try:
        # When the node is stopped (SIGTERM during the outage)
        exq.stop(timeout=1)

        # Then stop returns (it has nothing to lose: no job ran) and the node is stopped
        assert exq.stopped.is_set()
    finally:
        private_redis.start()  # so that the teardown can stop the node and the server


# -- 7. subscribe / unsubscribe at run time ---------------------------------------------------


def test_subscribe_and_unsubscribe_at_run_time(
    runtime: NodeFactory, redis_client: redis.Redis, enqueuer: Enqueuer, keys: Keys
) -> None:
    # Given a node consuming only "a", and jobs waiting in "b"
    recorder = Recorder()
    exq = runtime.start(runtime.config(queues=["a"]), {"Sub.Job": recorder.worker("Sub.Job")})
    b_jids = [enqueuer.enqueue("b", "Sub.Job", ["b", i]) for i in range(5)]
    a_jid = enqueuer.enqueue("a", "Sub.Job", ["a", 0])
    wait_for(lambda: a_jid in recorder.jids(), what="the job in a ran")

    # Then the jobs of "b" wait
    assert redis_client.llen(keys.queue("b")) == 5
    assert not set(b_jids) & set(recorder.jids())

    # When the node subscribes to "b" with concurrency 2
    exq.subscribe("b", 2)

    # Then they run
    wait_for(lambda: set(b_jids) <= set(recorder.jids()), what="b jobs ran")
    assert exq.subscriptions() == ["b", "a"]

    # When the node unsubscribes from "a" (and a fetch after it has surely begun)
    exq.unsubscribe("a")
    marker = enqueuer.enqueue("b", "Sub.Job", ["b", "marker"])
    wait_for(lambda: marker in recorder.jids(), what="a fetch after the unsubscribe")
    a_later = [enqueuer.enqueue("a", "Sub.Job", ["a", i]) for i in range(1, 4)]
    b_later = [enqueuer.enqueue("b", "Sub.Job", ["b", i]) for i in range(5, 10)]
    wait_for(lambda: set(b_later) <= set(recorder.jids()), what="later b jobs ran")

    # Then new jobs of "a" stay queued while "b" goes on
    assert not set(a_later) & set(recorder.jids())
    assert redis_client.llen(keys.queue("a")) == 3
    assert exq.subscriptions() == ["b"]


def test_queue_subscribed_at_run_time_gets_its_own_concurrency(
    runtime: NodeFactory, enqueuer: Enqueuer
) -> None:
    # Given a node consuming "a" with concurrency 1, busy with a long job
    release = runtime.gate()
    recorder = Recorder()
    exq = runtime.start(runtime.config(queues=[("a", 1)]),
                        {"Sub.Block": recorder.worker("Sub.Block", gate=release)})
    enqueuer.enqueue("a", "Sub.Block", ["a"])
    wait_for(lambda: recorder.count() == 1, what="the job of a started")

    # When it subscribes to "b" with concurrency 2 and two jobs arrive there
    exq.subscribe("b", 2)
    b_jids = {enqueuer.enqueue("b", "Sub.Block", ["b", i]) for i in range(2)}

    # Then both run now, beside the job of "a" (b's limit is 2, whatever a does; were
    # they held by a's limit, or by each other, none would start before a gate opens)
    wait_for(lambda: b_jids <= set(recorder.jids()), what="both b jobs started")


# -- 8. heartbeat monitor -------------------------------------------------------------------------


def test_heartbeat_monitor_recovers_dead_nodes_and_spares_live_ones(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a dead node D (last beat an hour ago) with 10 jobs in its backup of a queue
    # A consumes and 10 in a queue A does not consume, and a live node L that beats
    # every 50 ms with 10 jobs in its backup
    dead, live = f"{node_id}-dead", f"{node_id}-live"
    redis_client.sadd(keys.queues, "work", "other")
    d_work = [exq_job("work", "Hb.Job", ["d", i], f"d-work-{i}") for i in range(10)]
    d_other = [exq_job("other", "Hb.Job", ["d", i], f"d-other-{i}") for i in range(10)]
    l_work = [exq_job("work", "Hb.Job", ["l", i], f"l-work-{i}") for i in range(10)]
    redis_client.lpush(keys.backup(dead, "work"), *d_work)
    redis_client.lpush(keys.backup(dead, "other"), *d_other)
    redis_client.lpush(keys.backup(live, "work"), *l_work)
    redis_client.hset(keys.workers(dead), "#PID<0.1.0>", "{}")
    redis_client.zadd(keys.heartbeats, {dead: round(time.time() - 3600, 3)})
    stop_beating = threading.Event()

    def beat_live() -> None:
        while not stop_beating.is_set():
            redis_client.zadd(keys.heartbeats, {live: round(time.time(), 3)})
            stop_beating.wait(0.05)

    beater = threading.Thread(target=beat_live, daemon=True)
    beater.start()
    recorder = Recorder()
    try:
        config = runtime.config(queues=["work"], heartbeat_enable=True, heartbeat_interval=200,
                                missed_heartbeats_allowed=1)
        a = runtime.start(config, {"Hb.Job": recorder.worker("Hb.Job")})

        # When A's heartbeat monitor runs
        a.heartbeat.run_once()

        # Then D's jobs of "work" run on A, D's jobs of "other" are back in their queue
        wait_for(lambda: sorted(recorder.jids()) == sorted(f"d-work-{i}" for i in range(10)),
                 what="D's work jobs ran")
        assert sorted(redis_client.lrange(keys.queue("other"), 0, -1)) == sorted(d_other)
        assert redis_client.exists(keys.backup(dead, "work"), keys.backup(dead, "other"),
                                   keys.workers(dead)) == 0
        assert redis_client.zscore(keys.heartbeats, dead) is None

        # ... and L, alive, keeps its backup however often the monitor runs
        for _ in range(3):
            a.heartbeat.run_once()
        assert redis_client.lrange(keys.backup(live, "work"), 0, -1) == l_work[::-1]
        assert redis_client.zscore(keys.heartbeats, live) is not None
        assert redis_client.zscore(keys.heartbeats, node_id) is not None
    finally:
        stop_beating.set()
        beater.join()


# -- 9. Redis restart mid-run ----------------------------------------------------------------


def test_redis_restart_mid_run_loses_nothing_and_counts_converge(
    runtime: NodeFactory
) -> None:
    # Given a persistent private Redis (AOF, fsync always) with 3000 no-op jobs, whose
    # worker records every execution; after a third of them, the jobs that start hold
    # at a gate, so the crash comes with 20 jobs running and no fetch in flight (a crash
    # during a fetch is test_jobs_of_a_fetch_whose_reply_was_lost_still_run)
    total, concurrency = 3000, 20
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
    client = redis.Redis.from_url(server.url)
    lock = threading.Lock()
    seen: set[str] = set()
    executions = 0
    held = 0
    crash_gate = runtime.gate()

    def noop(i: int) -> None:
        nonlocal executions, held
        job = current_job()
        assert job is not None and job.jid is not None
        with lock:
            seen.add(job.jid)
            executions += 1
            hold = executions > total // 3 and not crash_gate.is_set()
            held += hold
        if hold:
            crash_gate.wait(15)

    def holding() -> int:
        with lock:
            return held

    try:
        config = runtime.config(redis_url=server.url, namespace="exq", node_id="restart-node",
                                queues=[("jobs", concurrency)], redis_timeout=1000)
        keys = Keys("exq")
        with Enqueuer(config) as enq:
            jids = {str(j) for j in enq.enqueue_all([("jobs", "Restart.Noop", [i])
                                                     for i in range(total)])}
        assert len(jids) == total
        exq = runtime.start(config, {"Restart.Noop": noop})

        # When Redis crashes with 20 jobs running, they finish during the outage, and
        # Redis comes back on the same port
        wait_for(lambda: holding() == concurrency, timeout=15, what="20 jobs at the gate")
        server.kill()
        crash_gate.set()
        wait_for(lambda: {"fetch", "stats_flush"} <= set(exq.redis_errors),
                 what="the node failing to ack and to fetch")
        server.start()

        # Then every job ran (at least once), and the counters in Redis equal the
        # executions exactly
        wait_for(lambda: len(seen) == total, timeout=15, what="every jid ran")
        wait_for(lambda: exq.acks.pending() == 0 and exq.fetcher.busy() == 0,
                 what="all acks flushed")
        assert seen == jids
        assert int(client.get(keys.stat("processed")) or 0) == executions
        assert exq.acks.totals["processed"] == executions
        assert client.llen(keys.backup("restart-node", "jobs")) == 0
        assert client.llen(keys.queue("jobs")) == 0
        assert exq.stop() is True
    finally:
        for node in runtime.nodes:
            node.stop(timeout=5)  # before its Redis goes away
        client.close()
        server.stop()


class DropReplyProxy:
    """A TCP proxy to Redis that, once, swallows the reply to the first command
    containing ``trigger`` and closes that connection (the command did run)."""

    def __init__(self, target: tuple[str, int], trigger: bytes) -> None:
        self.target = target
        self.trigger = trigger
        self.armed = True
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [downstream, upstream]
            pending = threading.Event()  # the trigger went up: drop the next reply
            for target, args in ((self._up, (downstream, upstream, pending)),
                                 (self._down, (upstream, downstream, pending))):
                thread = threading.Thread(target=target, args=args, daemon=True)
                self.threads.append(thread)
                thread.start()

    def _up(self, src: socket.socket, dst: socket.socket, pending: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    if self.armed and self.trigger in data:
                        self.armed = False
                        pending.set()
                dst.sendall(data)
        except OSError:
            pass
        _shut(dst)

    def _down(self, src: socket.socket, dst: socket.socket, pending: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if pending.is_set():
                    self.dropped.set()
                    break  # the reply is lost with the connection
                dst.sendall(data)
        except OSError:
            pass
        _shut(dst)
        _shut(src)

    def close(self) -> None:
        _shut(self.listener)  # wakes the blocked accept()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                _shut(sock)
                sock.close()
        for thread in self.threads:
            thread.join(5)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def test_jobs_of_a_fetch_whose_reply_was_lost_still_run(
    runtime: NodeFactory, redis_url: str, redis_client: redis.Redis, enqueuer: Enqueuer,
    keys: Keys, node_id: str
) -> None:
    # Given 10 queued jobs and a connection that loses the reply to the first fetch
    # after Redis ran it -- what a crash or a network cut at the wrong moment does
    jids = {str(enqueuer.enqueue("q", "Lost.Job", [i])) for i in range(10)}
    upstream = urlsplit(redis_url)
    proxy = DropReplyProxy((upstream.hostname or "127.0.0.1", upstream.port or 6379),
                           scripts.fetch.sha.encode())
    recorder = Recorder()
    try:
        url = f"redis://127.0.0.1:{proxy.port}{upstream.path}"
        runtime.start(runtime.config(redis_url=url, queues=[("q", 5)]),
                      {"Lost.Job": recorder.worker("Lost.Job")})
        assert proxy.dropped.wait(10)

        # Then the node, which carries on, still runs every job while it lives (unless
        # reconciled, the lost fetch's jobs would sit in the backup list until a restart)
        wait_for(lambda: set(recorder.jids()) >= jids, what="every job ran")
        wait_for(lambda: redis_client.llen(keys.backup(node_id, "q")) == 0, what="backup acked")
    finally:
        for node in runtime.nodes:
            node.stop(timeout=5)  # before the proxy goes away
        proxy.close()


# -- 10. poison payloads at scale ------------------------------------------------------------


def malformed(i: int) -> bytes:
    """The i-th of eight kinds of payload that cannot be a job, each unique."""
    kinds: Sequence[bytes] = (
        f"not json at all {i}".encode(),
        f'{{"class":"Poison.Ok","args":[{i}'.encode(),  # truncated
        f"[{i}]".encode(),
        f'"string {i}"'.encode(),
        compact({"args": [i], "jid": f"no-class-{i}"}),
        compact({"class": i, "args": []}),
        compact({"class": "Poison.Ok", "args": {"i": i}}),
        b"\xff\xfe" + str(i).encode(),  # not UTF-8
    )
    return kinds[i % len(kinds)]


def test_poison_payloads_go_to_dead_and_valid_jobs_run_once(
    runtime: NodeFactory, redis_client: redis.Redis, enqueuer: Enqueuer, keys: Keys, node_id: str
) -> None:
    # Given 200 malformed payloads interleaved with 200 valid jobs
    bad = [malformed(i) for i in range(200)]
    good = [exq_job("poison", "Poison.Ok", [i], f"ok-{i}") for i in range(200)]
    for raw_bad, raw_good in zip(bad, good, strict=True):
        redis_client.lpush(keys.queue("poison"), raw_good, raw_bad)
    recorder = Recorder()

    # When a node consumes them
    exq = runtime.start(runtime.config(queues=[("poison", 10)]),
                        {"Poison.Ok": recorder.worker("Poison.Ok")})
    wait_for(lambda: exq.acks.totals == {"processed": 200, "failed": 200}, timeout=15,
             what="400 payloads handled")

    # Then every valid job ran once, every malformed one is in the dead set, verbatim
    assert Counter(recorder.jids()) == {f"ok-{i}": 1 for i in range(200)}
    dead = decoded_members(redis_client, keys.dead)
    assert len(dead) == 200
    kept: list[bytes] = []
    for entry in dead:
        assert entry["class"] == "ExqFast.InvalidPayload"
        assert entry["error_message"]
        if "payload_base64" in entry:
            kept.append(base64.b64decode(entry["payload_base64"]))
        else:
            kept.append(entry["args"][0].encode())
    assert sorted(kept) == sorted(bad)
    assert redis_client.llen(keys.backup(node_id, "poison")) == 0
    assert redis_client.llen(keys.queue("poison")) == 0

    # ... and the node is still running
    jid = enqueuer.enqueue("poison", "Poison.Ok", ["after"])
    wait_for(lambda: jid in recorder.jids(), what="a job after the poison")
    assert not exq.stopped.is_set()


def test_subscribing_at_run_time_never_runs_a_job_twice(
    runtime: NodeFactory, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a running node, and 40 queues of 25 waiting jobs each that it does not consume
    config = runtime.config(queues=["idle"], poll_timeout=1)
    recorder = Recorder()
    exq = runtime.start(config, {"R": recorder.worker("R")})
    queues = [f"sub{n}" for n in range(40)]
    enqueuer.enqueue_all([(q, "R", [f"{q}-{i}"]) for q in queues for i in range(25)])
    # When it subscribes to them one after the other while it fetches
    for queue in queues:
        exq.subscribe(queue, 5)
    # Then every job runs exactly once: a subscribe's recovery of the queue's backup
    # list never puts back jobs the fetcher has just moved there
    wait_for(lambda: stat(redis_client, keys, "processed") >= 1000, timeout=30,
             what="1000 jobs processed")
    wait_for(lambda: all(redis_client.llen(keys.queue(q)) == 0 for q in queues),
             what="every queue drained")
    exq.stop()
    counts = Counter(recorder.jids())
    assert len(counts) == 1000
    assert [jid for jid, n in counts.items() if n != 1] == []
    assert stat(redis_client, keys, "processed") == 1000
