"""``Api`` on a real Redis, against the bytes real Exq 0.13.2 / 0.23.0 and Sidekiq 6.4.1 wrote.

Each test loads fixture payloads into its own namespace (or into the empty
namespace of a private Redis, Sidekiq 7's layout) and checks what an operator
would see: listings, sizes, order, finds, removals, requeues, stats, nodes,
in-progress jobs and signals reaching a running exq-fast node.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any, cast

import pytest
import redis

from exq_fast import Exq, current_job
from exq_fast.admin import Api, Entry, JobSet, NodeInfo, SetName, Stats, prune_dead_nodes
from exq_fast.config import Config
from exq_fast.embedded import RedisServer, delete_namespace
from exq_fast.enqueuer import Enqueuer
from exq_fast.job import Job
from exq_fast.keys import Keys
from tests.conftest import fixture_json, fixture_lines, fixture_members, wait_for

EXQ23, EXQ13, SIDEKIQ = "exq-0.23.0", "exq-0.13.2", "sidekiq-6.4.1"
VERSIONS = (EXQ23, EXQ13, SIDEKIQ)
SIDEKIQ_ID = "vm:23629:0c48e5876f74"
FIXTURE_DAY = date(2026, 11, 28)


# -- helpers ---------------------------------------------------------------------------



def jid_of(raw: bytes) -> str:
    jid: str = json.loads(raw)["jid"]
    return jid


@dataclass(frozen=True)
class Payloads:
    """One fixture version's payloads, as loaded into Redis."""

    queue: str
    enqueued: list[bytes]
    """Queue members in enqueue order (the file's order)."""
    retry: list[tuple[bytes, str]]
    dead: list[tuple[bytes, str]]
    scheduled: list[tuple[bytes, str]]

    @property
    def listed(self) -> list[bytes]:
        """The queue as LRANGE shows it: newest first."""
        return list(reversed(self.enqueued))


