"""Fetching pauses while acks cannot be written, and never on a healthy node.

In-process nodes on a private redis-server. ``CONFIG SET maxmemory 1`` puts it
out of memory at once: every command that grows memory is refused as the first
write of a call, so the stats batches (which start with an in-progress record)
are refused while the fetch script still runs (its first write, the RPOP,
frees memory). ``REPLICAOF`` a closed port makes it a read-only replica that
keeps its data: then every write is refused, the fetch included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from exq_fast import Exq
from exq_fast.config import Config
from exq_fast.embedded import RedisServer, free_port
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from tests.conftest import NodeFactory, wait_for
from tests.test_metrics import scrape

BATCH = 20
CONCURRENCY = 5
BOUND = BATCH + CONCURRENCY
"""Most jobs a node of these tests may hold fetched and unacked."""
PAUSED = "fetching paused"
RESUMED = "fetching resumed"


def short() -> None:
    """A job that outlives a flush (5 ms): it gets an in-progress record."""
    time.sleep(0.01)


@pytest.fixture
def nodes(make_config: Callable[..., Config]) -> Iterator[NodeFactory]:
    made = NodeFactory(make_config)
    yield made
    made.close()


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(private_redis.url)
    yield conn
    conn.close()


def backup_len(client: redis.Redis, keys: Keys, node_id: str) -> int:
    return int(client.llen(keys.backup(node_id, "q")))  # type: ignore[arg-type]


def processed(client: redis.Redis, keys: Keys) -> int:
    return int(client.get(keys.stat("processed")) or 0)  # type: ignore[arg-type]


def lines(caplog: pytest.LogCaptureFixture, needle: str) -> int:
    return sum(1 for r in caplog.records if needle in r.getMessage())


def start_node(nodes: NodeFactory, private_redis: RedisServer, jobs: int,
               **overrides: object) -> tuple[Exq, Keys]:
    config = nodes.config(redis_url=private_redis.url, queues=[("q", CONCURRENCY)],
                          stats_batch_size=BATCH, metrics_port=0, **overrides)
    with Enqueuer(config) as enq:
        enq.enqueue_all([("q", "T.Short", [])] * jobs)
    return nodes.start(config, {"T.Short": short}), Keys(config.namespace)


def test_fetching_pauses_while_acks_are_refused_and_resumes_when_they_land(
    nodes: NodeFactory, private_redis: RedisServer, client: redis.Redis,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exq_fast")
    # Given a node (concurrency 5, batches of 20) working through 600 jobs of 10 ms
    exq, keys = start_node(nodes, private_redis, 600)
    node_id = exq.config.node_id
    wait_for(lambda: processed(client, keys) >= 50, what="50 jobs processed")
    assert scrape(exq).value("exq_fetch_paused") == 0
    # When Redis is out of memory: the ack batches are refused
    client.config_set("maxmemory", 1)
    wait_for(lambda: exq.redis_errors.get("stats_flush", 0) > 0, what="an ack batch refused")
    peak = 0
    deadline = time.monotonic() + 1.5  # the pause is announced after 1 s
    while time.monotonic() < deadline:
        peak = max(peak, backup_len(client, keys, node_id))
        time.sleep(0.005)
    # Then the node stopped fetching at the bound, with jobs still queued
    assert peak <= BOUND - 1, f"{peak} jobs fetched and unacked (bound {BOUND - 1})"
    fetched, queued = exq.fetcher.fetched["q"], client.llen(keys.queue("q"))
    time.sleep(0.5)
    assert exq.fetcher.fetched["q"] == fetched, "nothing fetched while paused"
    assert client.llen(keys.queue("q")) == queued > 0
    assert exq.fetcher.finished_unacked() >= BATCH
    # And it says so once, in the log and the metrics
    m = scrape(exq)
    assert m.value("exq_fetch_paused") == 1
    assert m.value("exq_fetch_pauses_total") == 1
    assert (lines(caplog, PAUSED), lines(caplog, RESUMED)) == (1, 0)
    # When memory is available again
    client.config_set("maxmemory", 0)
    # Then the acks land, fetching resumes (one line) and every job completes
    wait_for(lambda: processed(client, keys) == 600, 30, "600 jobs processed")
    wait_for(lambda: backup_len(client, keys, node_id) == 0, what="backup empty")
    assert not exq.fetcher.paused
    m = scrape(exq)
    assert (m.value("exq_fetch_paused"), m.value("exq_fetch_pauses_total")) == (0, 1)
    assert (lines(caplog, PAUSED), lines(caplog, RESUMED)) == (1, 1)
    assert exq.fetcher.finished_unacked() == 0


def test_a_node_with_more_slots_than_a_batch_is_never_held_back(
    nodes: NodeFactory, private_redis: RedisServer, client: redis.Redis,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exq_fast")
    # Given a healthy node with 40 slots and batches of 2 jobs, and 400 jobs of 20 ms
    running, most = 0, 0
    lock = threading.Lock()

    def counted() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    config = nodes.config(redis_url=private_redis.url, queues=[("q", 40)], stats_batch_size=2,
                          metrics_port=0)
    with Enqueuer(config) as enq:
        enq.enqueue_all([("q", "T.Counted", [])] * 400)
    keys = Keys(config.namespace)
    exq = nodes.start(config, {"T.Counted": counted})
    # When it runs them
    wait_for(lambda: processed(client, keys) == 400, 30, "400 jobs processed")
    # Then it ran far more jobs at once than a batch holds, and never paused
    assert most > 10, most
    assert scrape(exq).value("exq_fetch_pauses_total") == 0
    assert scrape(exq).matching("exq_fetch_pauses_total"), "the counter is exported"
    assert lines(caplog, PAUSED) == 0


def test_a_read_only_redis_stops_fetching_and_loses_nothing(
    nodes: NodeFactory, private_redis: RedisServer, client: redis.Redis
) -> None:
    # Given a node working through 300 jobs of 10 ms
    exq, keys = start_node(nodes, private_redis, 300)
    node_id = exq.config.node_id
    wait_for(lambda: processed(client, keys) >= 30, what="30 jobs processed")
    # When Redis becomes a replica of a master that is gone: read-only, data kept
    client.execute_command("REPLICAOF", "127.0.0.1", free_port())
    with pytest.raises(redis.exceptions.ReadOnlyError):
        client.set("probe", 1)
    wait_for(lambda: {"fetch", "stats_flush"} <= set(exq.redis_errors),
             what="a fetch and an ack batch refused")
    # Then the fetch script is refused too (its RPOP is a write): nothing more is taken,
    # so the unacked jobs stay within the bound without a pause
    queued = client.llen(keys.queue("q"))
    peak = 0
    for _ in range(20):
        peak = max(peak, backup_len(client, keys, node_id))
        time.sleep(0.05)
    assert peak <= BOUND - 1
    assert client.llen(keys.queue("q")) == queued > 0
    # And once it is a master again every job completes
    client.execute_command("REPLICAOF", "NO", "ONE")
    wait_for(lambda: processed(client, keys) == 300, 30, "300 jobs processed")
    wait_for(lambda: backup_len(client, keys, node_id) == 0, what="backup empty")
