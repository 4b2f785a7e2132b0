"""AckWriter: acks and counters in batches, at most once, converging after outages."""

from __future__ import annotations

import json
import time

import redis

from exq_fast import scripts
from exq_fast.acks import AckWriter
from exq_fast.embedded import RedisServer
from exq_fast.keys import Keys
from tests.conftest import finished, in_flight, put_in_backup


def test_acks_and_counts_reach_redis(redis_client: redis.Redis, keys: Keys) -> None:
    writer = AckWriter(redis_client, keys, "n1")
    flights = [in_flight(keys, "n1", i) for i in range(10)]
    put_in_backup(redis_client, flights)
    for i, flight in enumerate(flights):
        writer.job_started(flight)
        writer.job_done(finished(flight, "processed" if i < 7 else "failed"))
    before = time.time()
    assert writer.flush()
    after = time.time()
    assert redis_client.llen(keys.backup("n1", "q")) == 0
    assert redis_client.get(keys.stat("processed")) == b"7"
    assert redis_client.get(keys.stat("failed")) == b"3"
    rt = redis_client.keys(keys.prefix + "stat:processed_rt:*")
    assert len(rt) == 1 and 0 < redis_client.ttl(rt[0]) <= 120
    # The per-day keys of the flush's UTC day hold the counts and never expire (Exq's).
    # (Both ends of the flush are looked at, in case it straddled midnight.)
    for kind, count in (("processed", b"7"), ("failed", b"3")):
        [day] = {keys.stat_day(kind, before), keys.stat_day(kind, after)} & set(
            k.decode() for k in redis_client.keys(keys.prefix + f"stat:{kind}:*"))
        assert redis_client.get(day) == count
        assert redis_client.ttl(day) == -1
    assert writer.totals == {"processed": 7, "failed": 3}
    assert not redis_client.exists(keys.workers("n1"))


def test_a_job_outliving_a_flush_gets_an_in_progress_record(
    redis_client: redis.Redis, keys: Keys
) -> None:
    writer = AckWriter(redis_client, keys, "n1")
    flight = in_flight(keys, "n1", 1)
    put_in_backup(redis_client, [flight])
    writer.job_started(flight)
    assert writer.flush()
    record = json.loads(redis_client.hget(keys.workers("n1"), flight.field) or b"{}")
    assert record == {"host": "n1", "payload": flight.raw.decode(), "pid": flight.field,
                      "queue": "q", "run_at": 1795867331.25}
    writer.job_done(finished(flight, "processed"))
    assert writer.flush()
    assert not redis_client.exists(keys.workers("n1"))
    assert redis_client.llen(flight.backup) == 0


