"""NodePinger and Heartbeat: the node registry, signals and dead-node recovery on a real Redis."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import exq_fast
from exq_fast import nodes
from exq_fast.admin.processes import _remove_gone
from exq_fast.config import Config
from exq_fast.embedded import RedisServer, free_port
from exq_fast.heartbeat import Heartbeat, NodePinger
from exq_fast.inflight import InFlight
from exq_fast.keys import Keys
from exq_fast.store import fetch, recovery
from tests.conftest import fixture_json, wait_for

INFLIGHT = fixture_json("exq-0.23.0/inflight.json")



def job(queue_name: str, n: int) -> bytes:
    """A compact Exq job for ``queue_name``."""
    body = {"args": [n], "class": "W", "jid": f"jid-{queue_name}-{n}", "queue": queue_name,
            "retry": 25}
    return json.dumps(body, separators=(",", ":")).encode()


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class FakeState:
    """A NodeState with fixed answers, recording the signals it gets."""

    queues: list[str] = field(default_factory=lambda: ["fxq"])
    jobs: list[InFlight] = field(default_factory=list)
    concurrency: int = 10
    received: list[str] = field(default_factory=list)
    fail_on: str | None = None

    def busy(self) -> int:
        return len(self.jobs)

    def subscriptions(self) -> list[str]:
        return list(self.queues)

    def total_concurrency(self) -> int:
        return self.concurrency

    def stuck(self) -> int:
        return 0

    def running_jobs(self) -> list[InFlight]:
        return list(self.jobs)

    def on_signal(self, signal: str) -> None:
        if signal == self.fail_on:
            raise RuntimeError("handler bug")
        self.received.append(signal)


def inflight_jobs() -> list[InFlight]:
    """The two jobs running in Exq's inflight fixture, as in-flight records."""
    raws = INFLIGHT["backup_list"]["members_lrange_order"]
    records = []
    for i, raw in enumerate(raws):
        record = InFlight(raw.encode(), "fxq", "unused-backup-key")
        record.seq, record.run_at = i + 1, 1795867331.39 + i
        records.append(record)
    return records


def namespace_keys(client: redis.Redis, keys: Keys) -> set[str]:
    return {text(k) for k in client.scan_iter(match=keys.all_keys_pattern(), count=1000)}


def all_keys(client: redis.Redis) -> set[str]:
    return {text(k) for k in client.scan_iter(count=1000)}


def quick_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1,
                                retry=Retry(NoBackoff(), 0))


@pytest.fixture
def state() -> FakeState:
    return FakeState(jobs=inflight_jobs())


@pytest.fixture
def pinger(redis_client: redis.Redis, keys: Keys, config: Config,
           state: FakeState) -> Iterator[NodePinger]:
    node = NodePinger(redis_client, keys, config, state)
    yield node
    node.stop(5)


@pytest.fixture
def private_client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


# --- NodePinger: the Exq and Sidekiq registrations -------------------------------------------


