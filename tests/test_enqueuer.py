"""Enqueuer: the bytes, keys, scores and locks Exq's enqueuer writes, on a real Redis."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis

from exq_fast import Config, Conflict, Enqueuer
from exq_fast.embedded import RedisServer
from exq_fast.keys import Keys
from tests.conftest import fixture_json, fixture_lines, wait_for

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
EXQ_JOB = json.loads(fixture_lines("exq-0.23.0/enqueued.jsonl")[0])
EXQ_UNIQUE_JOB = json.loads(fixture_lines("exq-0.23.0/enqueued.jsonl")[9])


def queued(client: redis.Redis, keys: Keys, queue: str) -> list[bytes]:
    """The members of a queue in enqueue order (LRANGE reversed, as the fixtures)."""
    return list(reversed(client.lrange(keys.queue(queue), 0, -1)))


def test_enqueued_job_has_exqs_fields_types_and_order(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    before = time.time()
    jid = enqueuer.enqueue("fxq", "Bench.NoopWorker", [1, "two"])
    [raw] = queued(redis_client, keys, "fxq")
    job = json.loads(raw)
    assert list(job) == list(EXQ_JOB)  # same keys, same (alphabetical) order
    assert {k: type(v) for k, v in job.items()} == {k: type(v) for k, v in EXQ_JOB.items()}
    assert job == {**EXQ_JOB, "jid": jid, "enqueued_at": job["enqueued_at"]}
    assert UUID4.match(jid)
    assert re.search(rb'"enqueued_at":\d+\.\d+,', raw)  # a JSON float
    assert before - 1 <= job["enqueued_at"] <= time.time() + 1
    assert b" " not in raw
    assert redis_client.smembers(keys.queues) == {b"fxq"}


def test_raw_bytes_match_exq_for_the_same_job(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    exq_raw = fixture_lines("exq-0.23.0/enqueued.jsonl")[1]
    exq = json.loads(exq_raw)
    enqueuer.enqueue(exq["queue"], exq["class"], exq["args"], jid=exq["jid"])
    [raw] = queued(redis_client, keys, exq["queue"])
    ours = re.sub(rb'"enqueued_at":[0-9.e+]+', b"", raw)
    theirs = re.sub(rb'"enqueued_at":[0-9.e+]+', b"", exq_raw)
    assert ours == theirs


def test_class_names_options_and_order(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    class Registered:
        exq_job_class = "Elixir.MyApp.Registered"

    enqueuer.enqueue("q", "Elixir.MyApp.Worker", [])
    enqueuer.enqueue("q", "MyWorker/perform", [], max_retries=0)
    enqueuer.enqueue("q", Registered, [], jid="fx-custom-jid-0001")
    jobs = [json.loads(raw) for raw in queued(redis_client, keys, "q")]
    assert [j["class"] for j in jobs] == ["MyApp.Worker", "MyWorker/perform", "MyApp.Registered"]
    assert [j["retry"] for j in jobs] == [25, 0, 25]
    assert jobs[2]["jid"] == "fx-custom-jid-0001"


def test_config_max_retries_is_the_default(make_config: object, redis_client: redis.Redis,
                                            keys: Keys) -> None:
    with Enqueuer(make_config(max_retries=3)) as enq:  # type: ignore[operator]
        enq.enqueue("q", "W", [])
    assert json.loads(queued(redis_client, keys, "q")[0])["retry"] == 3


def test_enqueue_at_scores_like_exq(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    exq = {json.loads(r["member"])["args"][0]: r for r in
           map(json.loads, fixture_lines("exq-0.23.0/scheduled.jsonl"))}
    enqueuer.enqueue_at("fxq", datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
                        "Bench.NoopWorker", [2, "at"])
    enqueuer.enqueue_at("fxq", datetime(2030, 1, 2, 3, 4, 5), "Bench.NoopWorker", [3, "at"])
    members = redis_client.zrange(keys.schedule, 0, -1, withscores=True)
    assert [score for _, score in members] == [float(exq[3]["score"]), float(exq[2]["score"])]
    for member, score in members:
        assert json.loads(member)["enqueued_at"] == score
    assert b'"enqueued_at":1893553445.0,' in members[0][0]
    assert not redis_client.exists(keys.queue("fxq"))


def test_enqueue_in_scores_now_plus_seconds(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    before = time.time()
    jid = enqueuer.enqueue_in("q", 3600, "W", [1, "in"])
    [(member, score)] = redis_client.zrange(keys.schedule, 0, -1, withscores=True)
    assert json.loads(member)["jid"] == jid
    assert before + 3600 <= score <= time.time() + 3600


def test_unique_conflict_writes_nothing(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    first = enqueuer.enqueue("fxq", "Bench.NoopWorker", [10, "unique"], unique_for=60)
    second = enqueuer.enqueue("fxq", "Bench.NoopWorker", [10, "unique"], unique_for=60)
    assert isinstance(first, str)
    assert second == Conflict(first)
    [raw] = queued(redis_client, keys, "fxq")
    job = json.loads(raw)
    # Exq's own token for the same queue, class and args (unique_locks fixture).
    assert job["unique_token"] == EXQ_UNIQUE_JOB["unique_token"]
    assert list(job) == list(EXQ_UNIQUE_JOB)
    assert job["unique_until"] == "success" and job["unique_for"] == 60
    assert job["unlocks_at"] == pytest.approx(job["enqueued_at"] + 60)
    lock = keys.unique(job["unique_token"])
    assert redis_client.get(lock) == first.encode()
    exq_lock = next(iter(fixture_json("exq-0.23.0/unique_locks.json")["keys"].values()))
    assert exq_lock["ttl"] == redis_client.ttl(lock) == 60
    assert 59000 < redis_client.pttl(lock) <= 60000


def test_unique_lock_expires(enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys) -> None:
    first = enqueuer.enqueue("q", "W", [1], unique_for=0.3, unique_token="tok")
    assert isinstance(enqueuer.enqueue("q", "W", [1], unique_for=0.3, unique_token="tok"),
                      Conflict)
    wait_for(lambda: not redis_client.exists(keys.unique("tok")), what="the lock expired")
    third = enqueuer.enqueue("q", "W", [1], unique_for=0.3, unique_token="tok")
    assert isinstance(third, str) and third != first
    assert len(queued(redis_client, keys, "q")) == 2


def test_unique_scheduled_and_until_options(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    at = time.time() + 100
    jid = enqueuer.enqueue_at("q", at, "W", [], unique_for=60, unique_until="start")
    [member] = redis_client.zrange(keys.schedule, 0, -1)
    job = json.loads(member)
    assert job["unique_until"] == "start"
    assert job["unlocks_at"] == pytest.approx(at + 60)
    # The lock lasts until the scheduled time plus unique_for.
    assert redis_client.pttl(keys.unique(job["unique_token"])) > 150_000
    assert enqueuer.enqueue("q", "W", [], unique_for=60) == Conflict(str(jid))


def test_enqueue_all_mixes_immediate_scheduled_and_conflicts(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    held = enqueuer.enqueue("a", "W", ["u"], unique_for=60)
    results = enqueuer.enqueue_all([
        ("a", "W", [1]),
        ("b", "W", [2], {"in": 60}),
        ("a", "W", ["u"], {"unique_for": 60}),
        ("c", "W", [3], {"at": datetime(2030, 1, 1, tzinfo=UTC), "jid": "mine"}),
        ("a", "W", [4], {"max_retries": 2}),
    ])
    assert results[2] == Conflict(str(held))
    assert results[3] == "mine"
    assert all(isinstance(r, str) for i, r in enumerate(results) if i != 2)
    assert [json.loads(r)["args"] for r in queued(redis_client, keys, "a")] == [["u"], [1], [4]]
    scheduled = redis_client.zrange(keys.schedule, 0, -1, withscores=True)
    assert [json.loads(m)["jid"] for m, _ in scheduled] == [results[1], "mine"]
    assert scheduled[1][1] == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert redis_client.smembers(keys.queues) == {b"a"}
    assert enqueuer.enqueue_all([]) == []


@pytest.mark.parametrize(
    ("args", "options", "error"),
    [
        ("not a list", {}, TypeError),
        ({"a": 1}, {}, TypeError),
        ([object()], {}, ValueError),
        ([float("nan")], {}, ValueError),
        ([], {"bogus": 1}, TypeError),
        ([], {"max_retries": -1}, ValueError),
        ([], {"unique_for": 0}, ValueError),
        ([], {"unique_for": 5, "unique_until": "never"}, ValueError),
        ([], {"jid": ""}, ValueError),
    ],
)
def test_bad_enqueue_arguments_raise_and_write_nothing(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys,
    args: object, options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        enqueuer.enqueue("q", "W", args, **options)  # type: ignore[arg-type]
    assert not redis_client.exists(keys.queue("q"), keys.queues)


def test_bad_queue_and_class(enqueuer: Enqueuer) -> None:
    with pytest.raises(ValueError):
        enqueuer.enqueue("", "W", [])
    with pytest.raises(ValueError):
        enqueuer.enqueue("q", "", [])
    with pytest.raises(TypeError):
        enqueuer.enqueue("q", object(), [])  # type: ignore[arg-type]


def test_enqueue_from_many_threads(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    jids: list[object] = []

    def produce(n: int) -> None:
        jids.extend(enqueuer.enqueue("q", "W", [n, i]) for i in range(100))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(jids)) == 800
    assert redis_client.llen(keys.queue("q")) == 800


def test_empty_namespace_layout_and_noscript_fallback(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    with Enqueuer(Config(redis_url=private_redis.url, namespace="")) as enq:
        enq.enqueue("default", "W", [1])
        client.script_flush()  # as after a Redis restart: the scripts are gone
        enq.enqueue("default", "W", [2])
        enq.enqueue_in("default", 10, "W", [3], unique_for=30, unique_token="t")
        enq.enqueue_all([("default", "W", [4])])
    assert sorted(client.keys("*")) == [b"queue:default", b"queues", b"schedule", b"unique:t"]
    assert client.llen("queue:default") == 3
    client.close()


def test_password_protected_redis(tmp_path: object) -> None:
    password = uuid.uuid4().hex
    with RedisServer(extra_args=("--requirepass", password)) as server:
        with Enqueuer(Config(redis_url=server.url, redis_password=password)) as enq:
            assert isinstance(enq.enqueue("q", "W", []), str)
        with Enqueuer(Config(redis_url=server.url, redis_password="wrong")) as enq, \
                pytest.raises(redis.exceptions.AuthenticationError):
            enq.enqueue("q", "W", [])


# -- concurrent enqueues share round trips ------------------------------------------------


def _script_calls(client: redis.Redis) -> int:
    """EVALSHA + EVAL calls the server has run (a private server: ours alone)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("evalsha", "eval"))


