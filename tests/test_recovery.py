"""Backup recovery: a job recovered max_recoveries times is a poison job and goes dead."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable

import pytest
import redis

from exq_fast.app import Exq
from exq_fast.config import Config
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from exq_fast.registry import Registry
from exq_fast.store import recovery
from tests.conftest import wait_for

POLICY = recovery.RecoveryPolicy(max_recoveries=3, dead_max_jobs=100, dead_timeout_s=3600)


def crash_with(client: redis.Redis, keys: Keys, node: str, raw: bytes,
               started: bool = True) -> None:
    """As if ``node`` fetched ``raw`` and died: the job sits in its backup list.

    ``started``: the job was seen starting (a worker marks a recovered job so
    just before running it again)."""
    client.lpush(keys.backup(node, "q"), raw)
    if started:
        client.hset(keys.started, hashlib.sha1(raw).hexdigest(), 1)


def test_the_third_recovery_sends_the_job_to_dead(
    redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer
) -> None:
    # Given a job whose worker process dies every time it runs
    jid = enqueuer.enqueue("q", "Poison.Job", [1])
    raw = redis_client.rpop(keys.queue("q"))
    assert isinstance(raw, bytes)
    # When it is recovered after a first and a second crash, it goes back to the queue
    for _ in range(2):
        crash_with(redis_client, keys, "n1", raw)
        assert recovery.recover_backup(redis_client, keys, "n1", "q", POLICY) == (1, 0)
        assert redis_client.rpop(keys.queue("q")) == raw
    # And after the third it goes to the dead set, with the reason, not to the queue
    crash_with(redis_client, keys, "n1", raw)
    assert recovery.recover_backup(redis_client, keys, "n1", "q", POLICY) == (0, 1)
    assert redis_client.llen(keys.queue("q")) == 0
    assert recovery.bury_poison(redis_client, keys, POLICY) == 1
    [member] = redis_client.zrange(keys.dead, 0, -1)
    entry = json.loads(member)
    assert entry["jid"] == jid and entry["args"] == [1]
    assert entry["error_class"] == "JobCrashedWorker"
    assert "died 3 times" in entry["error_message"]
    assert redis_client.llen(keys.poison) == 0


def test_jobs_that_only_waited_beside_a_crashing_job_are_spared(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a job fetched three times beside a job that kills its process at
    # once: after its first recovery it never starts again before each crash
    raw = b'{"class":"W","args":[1],"jid":"bystander"}'
    for _ in range(3):
        crash_with(redis_client, keys, "n1", raw, started=False)
        # Then every recovery puts it back in the queue: only one counted
        assert recovery.recover_backup(redis_client, keys, "n1", "q", POLICY) == (1, 0)
        assert redis_client.rpop(keys.queue("q")) == raw
    assert redis_client.hget(keys.recoveries, hashlib.sha1(raw).hexdigest()) == b"1"


def test_a_recovered_job_that_completes_is_no_longer_a_suspect(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given a job recovered once (a suspect), fetched and run by a node
    config = make_config(queues=["q"], poll_timeout=10)
    raw = b'{"class":"Fine","args":[],"jid":"ok","queue":"q","retry":25}'
    crash_with(redis_client, keys, config.node_id, raw, started=False)
    digest = hashlib.sha1(raw).hexdigest()
    ran: list[object] = []
    with Exq(config, workers=Registry({"Fine": lambda: ran.append(1)})):
        wait_for(lambda: ran and redis_client.zscore(keys.suspects, digest) is None,
                 what="the suspect mark cleared by the ack")
    # Then its marks are gone with its ack: a later crash would count from zero
    assert not redis_client.hexists(keys.started, digest)
    assert not redis_client.hexists(keys.recoveries, digest)


def test_recoveries_are_counted_per_job_and_never_when_disabled(
    redis_client: redis.Redis, keys: Keys
) -> None:
    off = recovery.RecoveryPolicy(max_recoveries=0)
    for n in range(5):
        crash_with(redis_client, keys, "n1", b'{"class":"W","args":[1],"jid":"a"}')
        crash_with(redis_client, keys, "n1", b'{"class":"W","args":[%d],"jid":"b"}' % n)
        assert recovery.recover_backup(redis_client, keys, "n1", "q", off) == (2, 0)
    assert redis_client.llen(keys.queue("q")) == 10
    assert not redis_client.exists(keys.recoveries)


def test_a_dead_nodes_poison_job_is_buried_by_the_monitor(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given a job already recovered twice, in flight on a node that died again
    raw = b'{"class":"W","args":[],"jid":"p","queue":"q","retry":25}'
    for _ in range(2):
        crash_with(redis_client, keys, "gone", raw)
        recovery.recover_backup(redis_client, keys, "gone", "q", POLICY)
        redis_client.rpop(keys.queue("q"))
    crash_with(redis_client, keys, "gone", raw)
    redis_client.zadd(keys.heartbeats, {"gone": 100.0})
    config = make_config(heartbeat_enable=True, heartbeat_interval=200, queues=["q"])
    exq = Exq(config, workers=Registry({}))
    # When another node's heartbeat monitor finds the dead node
    exq.heartbeat.run_once()
    # Then the job is dead with the reason, not re-enqueued, and counted
    assert redis_client.llen(keys.queue("q")) == 0
    [member] = redis_client.zrange(keys.dead, 0, -1)
    assert json.loads(member)["error_class"] == "JobCrashedWorker"
    assert exq.recovered == {("q", "poison"): 1}


def test_a_node_restarting_with_a_poison_job_in_its_backup_buries_it(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given a node whose job crashed it twice before (recovered at two starts)
    config = make_config(queues=["q"], max_recoveries=3)
    raw = b'{"class":"Never.Runs","args":[],"jid":"p","queue":"q","retry":25}'
    for _ in range(2):
        crash_with(redis_client, keys, config.node_id, raw)
        recovery.recover_backup(redis_client, keys, config.node_id, "q", POLICY)
        redis_client.rpop(keys.queue("q"))
    crash_with(redis_client, keys, config.node_id, raw)
    # When it starts a third time
    with Exq(config, workers=Registry({})) as exq:
        # Then the job is buried at start, never run again
        assert exq.recovered == {("q", "poison"): 1}
        assert redis_client.zcard(keys.dead) == 1
        assert redis_client.llen(keys.backup(config.node_id, "q")) == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_quarantined_jobs_run_one_at_a_time_beside_normal_ones(
    kind: str, redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Given three jobs each one counted crash from the dead set (suspects with
    # two recoveries), and a normal job, on a node with five slots; the worker is
    # a plain function or an async def one (which ends after its call returns)
    config = make_config(queues=[("q", 5)], poll_timeout=10, max_recoveries=3)
    lock = threading.Lock()
    running: set[str] = set()
    overlaps: list[set[str]] = []

    def sync_work(name: str) -> None:
        with lock:
            running.add(name)
            overlaps.append(set(running))
        time.sleep(0.1)
        with lock:
            running.discard(name)

    async def async_work(name: str) -> None:
        with lock:
            running.add(name)
            overlaps.append(set(running))
        await asyncio.sleep(0.1)
        with lock:
            running.discard(name)

    work = sync_work if kind == "sync" else async_work

    for name in ("a", "b", "c"):
        raw = json.dumps({"class": "Q", "args": [name], "jid": name, "queue": "q"}).encode()
        digest = hashlib.sha1(raw).hexdigest()
        redis_client.zadd(keys.suspects, {digest: time.time()})
        redis_client.hset(keys.recoveries, digest, 2)
        redis_client.lpush(keys.queue("q"), raw)
    redis_client.lpush(keys.queue("q"), b'{"class":"Q","args":["n"],"jid":"n","queue":"q"}')
    with Exq(config, workers=Registry({"Q": work})):
        # When they run
        wait_for(lambda: redis_client.get(keys.stat("processed")) == b"4", what="4 jobs")
    # Then no two quarantined jobs ever ran at once, while the normal one ran beside
    assert all(len(seen & {"a", "b", "c"}) <= 1 for seen in overlaps), overlaps
    assert any("n" in seen and seen & {"a", "b", "c"} for seen in overlaps), overlaps
    # And each one's marks are cleared by its ack
    assert redis_client.zcard(keys.suspects) == 0