def soonest_first(members: list[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    return sorted(members, key=lambda pair: float(pair[1]))


def load_payloads(client: redis.Redis, keys: Keys, version: str) -> Payloads:
    """Queue list, retry, dead and schedule sets of ``version`` in ``keys``' namespace."""
    loaded = Payloads(
        "default" if version == SIDEKIQ else "fxq",
        fixture_lines(f"{version}/enqueued.jsonl"),
        fixture_members(f"{version}/retry.jsonl"),
        fixture_members(f"{version}/dead.jsonl"),
        fixture_members(f"{version}/scheduled.jsonl"),
    )
    pipe = client.pipeline()
    pipe.sadd(keys.queues, loaded.queue)
    pipe.rpush(keys.queue(loaded.queue), *loaded.listed)
    for key, members in ((keys.retry, loaded.retry), (keys.dead, loaded.dead),
                         (keys.schedule, loaded.scheduled)):
        pipe.zadd(key, {member: score for member, score in members})
    pipe.execute()
    return loaded


def load_inflight(client: redis.Redis, keys: Keys, version: str) -> dict[str, Any]:
    """The in-progress keys of ``version``'s inflight fixture, renamed into ``keys``."""
    fixture: dict[str, Any] = fixture_json(f"{version}/inflight.json")
    pipe = client.pipeline()
    if version == SIDEKIQ:
        ident = fixture["identity"]
        pipe.sadd(keys.sidekiq_processes, ident)
        pipe.hset(keys.sidekiq_process(ident),
                  mapping=fixture["process_hash"]["fields_hgetall_order"])
        pipe.expire(keys.sidekiq_process(ident), 60)
        pipe.hset(keys.workers(ident), mapping=fixture["workers_hash"]["fields_hgetall_order"])
    else:
        node = fixture["node_id"]
        pipe.rpush(keys.backup(node, "fxq"), *fixture["backup_list"]["members_lrange_order"])
        # 0.13.2 keeps its records in P(processes), 0.23 its node ids in R(processes)
        registry = keys.sidekiq_processes if version == EXQ13 else keys.processes
        pipe.sadd(registry, *fixture["processes_set"]["members_sorted"])
    if version == EXQ23:
        pipe.hset(keys.node("vm"), mapping=fixture["node_hash"]["fields_hgetall_order"])
        pipe.expire(keys.node("vm"), 60)
        pipe.hset(keys.workers("vm"), mapping=fixture["workers_hash"]["fields_hgetall_order"])
    pipe.execute()
    return fixture


def load_stats(client: redis.Redis, keys: Keys, version: str) -> None:
    """Every ``stat:*`` key of ``version``'s stats fixture, renamed into ``keys``."""
    fixture = fixture_json(f"{version}/stats.json")
    head = f"{fixture['namespace']}:" if "namespace" in fixture else ""
    for name, record in fixture["stat_keys"].items():
        ttl = record["ttl"]
        client.set(keys.p(name[len(head):]), record["value"], ex=ttl if ttl > 0 else None)


def load_locks(client: redis.Redis, keys: Keys) -> dict[str, str]:
    """Exq 0.23's two unique locks; returns ``{token: holder jid}``."""
    locks = {}
    for name, record in fixture_json(f"{EXQ23}/unique_locks.json")["keys"].items():
        token = name.split(":unique:", 1)[1]
        client.set(keys.unique(token), record["value"], px=60000)
        locks[token] = record["value"]
    return locks


def token_of(raw: bytes) -> str:
    token: str = json.loads(raw)["unique_token"]
    return token


@pytest.fixture
def api(config: Config) -> Iterator[Api]:
    with Api(config) as client:
        yield client


@dataclass
class EmptyNamespace:
    """The empty namespace of a private Redis: Sidekiq 7's layout."""

    api: Api
    client: redis.Redis
    keys: Keys
    url: str


@pytest.fixture
def empty(private_redis: RedisServer) -> Iterator[EmptyNamespace]:
    client = redis.Redis.from_url(private_redis.url)
    api = Api(Config(redis_url=private_redis.url, namespace=""))
    yield EmptyNamespace(api, client, Keys(""), private_redis.url)
    api.close()
    client.close()


class Node:
    """A running in-process exq-fast node with one blocking worker class."""

    def __init__(self, config: Config) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.jobs: list[Job] = []
        self.exq = Exq(config, workers={"Api.Blocker": self.perform})

    def perform(self, *args: Any) -> None:
        job = current_job()
        assert job is not None
        self.jobs.append(job)
        self.started.set()
        self.gate.wait(20)

    def ping(self) -> list[str]:
        """Ping now (as the pinger thread does every 5 s); return the signals handled."""
        return self.exq.pinger.run_once()

    def ping_until(self, condition: Callable[[], object], what: str) -> None:
        """Ping until ``condition`` holds (e.g. a signal was picked up and handled)."""
        wait_for(lambda: self.ping() is not None and condition(), what=what)

    def close(self) -> None:
        self.gate.set()
        self.exq.stop(timeout=5)


@pytest.fixture
def make_node() -> Iterator[Callable[[Config], Node]]:
    nodes: list[Node] = []

    def make(config: Config) -> Node:
        node = Node(config)
        nodes.append(node)
        node.exq.start()
        return node

    yield make
    for node in nodes:
        node.close()


# -- queues ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_queue_listing_sizes_and_pages_are_newest_first(
    api: Api, redis_client: redis.Redis, keys: Keys, version: str
) -> None:
    # Given the jobs a real library enqueued
    loaded = load_payloads(redis_client, keys, version)

    # When an operator lists the queues and pages through one
    everything = api.queues.queue(loaded.queue).page(size=1000)
    page = api.queues.queue(loaded.queue).page(offset=2, size=3)

    # Then the queue shows every job, newest first, byte for byte, each decoded
    assert api.queues.names() == [loaded.queue]
    assert api.queues.sizes() == {loaded.queue: len(loaded.enqueued)}
    assert api.queues.queue(loaded.queue).size() == len(loaded.enqueued)
    assert [e.raw for e in everything] == loaded.listed
    assert [e.jid for e in everything] == [jid_of(raw) for raw in loaded.listed]
    assert all(e.job is not None and e.score is None for e in everything)
    assert [e.raw for e in page] == loaded.listed[2:5]
    assert api.queues.queue(loaded.queue).page(offset=len(loaded.enqueued)) == []
    assert api.queues.queue(loaded.queue).page(size=0) == []
    assert [e.raw for e in api.queues.jobs_by_queue(size=2)[loaded.queue]] == loaded.listed[:2]
    # the oldest job has waited since it was enqueued (in 2026): a positive latency
    assert api.queues.queue(loaded.queue).latency() > 0
    # and an unknown queue is simply empty, as in Exq
    assert api.queues.queue("nope").page() == []
    assert api.queues.queue("nope").size() == 0
    assert api.queues.queue("nope").latency() == 0.0
    assert api.queues.queue("nope").find(jid_of(loaded.enqueued[0])) is None


def test_escapes_and_extra_fields_survive_the_listing(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Sidekiq's edge-case job (raw U+2028 and DEL) and its job with extra keys
    loaded = load_payloads(redis_client, keys, SIDEKIQ)

    # When the operator reads those entries
    edge = api.queues.queue("default").find(jid_of(loaded.enqueued[12]))
    extra = api.queues.queue("default").find(jid_of(loaded.enqueued[7]))

    # Then the bytes are the stored ones and every field is readable
    assert edge is not None and edge.raw == loaded.enqueued[12]
    assert "\u2028" in edge.raw.decode() and "\x7f" in edge.raw.decode()
    assert extra is not None
    assert extra.to_dict() == json.loads(loaded.enqueued[7])
    assert extra.to_dict()["tags"] == ["a"]  # type: ignore[index]


def test_find_job_by_jid(api: Api, redis_client: redis.Redis, keys: Keys) -> None:
    # Given Exq 0.23's queue, including a job enqueued with a custom jid
    loaded = load_payloads(redis_client, keys, EXQ23)

    # When the operator looks jobs up by jid
    custom = api.queues.queue("fxq").find("fx-custom-jid-0001")
    first = api.queues.queue("fxq").find(jid_of(loaded.enqueued[0]))

    # Then the matching member comes back exactly; an unknown jid finds nothing
    assert custom is not None and custom.raw == loaded.enqueued[8]
    assert first is not None and first.raw == loaded.enqueued[0]
    assert first.job is not None and first.job.args == [1, "two"]
    assert api.queues.queue("fxq").find("no-such-jid") is None


def test_remove_jobs_removes_exactly_the_raw_members(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.23's queue of 11 jobs
    loaded = load_payloads(redis_client, keys, EXQ23)
    gone = [loaded.enqueued[0], loaded.enqueued[3]]

    fxq = api.queues.queue("fxq")

    # When two jobs are removed by their raw bytes (twice)
    first = fxq.remove(gone)
    again = fxq.remove(gone)

    # Then they are gone once, the others are untouched and in order
    assert (first, again) == (2, 0)
    assert fxq.size() == 9
    assert [e.raw for e in fxq.page()] == [r for r in loaded.listed if r not in gone]
    # a re-encoded copy (same job, other bytes) is not a member
    copy = json.dumps(json.loads(loaded.enqueued[1])).encode()
    assert fxq.remove([copy]) == 0
    assert api.queues.queue("nope").remove([loaded.enqueued[1]]) == 0


def test_remove_jobs_releases_unique_locks_only_when_asked_and_still_held(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.23's two unique jobs and the locks Exq took for them
    loaded = load_payloads(redis_client, keys, EXQ23)
    locks = load_locks(redis_client, keys)
    unique_a, unique_b = loaded.enqueued[9], loaded.enqueued[10]
    assert set(locks) == {token_of(unique_a), token_of(unique_b)}

    # When job A is removed without clearing, then put back and removed with clearing
    assert api.queues.queue("fxq").remove([unique_a]) == 1
    kept = redis_client.get(keys.unique(token_of(unique_a)))
    redis_client.lpush(keys.queue("fxq"), unique_a)
    assert api.queues.queue("fxq").remove([unique_a], clear_unique_tokens=True) == 1

    # Then the lock stayed the first time and was released the second
    assert kept == jid_of(unique_a).encode()
    assert redis_client.get(keys.unique(token_of(unique_a))) is None
    assert redis_client.get(keys.unique(token_of(unique_b))) == jid_of(unique_b).encode()

    # When B's lock has meanwhile passed to another job, and B is removed with clearing
    redis_client.set(keys.unique(token_of(unique_b)), "other-jid")
    assert api.queues.queue("fxq").remove([unique_b], clear_unique_tokens=True) == 1

    # Then the other job's lock is untouched (compare-and-delete)
    assert redis_client.get(keys.unique(token_of(unique_b))) == b"other-jid"


def test_clear_queue_keeps_the_name_and_remove_queue_forgets_it(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.13's queue of 8 jobs
    load_payloads(redis_client, keys, EXQ13)

    # When the queue is cleared
    cleared = api.queues.queue("fxq").clear()

    # Then its jobs are gone but the queue is still known
    assert cleared == 8
    assert api.queues.sizes() == {"fxq": 0}

    # When jobs come back and the queue is removed
    redis_client.lpush(keys.queue("fxq"), *fixture_lines(f"{EXQ13}/enqueued.jsonl")[:2])
    removed = api.queues.queue("fxq").delete()

    # Then both the jobs and the name are gone; unknown queues are no error
    assert removed == 2
    assert api.queues.names() == []
    assert redis_client.exists(keys.queue("fxq")) == 0
    assert (api.queues.queue("nope").clear(), api.queues.queue("nope").delete()) == (0, 0)


def test_members_that_are_not_jobs_are_listed_and_handled(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a queue and the dead set holding bytes that are not jobs, among real jobs
    loaded = load_payloads(redis_client, keys, EXQ23)
    junk = [b"not json", b"\xff\xfe{", b'{"class":1,"args":[]}', b"[1,2]"]
    redis_client.lpush(keys.queue("fxq"), *junk)
    redis_client.zadd(keys.dead, {raw: 100.0 + i for i, raw in enumerate(junk)})

    # When the operator lists, finds, removes and requeues
    listed = api.queues.queue("fxq").page(size=100)
    dead = api.dead.page(size=100)

    # Then the junk is listed with no job, and never breaks a find
    assert [e.raw for e in listed[:4]] == list(reversed(junk))
    assert [e.job for e in listed[:4]] == [None] * 4
    assert all(e.jid is None and e.to_dict() is None for e in listed[:4])
    assert len(dead) == len(loaded.dead) + 4
    assert api.queues.queue("fxq").find(jid_of(loaded.enqueued[0])) is not None
    assert api.dead.find("no-such-jid") is None
    assert api.queues.queue("fxq").remove(junk[:2]) == 2
    # a member that names no queue is requeued to "default", byte for byte
    assert api.dead.requeue([junk[0]]) == 1
    assert redis_client.lrange(keys.queue("default"), 0, -1) == [junk[0]]


# -- retry, schedule and dead sets -----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_sets_list_soonest_first_and_dead_newest_first(
    api: Api, redis_client: redis.Redis, keys: Keys, version: str
) -> None:
    # Given the retry, schedule and dead sets a real library wrote
    loaded = load_payloads(redis_client, keys, version)

    # When the operator lists them
    retries, scheduled, dead = api.retries.page(), api.scheduled.page(), api.dead.page()

    # Then retry and schedule are soonest first, dead newest first, with scores
    def pairs(entries: list[Entry]) -> list[tuple[bytes, float | None]]:
        return [(e.raw, e.score) for e in entries]

    def expected(members: list[tuple[bytes, str]]) -> list[tuple[bytes, float | None]]:
        return [(m, float(s)) for m, s in soonest_first(members)]

    assert pairs(retries) == expected(loaded.retry)
    assert pairs(scheduled) == expected(loaded.scheduled)
    assert pairs(dead) == list(reversed(expected(loaded.dead)))
    assert all(e.job is not None for e in retries + scheduled + dead)
    assert (api.retries.size(), api.scheduled.size(), api.dead.size()) == (
        len(loaded.retry), len(loaded.scheduled), len(loaded.dead))
    # paging
    assert pairs(api.dead.page(offset=1, size=1)) == list(reversed(expected(loaded.dead)))[1:2]
    assert pairs(api.scheduled.page(offset=1, size=2)) == expected(loaded.scheduled)[1:3]
    assert api.retries.page(size=0) == []
    assert api.retries.page(offset=100) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_find_in_sets_by_jid_with_and_without_score(
    api: Api, redis_client: redis.Redis, keys: Keys, version: str
) -> None:
    # Given the three sets of a real library (a retried job is in retry twice)
    loaded = load_payloads(redis_client, keys, version)
    finders = ((api.retries.find, loaded.retry, False),
               (api.scheduled.find, loaded.scheduled, False),
               (api.dead.find, loaded.dead, True))

    for find, members, newest_first in finders:
        for member, score in members:
            jid = jid_of(member)
            same_jid = soonest_first([(m, s) for m, s in members if jid_of(m) == jid])
            # When found with the score exactly as Redis printed it, or as a float
            by_text = find(jid, score)
            by_float = find(jid, float(score))
            # Then that very member comes back, with its score
            assert by_text is not None and by_text.raw == member
            assert by_float is not None and by_float.raw == member
            assert by_text.score == float(score)
            # When found by jid alone: the soonest (retry, schedule) or newest (dead)
            found = find(jid)
            assert found is not None
            assert found.raw == same_jid[-1 if newest_first else 0][0]
            # And a wrong score or an unknown jid finds nothing
            assert find(jid, float(score) + 1) is None
        assert find("no-such-jid") is None
        assert find("no-such-jid", 1.0) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_remove_from_sets_by_raw_member(
    api: Api, redis_client: redis.Redis, keys: Keys, version: str
) -> None:
    # Given the three sets of a real library
    loaded = load_payloads(redis_client, keys, version)

    # When one member of each is removed (twice)
    results = [
        (api.retries.remove([loaded.retry[0][0]]), api.retries.remove([loaded.retry[0][0]])),
        (api.scheduled.remove([loaded.scheduled[0][0]]),
         api.scheduled.remove([loaded.scheduled[0][0]])),
        (api.dead.remove([loaded.dead[0][0]]), api.dead.remove([loaded.dead[0][0]])),
    ]

    # Then each went once and the rest stayed
    assert results == [(1, 0)] * 3
    assert [e.raw for e in api.retries.page()] == [m for m, _ in soonest_first(loaded.retry[1:])]
    assert api.scheduled.size() == len(loaded.scheduled) - 1
    assert api.dead.size() == len(loaded.dead) - 1
    assert api.dead.find(jid_of(loaded.dead[0][0]), loaded.dead[0][1]) is None
    assert api.retries.remove([]) == 0


def test_remove_retry_with_clear_unique_tokens_releases_the_lock(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.23's unique job waiting in retry, and its lock
    unique = fixture_lines(f"{EXQ23}/enqueued.jsonl")[9]
    load_locks(redis_client, keys)
    redis_client.zadd(keys.retry, {unique: 1795867400.5})

    # When it is removed from retry with clear_unique_tokens
    removed = api.retries.remove([unique], clear_unique_tokens=True)

    # Then the job and its lock are gone
    assert removed == 1
    assert redis_client.get(keys.unique(token_of(unique))) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_requeue_dead_moves_the_exact_bytes_and_keeps_the_error(
    api: Api, redis_client: redis.Redis, keys: Keys, version: str
) -> None:
    # Given a dead job of a real library
    loaded = load_payloads(redis_client, keys, version)
    member, score = loaded.dead[-1]

    # When the operator requeues it (twice)
    moved, again = api.dead.requeue([member]), api.dead.requeue([member])

    # Then it moved once, byte for byte, to the head of its queue, error fields kept
    assert (moved, again) == (1, 0)
    assert redis_client.lindex(keys.queue(loaded.queue), 0) == member
    head = api.queues.queue(loaded.queue).page(size=1)[0]
    error = head.to_dict()
    assert error is not None
    assert error["error_class"] == ("ArgumentError" if version == SIDEKIQ else "ExqGenericError")
    assert error["error_message"]
    assert "failed_at" in error
    assert api.dead.size() == len(loaded.dead) - 1
    assert api.dead.find(jid_of(member), score) is None
    assert api.dead.requeue([b'{"jid":"not-a-member"}']) == 0


def test_requeue_retry_scheduled_and_retry_job(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.23's retry and schedule sets and an empty queue
    loaded = load_payloads(redis_client, keys, EXQ23)
    api.queues.queue("fxq").clear()

    # When one retry is requeued, the schedule emptied and a retry retried by jid
    first = api.retries.requeue([loaded.retry[0][0]])
    scheduled = api.scheduled.requeue_all()
    job_c = loaded.retry[1][0]
    retried = api.retries.requeue_jid(jid_of(job_c))

    # Then exactly those members are in the queue, unchanged, newest first
    assert (first, scheduled, retried) == (1, 3, 1)
    moved = [loaded.retry[0][0], *[m for m, _ in soonest_first(loaded.scheduled)], job_c]
    assert [e.raw for e in api.queues.queue("fxq").page()] == list(reversed(moved))
    assert (api.retries.size(), api.scheduled.size()) == (1, 0)
    assert api.retries.requeue_jid("no-such-jid") == 0
    assert api.retries.requeue_jid(jid_of(job_c)) == 0
    assert api.scheduled.requeue_all() == 0


def test_requeue_all_pages_through_a_large_set(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given 1234 dead jobs on two queues
    members = {json.dumps({"args": [i], "class": "W", "jid": f"j{i}", "queue": f"q{i % 2}"})
               .encode(): float(i) for i in range(1234)}
    redis_client.zadd(keys.dead, members)

    # When every dead job is requeued
    moved = api.dead.requeue_all()

    # Then all moved, none twice, to their own queues
    assert moved == 1234
    assert api.dead.size() == 0
    assert api.queues.sizes() == {"q0": 617, "q1": 617}
    queued = redis_client.lrange(keys.queue("q0"), 0, -1) + redis_client.lrange(
        keys.queue("q1"), 0, -1)
    assert sorted(queued) == sorted(members)
    assert api.retries.requeue_all() == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_kill_moves_retries_to_the_dead_set_byte_for_byte_and_trims_it(
    make_config: Callable[..., Config], redis_client: redis.Redis, keys: Keys, version: str
) -> None:
    # Given a library's retry and schedule sets, and a dead set kept to 3 entries
    loaded = load_payloads(redis_client, keys, version)
    with Api(make_config(dead_max_jobs=3)) as api:
        dead_before = api.dead.size()
        member = loaded.retry[0][0]

        # When one retry is killed (twice), then every scheduled job
        before = time.time()
        killed, again = api.retries.kill([member]), api.retries.kill([member])
        all_scheduled = api.scheduled.kill_all()

        # Then each moved once, unchanged, scored now; the dead set trimmed to 3
        assert (killed, again) == (1, 0)
        assert all_scheduled == len(loaded.scheduled)
        assert api.scheduled.size() == 0
        assert api.retries.size() == len(loaded.retry) - 1
        assert api.dead.size() == min(3, dead_before + 1 + len(loaded.scheduled))
        newest = {e.raw for e in api.dead.page(size=3)}
        assert newest <= {member, *(m for m, _ in loaded.scheduled)}
        assert all(e.score is not None and e.score >= before for e in api.dead.page(size=3))
        with pytest.raises(ValueError, match="already dead"):
            api.dead.kill([member])
        assert api.retries.kill([b'{"jid":"not-a-member"}']) == 0

    # And with room for every entry, one older than dead_timeout_in_seconds goes
    ancient = b'{"class":"Old","args":[],"jid":"old"}'
    redis_client.zadd(keys.dead, {ancient: time.time() - 3600})
    with Api(make_config(dead_timeout_in_seconds=60)) as api:
        assert api.retries.kill([loaded.retry[1][0]]) == 1
        assert redis_client.zscore(keys.dead, ancient) is None
        assert redis_client.zscore(keys.dead, loaded.retry[1][0]) is not None


def test_concurrent_requeues_of_the_same_member_move_it_once(
    config: Config, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.13's dead jobs and eight operators
    loaded = load_payloads(redis_client, keys, EXQ13)
    api_calls = 8
    barrier = threading.Barrier(api_calls)
    results: list[int] = []
    lock = threading.Lock()

    def operator() -> None:
        with Api(config) as api:
            raws = [m for m, _ in loaded.dead]
            barrier.wait(5)
            moved = api.dead.requeue(raws)
        with lock:
            results.append(moved)

    # When they all requeue the same members at the same moment
    threads = [threading.Thread(target=operator) for _ in range(api_calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    # Then each member was moved exactly once in total
    assert len(results) == api_calls
    assert sum(results) == len(loaded.dead)
    queued = redis_client.lrange(keys.queue("fxq"), 0, -1)
    for member, _ in loaded.dead:
        assert queued.count(member) == 1
    assert redis_client.zcard(keys.dead) == 0


def test_clear_sets_and_clear_failed(api: Api, redis_client: redis.Redis, keys: Keys) -> None:
    # Given Exq 0.23's sets and stats
    loaded = load_payloads(redis_client, keys, EXQ23)
    load_stats(redis_client, keys, EXQ23)

    # When retries and the schedule are cleared
    cleared = (api.retries.clear(), api.scheduled.clear())

    # Then they are empty and the dead set and counters untouched
    assert cleared == (len(loaded.retry), len(loaded.scheduled))
    assert (api.retries.size(), api.scheduled.size(), api.dead.size()) == (0, 0, 2)

    # When the failures are cleared (Exq's clear_failed)
    assert api.stats.clear_failed() == 2

    # Then the failed counter is 0 and the dead set gone; processed is kept
    assert (api.stats.total("failed"), api.stats.total("processed"), api.dead.size()) == (0, 5, 0)
    redis_client.zadd(keys.dead, {loaded.dead[0][0]: 1.0})
    assert api.dead.clear() == 1
    assert api.dead.page() == []


# -- one JobSet type for the three sets ------------------------------------------------


class ScriptKeysRecorder(redis.Redis):
    """A real client that also notes the KEYS of every script it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script_keys: list[list[str]] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        self.script_keys.append([k.decode() if isinstance(k, bytes) else str(k)
                                 for k in keys_and_args[:numkeys]])
        return super().evalsha(sha, numkeys, *keys_and_args)


SET_NAMES: tuple[SetName, ...] = ("retry", "schedule", "dead")


def set_view(api: Api, name: SetName) -> JobSet:
    return {"retry": api.retries, "schedule": api.scheduled, "dead": api.dead}[name]


def set_members() -> list[tuple[bytes, float]]:
    """Four members as another library might store them: key order, spacing and a
    unicode escape that a re-encoding would change; one names no queue, one is junk."""
    return [
        (b'{"queue":"fxq","class":"A","args":[1],"jid":"j-1","enqueued_at":1.5}', 100.25),
        (b'{"jid": "j-2", "queue": "fxq", "class": "B", "args": ["\\u00e9"]}', 200.5),
        (b'{"jid":"j-3","class":"C","args":[]}', 300.0),
        (b"not json at all", 400.0),
    ]


@pytest.mark.parametrize("name", SET_NAMES)
def test_each_set_is_the_same_job_set_listing_finding_and_removing_exact_bytes(
    api: Api, redis_client: redis.Redis, keys: Keys, name: SetName
) -> None:
    # Given four members in the set ``name``
    view = set_view(api, name)
    members = set_members()
    redis_client.zadd(view.key, dict(members))
    order = list(reversed(members)) if name == "dead" else members

    # When it is listed, searched and two members are removed
    listed = view.page()
    found, at_score = view.find("j-2"), view.find("j-2", 200.5)
    removed = view.remove([members[0][0], members[3][0], b'{"jid":"j-1"}'])

    # Then it is a JobSet on P(<name>), listed in its order with exact bytes and scores
    assert type(view) is JobSet and view.key == keys.p(name)
    assert [(e.raw, e.score) for e in listed] == order
    assert listed[-1 if name == "dead" else 0].job is not None
    assert [e.job for e in listed if e.raw == b"not json at all"] == [None]
    assert found == at_score == Entry(members[1][0], None, 200.5)
    assert view.find("j-2", 200.0) is None
    # and only the exact bytes named were removed
    assert removed == 2
    assert redis_client.zrange(view.key, 0, -1, withscores=True) == [members[1], members[2]]
    assert view.size() == 2


@pytest.mark.parametrize("name", SET_NAMES)
def test_each_set_requeues_byte_for_byte_naming_every_key_it_touches(
    config: Config, redis_url: str, redis_client: redis.Redis, keys: Keys, name: SetName
) -> None:
    # Given four members in the set ``name``, seen through a client noting script KEYS
    recorder = ScriptKeysRecorder.from_url(redis_url)
    members = set_members()
    with Api(config, client=recorder) as api:
        view = set_view(api, name)
        redis_client.zadd(view.key, dict(members))

        # When one member is requeued by jid, then all the others
        one = view.requeue_jid("j-2")
        rest = view.requeue_all()
        again = view.requeue([members[0][0]])
    recorder.close()

    # Then each moved once, byte for byte, to the front of its queue (default when it
    # names none or is not JSON); the set is gone
    assert (one, rest, again) == (1, 3, 0)
    later = [members[i][0] for i in ((3, 2, 0) if name == "dead" else (0, 2, 3))]
    by_queue = {"fxq": [m for m in later if b'"fxq"' in m], "default": []}
    by_queue["default"] = [m for m in later if m not in by_queue["fxq"]]
    assert redis_client.lrange(keys.queue("fxq"), 0, -1) == [
        *reversed(by_queue["fxq"]), members[1][0]]
    assert redis_client.lrange(keys.queue("default"), 0, -1) == list(reversed(by_queue["default"]))
    assert redis_client.smembers(keys.queues) == {b"fxq", b"default"}
    assert not redis_client.exists(view.key)
    # and each script call named every key it touched in KEYS, and nothing else: the
    # set, the queues set, the target queues (a Redis Cluster sees them all)
    targets = {keys.queue("fxq"), keys.queue("default")}
    assert recorder.script_keys and all(
        k[:2] == [keys.p(name), keys.queues] and set(k[2:]) <= targets and len(k) > 2
        for k in recorder.script_keys)


# -- stats -----------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "processed", "failed"),
                         [(EXQ23, 5, 3), (EXQ13, 5, 3), (SIDEKIQ, 8, 3)])
def test_counters_and_per_day_stats_match_the_fixture(
    api: Api, redis_client: redis.Redis, keys: Keys, version: str, processed: int, failed: int
) -> None:
    # Given the stat keys a real library wrote on 2026-11-28
    load_stats(redis_client, keys, version)

    # When the operator reads totals and per-day counters
    per_day = api.stats.for_dates("processed", ["2026-11-28", date(2026, 11, 27)])
    week = api.stats.daily("failed", days=3, today=FIXTURE_DAY)

    # Then they are the fixture's values, 0 where nothing was written
    assert (api.stats.total("processed"), api.stats.total("failed")) == (processed, failed)
    assert per_day == [processed, 0]
    assert api.stats.for_dates("failed", []) == []
    assert list(week.items()) == [("2026-11-28", failed), ("2026-11-27", 0), ("2026-11-26", 0)]
    assert len(api.stats.daily("processed")) == 7


def test_dashboard_stats_of_exq_data(api: Api, redis_client: redis.Redis, keys: Keys) -> None:
    # Given Exq 0.23's jobs, sets, stats and two running jobs on node "vm"
    load_payloads(redis_client, keys, EXQ23)
    load_stats(redis_client, keys, EXQ23)
    load_inflight(redis_client, keys, EXQ23)

    # When the dashboard numbers are read
    stats = api.stats.summary()

    # Then they add up as Sidekiq's dashboard would show them, with the two running jobs
    # (in node vm's backup list) in flight
    assert stats == Stats(processed=5, failed=3, retry_size=3, scheduled_size=3, dead_size=2,
                          enqueued=11, busy=2, processes=1, in_flight=2)
    # And the backup list is listed with its node, which is alive (its record beats)
    [backup] = api.processes.backups()
    assert (backup.node_id, backup.queue, backup.size) == ("vm", "fxq", 2)


def test_realtime_stats_are_time_sorted_and_stay_in_the_namespace(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    # Given Exq's per-second counters in a namespace whose name is a glob, and a
    # neighbour namespace that the unescaped glob would match
    globbed, neighbour = Keys(namespace + "?"), Keys(namespace + "x")
    try:
        load_stats(redis_client, globbed, EXQ23)
        redis_client.set(globbed.stat_rt("failed", 1795867300.0), 7, ex=120)
        redis_client.set(neighbour.stat_rt("failed", 1795867000.0), 99, ex=120)

        # When the operator reads the realtime stats
        with Api(Config(redis_url=redis_url, namespace=globbed.namespace)) as api:
            failures, successes = api.stats.realtime()

        # Then each kind lists its seconds in time order, and only this namespace's
        assert failures == [("2026-11-28 12:01:40Z", 7), ("2026-11-28 12:02:02Z", 3)]
        assert successes == [("2026-11-28 12:02:02Z", 5)]
    finally:
        delete_namespace(redis_client, globbed.namespace)
        delete_namespace(redis_client, neighbour.namespace)


def test_bad_arguments_raise_value_error_with_a_clear_message(api: Api) -> None:
    # Given an Api; When it is called with bad arguments; Then ValueError says what is wrong
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: api.queues.queue("fxq").page(size=-1), "size"),
        (lambda: api.queues.queue("fxq").page(offset=-5), "offset"),
        (lambda: api.dead.page(size=True), "size"),
        (lambda: api.stats.total("bogus"), "stat kind"),
        (lambda: api.stats.for_dates("processed", ["28/11/2026"]), "not a date"),
        (lambda: api.stats.daily("failed", days=0), "days"),
        (lambda: api.dead.remove(b"raw bytes, not a list"), "list"),  # type: ignore[arg-type]
        (lambda: api.retries.requeue([42]), "bytes or str"),  # type: ignore[list-item]
        (lambda: api.queues.queue("fxq").find(""), "jid"),
        (lambda: api.queues.queue("").size(), "queue"),
        (lambda: api.retries.find("j", "soon"), "score"),
        (lambda: api.processes.send_signal("vm", ""), "signal"),
    ]
    for call, words in calls:
        with pytest.raises(ValueError, match=words):
            call()


# -- nodes and processes ---------------------------------------------------------------


def test_nodes_and_processes_of_the_exq_023_inflight_fixture(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given the keys Exq 0.23 wrote while node "vm" ran two slow jobs
    fixture = load_inflight(redis_client, keys, EXQ23)
    backup = fixture["backup_list"]["members_lrange_order"]

    # When the operator lists nodes and in-progress jobs
    nodes, processes = api.processes.nodes(), api.processes.running()

    # Then node "vm" shows as Exq wrote it: pid a string, busy 2, concurrency 0
    assert nodes == [NodeInfo(
        identity="vm", hostname="vm", pid="29197", started_at=1795867331.374803,
        queues=("fxq",), busy=2, quiet=False, concurrency=0, beat=1795867336.378132,
        source="exq", labels=(), tag="", version=None)]
    assert api.processes.busy() == 2
    # and its two jobs, with Exq's worker pids, queue and start times
    assert [(p.node, p.field, p.queue, p.run_at) for p in processes] == [
        ("vm", "#PID<0.248.0>", "fxq", 1795867331.394745),
        ("vm", "#PID<0.249.0>", "fxq", 1795867331.394768)]
    assert sorted(str(p.jid) for p in processes) == sorted(jid_of(m.encode()) for m in backup)
    assert all(p.job is not None and p.job.job_class == "Bench.SlowWorker" for p in processes)
    assert api.processes.running("vm") == processes
    assert api.processes.running("other") == []


def test_exq_013_process_records_are_tolerated(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Exq 0.13's processes set: JSON records, not node ids
    load_inflight(redis_client, keys, EXQ13)

    # When the operator lists nodes and in-progress jobs
    nodes, processes = api.processes.nodes(), api.processes.running()

    # Then host "vm" shows as an "exq-0.13" node with its two jobs
    assert [(n.identity, n.source, n.busy, n.queues, n.started_at) for n in nodes] == [
        ("vm", "exq-0.13", 2, ("fxq",), 1795867298.286085)]
    assert api.processes.busy() == 2
    assert [(p.node, p.field, p.queue) for p in processes] == [
        ("vm", "<0.195.0>", "fxq"), ("vm", "<0.196.0>", "fxq")]
    assert [p.job.args for p in processes if p.job] == [[1, "slow"], [2, "slow"]]
    with pytest.raises(LookupError):
        api.processes.cancel("vm", "no-such-jid")

    # When dead nodes are pruned (Exq 0.23 prunes these records too)
    pruned = api.processes.prune_dead_nodes()

    # Then the records are gone
    assert len(pruned) == 2
    assert (api.processes.nodes(), api.processes.running()) == ([], [])


def test_sidekiq_process_in_a_named_namespace(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given Sidekiq 6.4 (with redis-namespace) running two jobs in this namespace
    load_inflight(redis_client, keys, SIDEKIQ)

    # When the operator lists nodes and in-progress jobs
    (node,) = api.processes.nodes()
    processes = api.processes.running()

    # Then the process shows as Sidekiq wrote it, its jobs from its :workers hash
    assert (node.identity, node.source, node.pid, node.concurrency, node.busy) == (
        SIDEKIQ_ID, "sidekiq", 23629, 2, 2)
    assert node.beat == 1795868938.9786162
    assert sorted((p.field, p.run_at) for p in processes) == [
        ("hlp", 1795868934.0), ("ho1", 1795868934.0)]
    assert sorted(p.job.args[1] for p in processes if p.job) == ["slow-1", "slow-2"]


def test_odd_registry_members_never_break_the_listing(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given node "vm", a member whose info is not JSON, one whose key is not a hash,
    # and a workers hash holding a record that is not JSON
    load_inflight(redis_client, keys, EXQ23)
    redis_client.sadd(keys.processes, "junk-info", "not-a-hash")
    redis_client.hset(keys.node("junk-info"), mapping={"info": "{oops", "busy": "x"})
    redis_client.rpush(keys.node("not-a-hash"), "a list")
    redis_client.hset(keys.workers("junk-info"), "w1", b"\xff not json")

    # When the operator lists nodes and processes, and prunes
    nodes, processes = api.processes.nodes(), api.processes.running()
    pruned = api.processes.prune_dead_nodes()

    # Then the junk node is listed with what can be read, the list is skipped,
    # the bad record is listed without a job, and nothing readable-but-odd is pruned
    assert [(n.identity, n.busy, n.pid) for n in nodes] == [
        ("junk-info", 0, None), ("vm", 2, "29197")]
    junk = [p for p in processes if p.node == "junk-info"]
    assert [(p.field, p.payload_raw, p.job) for p in junk] == [("w1", b"\xff not json", None)]
    assert pruned == []
    assert redis_client.scard(keys.processes) == 3


def test_prune_dead_nodes_removes_a_dead_entry_and_keeps_a_live_one(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given live node "vm" and a dead node "ghost" (no node hash) with a stale record
    fixture = load_inflight(redis_client, keys, EXQ23)
    record = next(iter(fixture["workers_hash"]["fields_hgetall_order"].values()))
    redis_client.sadd(keys.processes, "ghost")
    redis_client.hset(keys.workers("ghost"), "#PID<0.1.0>", record)
    assert {p.node for p in api.processes.running()} == {"vm", "ghost"}

    # When dead nodes are pruned
    pruned = api.processes.prune_dead_nodes()

    # Then only the ghost is gone, with its record; vm keeps everything
    assert pruned == ["ghost"]
    assert redis_client.smembers(keys.processes) == {b"vm"}
    assert redis_client.exists(keys.workers("ghost")) == 0
    assert redis_client.hlen(keys.workers("vm")) == 2
    assert [n.identity for n in api.processes.nodes()] == ["vm"]
    assert api.processes.prune_dead_nodes() == []


def test_prune_dead_nodes_is_a_plain_function_of_a_client_and_keys(
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given, without any Api, a live node and a stopped one with both in-progress hashes
    redis_client.sadd(keys.processes, "live", "gone")
    redis_client.hset(keys.node("live"), mapping={"info": '{"busy":0}', "busy": "0"})
    redis_client.hset(keys.workers("live"), "#PID<0.1.0>", '{"queue":"q"}')
    redis_client.hset(keys.workers("gone"), "#PID<0.2.0>", '{"queue":"q"}')
    redis_client.hset(keys.sidekiq_work("gone"), "tid", '{"queue":"q"}')
    live_before = (redis_client.hgetall(keys.node("live")),
                   redis_client.hgetall(keys.workers("live")))

    # When the prune runs on the bare client (as the node pinger does)
    pruned = prune_dead_nodes(redis_client, keys)

    # Then the stopped node and its hashes are gone; the live one is byte for byte kept
    assert pruned == ["gone"]
    assert redis_client.smembers(keys.processes) == {b"live"}
    assert redis_client.exists(keys.workers("gone"), keys.sidekiq_work("gone")) == 0
    assert (redis_client.hgetall(keys.node("live")),
            redis_client.hgetall(keys.workers("live"))) == live_before


def test_clear_processes_and_signals_to_an_exq_node(
    api: Api, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given node "vm" running two jobs
    load_inflight(redis_client, keys, EXQ23)
    running = api.processes.running()[1]

    # When the operator quiets it and cancels one of its jobs
    api.processes.quiet("vm")
    api.processes.cancel("vm", running.jid or "")

    # Then the node's signal list holds both, newest first, expiring in 60 s
    signals = cast(list[bytes], redis_client.lrange(keys.signals("vm"), 0, -1))
    assert signals[1] == b"TSTP"
    assert signals[0].startswith(b"CANCEL:")
    assert json.loads(signals[0][len(b"CANCEL:"):]) == {"pid": running.field, "jid": running.jid}
    assert 0 < redis_client.ttl(keys.signals("vm")) <= 60

    # When the processes are cleared
    api.processes.clear_running()

    # Then no job shows, the node stays
    assert api.processes.running() == []
    assert [n.identity for n in api.processes.nodes()] == ["vm"]


def test_a_running_exq_fast_node_is_listed_quieted_and_cancels_a_job(
    api: Api, make_config: Callable[..., Config], make_node: Callable[[Config], Node],
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a running exq-fast node with a job blocked in its worker
    node = make_node(make_config(queues=[("fxq", 2)], poll_timeout=10))
    jid = enqueuer.enqueue("fxq", "Api.Blocker", [1])
    assert isinstance(jid, str)
    assert node.started.wait(10)
    node.ping()

    # When the operator lists nodes and in-progress jobs
    (info,) = api.processes.nodes()
    (process,) = api.processes.running()

    # Then the node shows with this process's pid, its queue, one busy worker
    assert (info.identity, info.source, info.pid, info.busy, info.queues, info.quiet) == (
        node_id, "exq", os.getpid(), 1, ("fxq",), False)
    assert (info.hostname, info.concurrency) == (socket.gethostname(), 2)
    assert info.beat is not None and abs(info.beat - time.time()) < 10
    assert (process.node, process.jid, process.queue) == (node_id, jid, "fxq")
    assert api.processes.busy() == 1
    assert api.stats.summary().processes == 1

    # When the operator quiets the node
    api.processes.quiet(node_id)
    node.ping_until(lambda: node.exq.subscriptions() == [], "TSTP handled")
    node.ping()

    # Then it reports quiet, with no queue, its job still running
    (info,) = api.processes.nodes()
    assert (info.quiet, info.queues, info.busy) == (True, (), 1)

    # When the operator cancels the job and the job returns
    api.processes.cancel(node_id, jid)
    node.ping_until(lambda: node.jobs[0].cancelled, "CANCEL handled")
    node.gate.set()

    # Then the job is dead with "Canceled" and no longer in progress
    wait_for(lambda: api.dead.find(jid) is not None, what="the cancelled job in dead")
    dead = api.dead.find(jid)
    assert dead is not None and dead.to_dict()["error_message"] == "Canceled"  # type: ignore[index]
    node.ping_until(lambda: api.processes.running() == [], "no job in progress")
    assert api.processes.busy() == 0
    with pytest.raises(LookupError):
        api.processes.cancel(node_id, jid)


def test_stop_signal_shuts_a_running_exq_fast_node_down(
    api: Api, make_config: Callable[..., Config], make_node: Callable[[Config], Node],
    node_id: str
) -> None:
    # Given a running exq-fast node
    node = make_node(make_config(queues=["fxq"], poll_timeout=10))
    node.ping()
    assert [n.identity for n in api.processes.nodes()] == [node_id]

    # When the operator stops it
    api.processes.stop(node_id)
    node.ping()

    # Then it shuts down and unregisters
    assert node.exq.stopped.wait(10)
    assert api.processes.nodes() == []


# -- the empty namespace (Sidekiq 7's layout) -------------------------------------------


def test_empty_namespace_sidekiq_and_exq_data(empty: EmptyNamespace) -> None:
    # Given, with no namespace: Sidekiq 6.4's jobs, sets, stats and running process,
    # and Exq 0.23's node "vm" (registered in ":processes", Exq's quirk)
    api, client, keys = empty.api, empty.client, empty.keys
    loaded = load_payloads(client, keys, SIDEKIQ)
    load_stats(client, keys, SIDEKIQ)
    load_inflight(client, keys, SIDEKIQ)
    load_inflight(client, keys, EXQ23)
    assert client.smembers("processes") == {SIDEKIQ_ID.encode()}
    assert client.smembers(":processes") == {b"vm"}

    # When the operator reads queues, sets and stats
    # Then they are Sidekiq's keys, in Sidekiq's order
    assert api.queues.names() == ["default"]
    assert [e.raw for e in api.queues.queue("default").page(size=100)] == loaded.listed
    assert [e.raw for e in api.dead.page()] == [m for m, _ in reversed(soonest_first(loaded.dead))]
    assert api.retries.find(jid_of(loaded.retry[0][0]), loaded.retry[0][1]) is not None
    assert api.stats.summary() == Stats(processed=8, failed=3, retry_size=6, scheduled_size=6,
                                dead_size=3, enqueued=13, busy=4, processes=2, in_flight=2)
    assert api.stats.realtime() == ([], [])
    assert api.stats.daily("processed", 1, today=FIXTURE_DAY) == {"2026-11-28": 8}

    # When a dead job is requeued
    member = loaded.dead[0][0]
    assert api.dead.requeue([member]) == 1

    # Then it is at the head of Sidekiq's queue:default, unchanged
    assert client.lindex("queue:default", 0) == member

    # When nodes and processes are listed
    nodes = api.processes.nodes()
    processes = api.processes.running()

    # Then both registries are read: the Exq node and the Sidekiq process
    assert [(n.identity, n.source, n.pid, n.busy) for n in nodes] == [
        ("vm", "exq", "29197", 2), (SIDEKIQ_ID, "sidekiq", 23629, 2)]
    assert sorted((p.node, p.field) for p in processes) == [
        ("vm", "#PID<0.248.0>"), ("vm", "#PID<0.249.0>"),
        (SIDEKIQ_ID, "hlp"), (SIDEKIQ_ID, "ho1")]
    assert api.processes.busy() == 4

    # When signals are sent to each
    api.processes.quiet("vm")
    slow_1 = next(p for p in processes if p.field == "ho1")
    api.processes.cancel(SIDEKIQ_ID, slow_1.jid or "")

    # Then each goes to Exq's ":<id>-signals" and to Sidekiq's "<id>-signals"
    assert client.lrange(":vm-signals", 0, -1) == [b"TSTP"]
    assert client.lrange("vm-signals", 0, -1) == [b"TSTP"]
    expected = {"pid": "ho1", "jid": slow_1.jid}
    for key in (f":{SIDEKIQ_ID}-signals", f"{SIDEKIQ_ID}-signals"):
        (signal,) = cast(list[bytes], client.lrange(key, 0, -1))
        assert json.loads(signal.removeprefix(b"CANCEL:")) == expected
        assert 0 < client.ttl(key) <= 60

    # When a ghost sits in both registries and dead nodes are pruned
    client.sadd(":processes", "ghost")
    client.sadd("processes", "ghost")
    client.hset("ghost:workers", "x", "{}")
    pruned = api.processes.prune_dead_nodes()

    # Then only the ghost goes; both live nodes stay
    assert pruned == ["ghost"]
    assert client.exists("ghost:workers") == 0
    assert [n.identity for n in api.processes.nodes()] == ["vm", SIDEKIQ_ID]

    # When the processes are cleared
    api.processes.clear_running()

    # Then no job shows
    assert api.processes.running() == []


def test_empty_namespace_exq_fast_node_is_listed_once_and_gets_signals(
    empty: EmptyNamespace, make_node: Callable[[Config], Node]
) -> None:
    # Given an exq-fast node on the empty namespace running one job: it registers in
    # both ":processes" and "processes" and records its job in ":workers" and ":work"
    api, client, keys = empty.api, empty.client, empty.keys
    node_id = "api-" + uuid.uuid4().hex[:8]
    config = Config(redis_url=empty.url, namespace="", node_id=node_id,
                    queues=[("fxq", 2)], poll_timeout=10)
    node = make_node(config)
    with Enqueuer(config) as enqueuer:
        jid = enqueuer.enqueue("fxq", "Api.Blocker", [1])
    assert node.started.wait(10)
    wait_for(lambda: client.hlen(keys.workers(node_id)) == 1, what="the :workers record")
    node.ping()
    assert client.sismember(":processes", node_id) and client.sismember("processes", node_id)
    assert client.hlen(f"{node_id}:work") == 1

    # When the operator lists nodes and processes
    nodes, processes = api.processes.nodes(), api.processes.running()

    # Then the node and its job are listed once each
    assert [(n.identity, n.source, n.busy) for n in nodes] == [(node_id, "exq", 1)]
    assert [(p.node, p.jid) for p in processes] == [(node_id, jid)]

    # When it is quieted
    api.processes.quiet(node_id)
    assert client.llen(f":{node_id}-signals") == 1
    assert client.llen(f"{node_id}-signals") == 1

    # Then it goes quiet, and a prune keeps it
    node.ping_until(lambda: node.exq.subscriptions() == [], "TSTP handled")
    node.ping()
    assert [n.quiet for n in api.processes.nodes()] == [True]
    assert api.processes.prune_dead_nodes() == []
    assert [n.identity for n in api.processes.nodes()] == [node_id]