def _in_threads(count: int, call: object) -> tuple[list[object], list[threading.Thread]]:
    """Start ``count`` threads each running ``call(i)``; their results (or exceptions)."""
    results: list[object] = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = call(i)  # type: ignore[operator]
        except BaseException as exc:  # reported to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return results, threads


def test_concurrent_enqueues_share_round_trips_and_each_gets_its_own_result(
    private_redis: RedisServer,
) -> None:
    # Given an enqueuer shared by 16 threads, and a Redis that holds writes for a moment
    # (CLIENT PAUSE, on a private server): calls pile up behind the first round trip
    config = Config(redis_url=private_redis.url, namespace="exq")
    keys = Keys("exq")
    admin = redis.Redis.from_url(private_redis.url)
    with Enqueuer(config) as enqueuer:
        enqueuer.enqueue("warm", "W", [])  # scripts loaded, a connection open
        before = _script_calls(admin)
        admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")

        # When 16 threads enqueue at once: 12 plain jobs (4 of them scheduled), and
        # 4 with the same unique token
        def call(i: int) -> object:
            if i < 8:
                return enqueuer.enqueue("q", "W", [i], jid=f"job-{i}")
            if i < 12:
                return enqueuer.enqueue_in("q", 3600, "W", [i], jid=f"job-{i}")
            return enqueuer.enqueue("q", "W", ["same"], jid=f"job-{i}", unique_for=60)

        results, threads = _in_threads(16, call)
        for thread in threads:
            thread.join(10)
        assert not any(t.is_alive() for t in threads), "a caller hung"

    # Then each caller got its own jid, and of the 4 unique ones exactly one won: the
    # others got a Conflict naming it
    assert results[:12] == [f"job-{i}" for i in range(12)]
    winners = [r for r in results[12:] if isinstance(r, str)]
    assert len(winners) == 1
    assert results[12:].count(Conflict(winners[0])) == 3
    # and Redis holds each written job exactly once, where it belongs
    queued_jids = sorted(json.loads(raw)["jid"] for raw in admin.lrange(keys.queue("q"), 0, -1))
    assert queued_jids == sorted([f"job-{i}" for i in range(8)] + winners)
    scheduled = sorted(json.loads(raw)["jid"] for raw in admin.zrange(keys.schedule, 0, -1))
    assert scheduled == sorted(f"job-{i}" for i in range(8, 12))
    # and the 16 calls took far fewer round trips than 16 (the first, then the rest
    # together, up to a few if some arrived late)
    assert _script_calls(admin) - before <= 4
    admin.close()


def test_a_redis_outage_reaches_every_concurrent_caller_and_nothing_hangs(
    private_redis: RedisServer,
) -> None:
    # Given an enqueuer shared by 8 threads whose Redis is down
    config = Config(redis_url=private_redis.url, namespace="exq", redis_timeout=1000)
    with Enqueuer(config) as enqueuer:
        enqueuer.enqueue("warm", "W", [])
        private_redis.kill()
        # When they all enqueue at once
        results, threads = _in_threads(8, lambda i: enqueuer.enqueue("q", "W", [i]))
        for thread in threads:
            thread.join(30)
        # Then every one of them gets the connection error, none hangs
        assert not any(t.is_alive() for t in threads), "a caller hung"
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results
        # And once Redis is back, enqueueing works again (the combiner is not stuck)
        private_redis.start()
        assert enqueuer.enqueue("q", "W", [1], jid="after") == "after"