def test_thousands_of_records_written_and_forgotten_in_one_batch_each(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given 9000 running jobs (a high concurrency) and a batch size that lets them
    # all end in one batch: each record is two arguments of HSET and one of HDEL,
    # beyond what one Lua unpack() takes (8000 values)
    writer = AckWriter(redis_client, keys, "n1", batch_size=10_000)
    flights = [in_flight(keys, "n1", i) for i in range(9000)]
    put_in_backup(redis_client, flights)
    for flight in flights:
        writer.job_started(flight)
    # When a flush records them, and the next acks them all
    assert writer.flush()
    assert redis_client.hlen(keys.workers("n1")) == 9000
    for flight in flights:
        writer.job_done(finished(flight, "processed"))
    assert writer.flush()
    # Then every job is acked and counted and every record is gone
    assert writer.pending() == 0
    assert redis_client.llen(keys.backup("n1", "q")) == 0
    assert redis_client.get(keys.stat("processed")) == b"9000"
    assert not redis_client.exists(keys.workers("n1"))


def test_a_job_ending_within_one_flush_writes_no_record(
    redis_client: redis.Redis, keys: Keys
) -> None:
    writer = AckWriter(redis_client, keys, "n1")
    flight = in_flight(keys, "n1", 1)
    writer.job_started(flight)
    writer.job_done(finished(flight, "processed"))
    batch = writer._build()
    assert batch is not None
    assert "HSET" not in batch.args and "HDEL" not in batch.args
    assert "ACK" in batch.args


def test_writes_go_before_the_ack(redis_client: redis.Redis, keys: Keys) -> None:
    writer = AckWriter(redis_client, keys, "n1")
    flight = in_flight(keys, "n1", 1)
    writer.job_done(finished(flight, "failed", [("ZADD", keys.retry, "1", b"job")]))
    batch = writer._build()
    assert batch is not None
    assert batch.args.index("ZADD") < batch.args.index("ACK")


def test_a_batch_applied_twice_counts_once(redis_client: redis.Redis, keys: Keys) -> None:
    writer = AckWriter(redis_client, keys, "n1")
    flight = in_flight(keys, "n1", 1)
    writer.job_done(finished(flight, "processed"))
    batch = writer._build()
    assert batch is not None
    assert batch.keys[0] == keys.batch_marker("n1")
    scripts.load_all(redis_client)
    assert scripts.apply_batch(redis_client, batch.keys, batch.args) == 0
    # As after a reply lost on the way back: the same batch again.
    assert scripts.apply_batch(redis_client, batch.keys, batch.args) == -1
    assert redis_client.get(keys.stat("processed")) == b"1"


def test_batches_are_capped_at_batch_size(redis_client: redis.Redis, keys: Keys) -> None:
    writer = AckWriter(redis_client, keys, "n1", batch_size=100)
    for i in range(250):
        writer.job_done(finished(in_flight(keys, "n1", i), "processed"))
    sizes = []
    while writer.pending():
        batch = writer._build()
        assert batch is not None
        sizes.append(len(batch.done))
        writer._applied(batch)
    assert sizes == [100, 100, 50]


def test_a_failed_flush_keeps_its_counts_and_converges(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    keys = Keys("exq")
    failures: list[str] = []
    writer = AckWriter(client, keys, "n1", on_error=lambda op, exc: failures.append(op))
    flights = [in_flight(keys, "n1", i) for i in range(20)]
    put_in_backup(client, flights)
    for flight in flights[:10]:
        writer.job_done(finished(flight, "processed"))
    assert writer.flush()
    private_redis.kill()
    for flight in flights[10:]:
        writer.job_done(finished(flight, "processed"))
    assert not writer.flush()
    assert failures == ["stats_flush"] and writer.pending() == 10
    private_redis.start()  # no persistence: the first ten are gone with the restart
    put_in_backup(client, flights[10:])
    assert writer.flush()
    assert client.get(keys.stat("processed")) == b"10"
    assert client.llen(keys.backup("n1", "q")) == 0
    assert writer.totals["processed"] == 20
    client.close()


def test_stop_flushes_what_is_left_and_then_refuses_late_acks(
    redis_client: redis.Redis, keys: Keys
) -> None:
    writer = AckWriter(redis_client, keys, "n1")
    writer.start()
    flight = in_flight(keys, "n1", 1)
    put_in_backup(redis_client, [flight])
    writer.job_done(finished(flight, "processed"))
    assert writer.stop(timeout=5)
    assert redis_client.get(keys.stat("processed")) == b"1"
    assert not redis_client.exists(keys.batch_marker("n1"))
    late = in_flight(keys, "n1", 2)
    put_in_backup(redis_client, [late])
    writer.job_done(finished(late, "processed"))  # a job that outlived stop
    assert writer.pending() == 0
    assert redis_client.lrange(late.backup, 0, -1) == [late.raw]


def test_the_acks_of_two_queues_go_one_command_per_backup_list(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given six finished jobs of two queues in their backup lists
    writer = AckWriter(redis_client, keys, "n1")
    flights = [in_flight(keys, "n1", n, queue="a" if n % 2 else "b") for n in range(6)]
    put_in_backup(redis_client, flights)
    for flight in flights:
        writer.job_started(flight)
        writer.job_done(finished(flight, "processed"))
    # When one batch is built and applied
    batch = writer._build()
    assert batch is not None
    assert batch.args.count("ACK") == 2
    writer._retry = batch
    assert writer.flush()
    # Then both backup lists are empty and all six jobs are counted
    assert redis_client.llen(keys.backup("n1", "a")) == 0
    assert redis_client.llen(keys.backup("n1", "b")) == 0
    assert redis_client.get(keys.stat("processed")) == b"6"