def test_a_ping_writes_the_node_keys_exq_writes(
    pinger: NodePinger, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a node running Exq's two inflight jobs
    before = time.time()
    # When it pings
    pinger.run_once()
    # Then Exq's keys exist under the same names (namespace and node id swapped) ...
    exq_names = {name.replace("fx23i:", keys.prefix).replace(":vm", ":" + node_id)
                 for name in INFLIGHT["key_names"]}
    ours = namespace_keys(redis_client, keys)
    node_keys = {keys.processes, keys.node(node_id)}
    assert node_keys <= exq_names
    # ... the workers hash and backups are the worker's; the pinger adds Sidekiq's work hash
    # and exq-fast's registry entry (which lets any node recover this one's jobs if it dies)
    assert ours == node_keys | {keys.sidekiq_work(node_id), keys.nodes}
    assert redis_client.hkeys(keys.nodes) == [node_id.encode()]
    assert redis_client.smembers(keys.processes) == {node_id.encode()}
    # ... with Exq's hash fields (plus Sidekiq's rss / rtt_us) and TTL
    node = {text(k): text(v) for k, v in redis_client.hgetall(keys.node(node_id)).items()}
    exq_node = INFLIGHT["node_hash"]["fields_hgetall_order"]
    assert set(node) == set(exq_node) | {"rss", "rtt_us"}
    assert 58 <= redis_client.ttl(keys.node(node_id)) <= 60
    assert (node["busy"], node["quiet"]) == ("2", "false")
    assert before <= float(node["beat"]) <= time.time()


def test_the_info_json_has_exqs_fields_and_sidekiqs(
    pinger: NodePinger, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # When a node running two jobs with a total concurrency of 10 pings
    pinger.run_once()
    # Then its info holds Exq's fields, plus version and embedded
    raw = redis_client.hget(keys.node(node_id), "info")
    assert raw is not None
    info = json.loads(raw)
    exq_info = json.loads(INFLIGHT["node_hash"]["fields_hgetall_order"]["info"])
    assert set(info) == set(exq_info) | {"version", "embedded", "stuck"}
    assert text(raw) == json.dumps(info, separators=(",", ":"), sort_keys=True)  # compact
    assert {k: type(v) for k, v in info.items() if k != "pid"} == {
        **{k: type(v) for k, v in exq_info.items() if k != "pid"}, "version": str,
        "embedded": bool, "stuck": int}
    assert info == {
        "busy": 2, "concurrency": 10, "hostname": socket.gethostname(), "identity": node_id,
        "labels": [], "pid": os.getpid(), "queues": ["fxq"], "quiet": False,
        "started_at": pinger.started_at, "tag": "", "version": exq_fast.__version__,
        "embedded": False, "stuck": 0,
    }


def test_the_sidekiq_forms_rss_and_the_work_hash(
    pinger: NodePinger, state: FakeState, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # When a node running two jobs pings
    pinger.run_once()
    # Then the process hash has Sidekiq's rss (kB) and rtt_us
    rss, rtt = redis_client.hmget(keys.sidekiq_process(node_id), ["rss", "rtt_us"])
    assert rss is not None and rtt == b"0"
    if Path("/proc/self/status").exists():
        assert int(rss) > 1000
    # And <id>:work holds one entry per running job, as Sidekiq >= 6.5 reads it
    work = redis_client.hgetall(keys.sidekiq_work(node_id))
    assert {text(k) for k in work} == {j.field for j in state.jobs}
    for running in state.jobs:
        entry = json.loads(work[running.field.encode()])
        assert entry == {"queue": "fxq", "payload": running.raw.decode(),
                         "run_at": int(running.run_at)}
    assert 58 <= redis_client.ttl(keys.sidekiq_work(node_id)) <= 60
    # When the jobs finish and the node pings again
    state.jobs.clear()
    pinger.run_once()
    # Then the work hash is gone and busy is 0
    assert not redis_client.exists(keys.sidekiq_work(node_id))
    assert redis_client.hget(keys.node(node_id), "busy") == b"0"


def test_a_node_without_subscriptions_is_quiet(
    pinger: NodePinger, state: FakeState, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a node that unsubscribed from everything (after TSTP)
    state.queues.clear()
    # When it pings
    pinger.run_once()
    # Then the hash and the info both say quiet
    quiet, raw = redis_client.hmget(keys.node(node_id), ["quiet", "info"])
    assert quiet == b"true"
    assert raw is not None
    assert json.loads(raw)["quiet"] is True
    assert json.loads(raw)["queues"] == []


def test_empty_namespace_writes_both_the_exq_and_the_sidekiq_keys(
    private_client: redis.Redis, make_config: Callable[..., Config], state: FakeState,
    node_id: str
) -> None:
    # Given the empty namespace (Sidekiq 7), where Exq's keys start with ":"
    keys = Keys("")
    pinger = NodePinger(private_client, keys, make_config(namespace=""), state)
    # When the node pings
    pinger.run_once()
    # Then both registries, both hashes and the work hash exist
    assert all_keys(private_client) == {
        ":processes", "processes", f":{node_id}", node_id, f"{node_id}:work", "nodes"}
    for registry in (":processes", "processes"):
        assert private_client.smembers(registry) == {node_id.encode()}
    exq_hash = private_client.hgetall(f":{node_id}")
    sidekiq_hash = private_client.hgetall(node_id)
    assert set(exq_hash) == set(sidekiq_hash) == {
        b"info", b"busy", b"beat", b"quiet", b"rss", b"rtt_us"}
    assert private_client.ttl(node_id) > 0 and private_client.ttl(f":{node_id}") > 0


def test_empty_namespace_reads_both_signal_lists_and_remove_clears_both_forms(
    private_client: redis.Redis, make_config: Callable[..., Config], state: FakeState,
    node_id: str
) -> None:
    # Given Exq's Api signalled on ":<id>-signals" and Sidekiq's UI on "<id>-signals"
    keys = Keys("")
    pinger = NodePinger(private_client, keys, make_config(namespace=""), state)
    private_client.lpush(f":{node_id}-signals", "TSTP")
    private_client.lpush(f"{node_id}-signals", "TERM")
    # When the node pings
    handled = pinger.run_once()
    # Then both signals are handled and both lists are drained
    assert handled == state.received == ["TSTP", "TERM"]
    assert not private_client.exists(f":{node_id}-signals", f"{node_id}-signals")
    # When the node stops gracefully (its workers hash written by the worker meanwhile)
    private_client.hset(keys.workers(node_id), "#PID<0.1.0>", "{}")
    pinger.remove()
    # Then none of its keys remain but its registry entry, which the node drops once its
    # unfinished jobs are back in their queues
    assert all_keys(private_client) == {keys.nodes}


def test_signals_reach_the_node_oldest_first_and_are_trimmed(
    pinger: NodePinger, state: FakeState, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given three signals sent as Exq's Api send_signal does (MULTI, LPUSH, EXPIRE 60)
    cancel = 'CANCEL:{"jid":"abc","pid":"#PID<0.1.0>"}'
    for signal in ("TSTP", cancel, "TERM"):
        pipe = redis_client.pipeline(transaction=True)
        pipe.lpush(keys.signals(node_id), signal)
        pipe.expire(keys.signals(node_id), 60)
        pipe.execute()
    # When the node pings
    handled = pinger.run_once()
    # Then they are handled in the order sent, and the list is empty
    assert handled == state.received == ["TSTP", cancel, "TERM"]
    assert not redis_client.exists(keys.signals(node_id))
    # And a second ping delivers nothing again
    assert pinger.run_once() == []
    assert state.received == ["TSTP", cancel, "TERM"]


def test_at_most_100_signals_per_ping_the_rest_at_the_next(
    pinger: NodePinger, state: FakeState, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given 105 signals
    signals = [f"S{n}" for n in range(105)]
    for signal in signals:
        redis_client.lpush(keys.signals(node_id), signal)
    # When the node pings twice
    first = pinger.run_once()
    second = pinger.run_once()
    # Then the first ping takes the newest 100 (Exq's LRANGE 0 99) and the second the rest
    assert first == signals[5:]
    assert second == signals[:5]
    assert not redis_client.exists(keys.signals(node_id))


def test_a_failing_signal_handler_does_not_lose_the_other_signals(
    pinger: NodePinger, state: FakeState, redis_client: redis.Redis, keys: Keys, node_id: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    # Given a handler that fails on one signal
    state.fail_on = "BAD"
    for signal in ("TSTP", "BAD", "TERM"):
        redis_client.lpush(keys.signals(node_id), signal)
    # When the node pings
    pinger.run_once()
    # Then the others are still handled and the failure is logged with its traceback
    assert state.received == ["TSTP", "TERM"]
    assert any(r.exc_info and "BAD" in r.getMessage() for r in caplog.records)


def test_prune_removes_dead_members_and_their_workers_but_not_a_live_nodes(
    pinger: NodePinger, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a live node, a dead one (hash expired), and a v0.13.2 JSON member
    old_member = '{"host":"old","job":"{}","pid":"<0.1.0>","started_at":1.0}'
    redis_client.sadd(keys.processes, "alive-node", "dead-node", old_member)
    redis_client.hset(keys.node("alive-node"), "info", "{}")
    for member in ("alive-node", "dead-node"):
        redis_client.hset(keys.workers(member), "#PID<0.9.0>", "{}")
    # When this node pings for the first time (ping 0 prunes)
    pinger.run_once()
    # Then only live members remain, and only the dead node lost its workers hash
    assert redis_client.smembers(keys.processes) == {node_id.encode(), b"alive-node"}
    assert not redis_client.exists(keys.workers("dead-node"))
    assert redis_client.hgetall(keys.workers("alive-node")) == {b"#PID<0.9.0>": b"{}"}


def test_prune_runs_on_every_tenth_ping(
    pinger: NodePinger, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a node that has pinged once, and then a dead member appears
    pinger.run_once()
    redis_client.sadd(keys.processes, "dead-node")
    # When it pings nine more times, the member stays
    for _ in range(9):
        pinger.run_once()
    assert redis_client.sismember(keys.processes, "dead-node")
    # When it pings the 11th time (ping number 10), the member is pruned
    pinger.run_once()
    assert pinger.pings == 11
    assert redis_client.smembers(keys.processes) == {node_id.encode()}


def test_a_node_that_pings_again_before_removal_is_kept(
    pinger: NodePinger, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a member first seen without a hash, that has pinged again since
    redis_client.sadd(keys.processes, "back-node")
    redis_client.hset(keys.node("back-node"), "info", "{}")
    redis_client.hset(keys.workers("back-node"), "#PID<0.9.0>", "{}")
    # When the removal step of the prune (which the pinger runs) re-checks it under WATCH
    removed = _remove_gone(redis_client, pinger.keys, ["back-node"])
    # Then nothing of it is removed
    assert removed == []
    assert redis_client.sismember(keys.processes, "back-node")
    assert redis_client.exists(keys.workers("back-node"))


def test_a_node_whose_id_was_claimed_by_another_process_goes_quiet(
    pinger: NodePinger, state: FakeState, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a registered node, cut off long enough to be taken for dead, whose id another
    # process then claimed
    pinger.run_once()
    other = b'{"boot":"b","host":"elsewhere","pid":7,"pidns":"1","start":"9","started_at":1}'
    redis_client.hset(keys.nodes, node_id, other)
    # When it pings again
    pinger.run_once()
    # Then it keeps the other's claim and stops fetching (quiet)
    assert redis_client.hget(keys.nodes, node_id) == other
    assert state.received == ["TSTP"]


def test_remove_deletes_this_nodes_keys_only(
    pinger: NodePinger, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a registered node running jobs, beside another node
    pinger.run_once()
    redis_client.hset(keys.workers(node_id), "#PID<0.1.0>", "{}")
    redis_client.sadd(keys.processes, "other-node")
    # When it stops gracefully
    pinger.remove()
    # Then its registration, hashes and work are gone; the other node stays (and the
    # registry entry, the node's to drop once its unfinished jobs are back)
    assert redis_client.smembers(keys.processes) == {b"other-node"}
    assert namespace_keys(redis_client, keys) == {keys.processes, keys.nodes}


def test_the_pinger_thread_pings_at_once(
    redis_client: redis.Redis, keys: Keys, config: Config, state: FakeState, node_id: str
) -> None:
    # Given a pinger whose interval is a minute
    pinger = NodePinger(redis_client, keys, config, state, interval=60.0)
    # When it starts
    pinger.start()
    try:
        # Then the node is visible right away, from the exq-node-pinger thread
        wait_for(lambda: redis_client.exists(keys.node(node_id)), what="first ping")
        assert "exq-node-pinger" in {t.name for t in threading.enumerate()}
    finally:
        assert pinger.stop(5)
    assert pinger.pings == 1


def test_a_signal_handler_may_stop_the_pinger_from_its_own_thread(
    redis_client: redis.Redis, keys: Keys, config: Config, node_id: str
) -> None:
    # Given a node whose TERM handler stops the pinger (from the pinger's thread)
    stopped: list[bool] = []

    class StoppingState(FakeState):
        def on_signal(self, signal: str) -> None:
            stopped.append(node.stop(5))

    failed: list[str] = []
    node = NodePinger(redis_client, keys, config, StoppingState(),
                      lambda op, _exc: failed.append(op), interval=0.01)
    node.start()
    # When TERM arrives
    redis_client.lpush(keys.signals(node_id), "TERM")
    # Then the thread ends cleanly after that tick
    wait_for(lambda: not node.running, what="pinger thread ended")
    assert stopped == [False]
    assert failed == []


# --- Heartbeat ---------------------------------------------------------------------------------


@pytest.fixture
def hb_config(make_config: Callable[..., Config]) -> Config:
    """Heartbeat every second, one missed beat allowed: dead after 2 s."""
    return make_config(heartbeat_enable=True, heartbeat_interval=1000,
                       missed_heartbeats_allowed=1, queues=["q1"])


def kill_node(client: redis.Redis, keys: Keys, node: str, jobs: dict[str, int],
              score: float = 100.0) -> dict[str, list[bytes]]:
    """Make ``node`` fetch ``jobs[q]`` jobs per queue, then stop beating at ``score``.

    Returns each backup list as it then stands (LRANGE order)."""
    backups: dict[str, list[bytes]] = {}
    for name, count in jobs.items():
        client.lpush(keys.queue(name), *[job(name, n) for n in range(count)])
        fetch.fetch(client, keys, node, [(name, count)])
        backups[name] = cast(list[bytes], client.lrange(keys.backup(node, name), 0, -1))
        assert len(backups[name]) == count
    client.hset(keys.workers(node), "#PID<0.5.0>", "{}")
    client.zadd(keys.heartbeats, {node: score})
    return backups


def test_a_beat_writes_exqs_heartbeat_zset(
    redis_client: redis.Redis, keys: Keys, hb_config: Config, node_id: str
) -> None:
    hb = Heartbeat(redis_client, keys, hb_config)
    # When the node beats twice
    first = hb.beat()
    second = hb.beat()
    # Then the zset has one member, the node, scored in seconds with ms precision
    [(member, score)] = cast(list[tuple[bytes, float]],
                             redis_client.zrange(keys.heartbeats, 0, -1, withscores=True))
    assert member == node_id.encode()
    assert score == second >= first
    assert round(score, 3) == score
    assert abs(score - time.time()) < 5
    assert redis_client.ttl(keys.heartbeats) == -1


def test_a_dead_nodes_backup_goes_back_to_the_front_of_its_queues(
    redis_client: redis.Redis, keys: Keys, hb_config: Config, node_id: str
) -> None:
    # Given a dead node holding 15 jobs of q1 (configured) and 10 of q2 (only in the
    # queues set), and a job enqueued after they were fetched
    redis_client.sadd(keys.queues, "q2")
    kill_node(redis_client, keys, "dead-node", {"q1": 15, "q2": 10})
    redis_client.lpush(keys.queue("q1"), b"later")
    recovered: list[tuple[str, str, int]] = []
    hb = Heartbeat(redis_client, keys, hb_config,
                   on_recovered=lambda *args: recovered.append(args))
    # When the monitor runs
    moved = hb.run_once()
    # Then the jobs are popped next, in their original order, before the later one
    assert moved == 25
    assert recovered == [("q1", "heartbeat", 15), ("q2", "heartbeat", 10)]
    q1 = [redis_client.rpop(keys.queue("q1")) for _ in range(16)]
    assert q1 == [job("q1", n) for n in range(15)] + [b"later"]
    assert [redis_client.rpop(keys.queue("q2")) for _ in range(10)] == [
        job("q2", n) for n in range(10)]
    # And the dead node's backups, workers hash and heartbeat are gone; ours is there
    for name in ("q1", "q2"):
        assert not redis_client.exists(keys.backup("dead-node", name))
    assert not redis_client.exists(keys.workers("dead-node"))
    assert redis_client.zrange(keys.heartbeats, 0, -1) == [node_id.encode()]


def test_a_dead_nodes_backup_of_an_unlisted_queue_is_recovered_too(
    redis_client: redis.Redis, keys: Keys, hb_config: Config
) -> None:
    # Given a dead node holding jobs of a queue that is neither configured here
    # nor in the queues set (Exq's monitor would never look at it)
    kill_node(redis_client, keys, "dead-node", {"odd queue": 3})
    redis_client.srem(keys.queues, "odd queue")
    # When the monitor runs
    moved = Heartbeat(redis_client, keys, hb_config).run_once()
    # Then the jobs are back in their queue
    assert moved == 3
    assert redis_client.llen(keys.queue("odd queue")) == 3
    assert not redis_client.exists(keys.backup("dead-node", "odd queue"))


def test_a_live_node_beside_a_dead_one_is_untouched(
    redis_client: redis.Redis, keys: Keys, hb_config: Config
) -> None:
    # Given a dead node and a live one (fresh beat), both holding jobs of q1
    kill_node(redis_client, keys, "dead-node", {"q1": 3})
    live_backups = kill_node(redis_client, keys, "live-node", {"q1": 4}, score=time.time())
    live_score = redis_client.zscore(keys.heartbeats, "live-node")
    # When the monitor runs
    moved = Heartbeat(redis_client, keys, hb_config).run_once()
    # Then only the dead node's jobs moved; the live one keeps its backup, hash and beat
    assert moved == 3
    assert redis_client.lrange(keys.backup("live-node", "q1"), 0, -1) == live_backups["q1"]
    assert redis_client.exists(keys.workers("live-node"))
    assert redis_client.zscore(keys.heartbeats, "live-node") == live_score
    assert redis_client.zscore(keys.heartbeats, "dead-node") is None


def test_a_node_that_beat_again_after_the_read_is_untouched(
    redis_client: redis.Redis, keys: Keys, hb_config: Config
) -> None:
    # Given a node seen dead at score 100 ...
    backups = kill_node(redis_client, keys, "back-node", {"q1": 5})
    hb = Heartbeat(redis_client, keys, hb_config)
    [record] = hb.dead_nodes()
    node, stale_score = record.node_id, record.heartbeat
    assert (node, stale_score) == ("back-node", 100.0)
    # ... that beats again before the monitor acts on what it read
    fresh = time.time()
    redis_client.zadd(keys.heartbeats, {"back-node": fresh})
    # When the recovery runs with the stale score
    moved = hb.recover_node(record)
    direct, _ = recovery.recover_dead_node_backup(redis_client, keys, node, "q1",
                                               repr(stale_score))
    # Then nothing moved and the node keeps its backup, workers hash and new beat
    assert moved == direct == 0
    assert redis_client.lrange(keys.backup("back-node", "q1"), 0, -1) == backups["q1"]
    assert redis_client.exists(keys.workers("back-node"))
    assert redis_client.zscore(keys.heartbeats, "back-node") == pytest.approx(fresh)


def test_the_monitor_never_recovers_its_own_node_and_honours_the_allowance(
    redis_client: redis.Redis, keys: Keys, hb_config: Config, node_id: str
) -> None:
    # Given our own node with an old score, one just inside the window, one outside; the
    # window is interval x (missed + 1) = 2 s, but never under 3 process pings (15 s)
    hb = Heartbeat(redis_client, keys, hb_config)
    assert hb.window() == nodes.MIN_DEAD_WINDOW == 15.0
    now = time.time()
    redis_client.zadd(keys.heartbeats, {node_id: 100.0, "late-node": now - 14.5,
                                        "gone-node": now - 15.5})
    # Then only the node past the window counts as dead
    assert [record.node_id for record in hb.dead_nodes(now)] == ["gone-node"]
    # And its score is the one Redis holds, usable as the script's expected score
    [record] = hb.dead_nodes(now)
    assert record.heartbeat == redis_client.zscore(keys.heartbeats, "gone-node")


def test_two_monitors_at_once_recover_each_job_exactly_once(
    redis_url: str, redis_client: redis.Redis, keys: Keys,
    make_config: Callable[..., Config], hb_config: Config
) -> None:
    # Given a dead node holding 600 jobs in two queues, and two monitors on two connections
    redis_client.sadd(keys.queues, "q1", "q2")
    kill_node(redis_client, keys, "dead-node", {"q1": 300, "q2": 300})
    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    monitors = [Heartbeat(c, keys, hb_config.replace(node_id=f"monitor-{i}"))
                for i, c in enumerate(clients)]
    results: list[int] = []
    barrier = threading.Barrier(2)

    def run(hb: Heartbeat) -> None:
        barrier.wait()
        results.append(hb.monitor())

    # When both run at the same moment
    threads = [threading.Thread(target=run, args=(hb,)) for hb in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for client in clients:
        client.close()
    # Then every job is back exactly once
    assert sum(results) == 600
    for name in ("q1", "q2"):
        members = redis_client.lrange(keys.queue(name), 0, -1)
        assert sorted(members) == sorted(job(name, n) for n in range(300))
        assert not redis_client.exists(keys.backup("dead-node", name))
    assert redis_client.zscore(keys.heartbeats, "dead-node") is None


def test_the_heartbeat_thread_beats_at_once(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config], node_id: str
) -> None:
    # Given a heartbeat every minute
    hb = Heartbeat(redis_client, keys, make_config(heartbeat_enable=True))
    # When it starts
    hb.start()
    try:
        # Then the node's beat is there at once, from the exq-heartbeat thread
        wait_for(lambda: redis_client.zscore(keys.heartbeats, node_id), what="first beat")
        assert "exq-heartbeat" in {t.name for t in threading.enumerate()}
    finally:
        assert hb.stop(5)


def test_the_heartbeat_retries_after_min_interval_and_5_s(
    redis_client: redis.Redis, keys: Keys, make_config: Callable[..., Config]
) -> None:
    # Then a failed tick is retried after min(interval, 5 s), however many failed
    every_minute = Heartbeat(redis_client, keys, make_config(heartbeat_interval=60000))
    every_second = Heartbeat(redis_client, keys, make_config(heartbeat_interval=1000))
    assert [every_minute.error_delay(n) for n in (1, 2, 10)] == [5.0, 5.0, 5.0]
    assert [every_second.error_delay(n) for n in (1, 2, 10)] == [1.0, 1.0, 1.0]


def test_errors_are_reported_with_their_operation_names(
    keys: Keys, config: Config, hb_config: Config
) -> None:
    # Given a pinger and a heartbeat whose Redis does not answer
    dead = quick_client(f"redis://127.0.0.1:{free_port()}/0")
    seen: list[str] = []
    pinger = NodePinger(dead, keys, config, FakeState(), lambda op, _exc: seen.append(op))
    hb = Heartbeat(dead, keys, hb_config, lambda op, _exc: seen.append(op))
    # When each ticks
    pinger.tick()
    hb.tick()
    dead.close()
    # Then each failed step is reported and counted, the thread would wait and retry
    assert seen == ["node_ping", "heartbeat", "heartbeat_monitor"]


def test_a_process_that_exited_is_dead_even_before_it_is_reaped() -> None:
    # Given a child process on this machine, registered while it ran
    child = subprocess.Popen(["sleep", "0.2"])
    me = nodes.ProcessIdentity.current()
    running = dataclasses.replace(me, pid=child.pid, start=nodes._start_ticks(child.pid))
    assert nodes.judge(running, None, me=me, window=30) is nodes.Liveness.ALIVE
    # When it exits and nobody has reaped it yet (a zombie)
    stat = pathlib.Path(f"/proc/{child.pid}/stat")
    wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", what="a zombie")
    # Then it is dead
    assert nodes.judge(running, None, me=me, window=30) is nodes.Liveness.DEAD
    child.wait()
