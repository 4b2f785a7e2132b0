"""Prometheus metrics of in-process nodes on a real Redis, read as Prometheus reads them.

Every figure is read from a real scrape (``urllib`` on ``exq.metrics_url``) or from
``generate_latest`` of the node's registry, parsed with ``prometheus_client``'s own
text parser, and compared with what Redis holds. Every test starts its nodes
through the ``nodes`` fixture, which opens every gate a test made and then stops
every node, whatever the outcome.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import exq_fast
from exq_fast import Exq
from exq_fast.config import Config, ConfigError
from exq_fast.embedded import RedisServer
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from tests.conftest import NodeFactory, wait_for
from tests.test_security import skip_or_fail

POLL_MS = 10
DEADLINE = 8.0


# -- helpers -------------------------------------------------------------------



class Scrape:
    """One parsed exposition: families by name, and sums of samples by labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def matching(self, name: str, **labels: str) -> list[Sample]:
        """The samples called ``name`` whose labels include ``labels``."""
        return [s for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the matching samples (0 when there is none)."""
        return float(sum(s.value for s in self.matching(name, **labels)))

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value ``label`` takes among the samples called ``name``."""
        return {s.labels[label] for s in self.matching(name) if label in s.labels}

    def bucket(self, name: str, le: str, **labels: str) -> float:
        """The cumulative count of histogram ``name`` at bound ``le``."""
        return self.value(f"{name}_bucket", le=le, **labels)


def http_scrape(url: str) -> Scrape:
    """GET ``url`` as Prometheus does and parse the text."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return Scrape(response.read().decode("utf-8"))


def scrape(exq: Exq) -> Scrape:
    """Over HTTP when the node serves /metrics, else straight from its registry."""
    if exq.metrics_url is not None:
        return http_scrape(exq.metrics_url)
    return Scrape(generate_latest(exq.metrics.registry).decode("utf-8"))


def raw_job(queue: str, job_class: str, args: list[Any] | None = None, *,
            enqueued_at: float | int | None = None, retry: int = 0,
            jid: str | None = None) -> bytes:
    """A payload as a producer LPUSHes it (compact JSON)."""
    return json.dumps({
        "class": job_class, "args": args or [], "jid": jid or uuid.uuid4().hex, "queue": queue,
        "retry": retry, "enqueued_at": time.time() if enqueued_at is None else enqueued_at,
    }, separators=(",", ":")).encode()


def refused(host: str, port: int) -> bool:
    """True when nothing accepts TCP connections on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
        except OSError:
            return True
        return False


def ok() -> None:
    """A worker that succeeds at once."""


def fail() -> None:
    """A worker that always fails."""
    raise RuntimeError("boom")


def slow() -> None:
    """A worker that takes about 50 ms."""
    time.sleep(0.05)


class Nodes(NodeFactory):
    """Nodes whose default worker is ``T.Ok``."""

    default_workers: ClassVar[Mapping[str, object]] = {"T.Ok": ok}


@pytest.fixture
def nodes(make_config: Callable[..., Config]) -> Iterator[Nodes]:
    made = Nodes(make_config)
    yield made
    made.close()


def stat(client: redis.Redis, keys: Keys, kind: str) -> int:
    return int(client.get(keys.stat(kind)) or 0)  # type: ignore[arg-type]


# -- 1. job counters and histograms mirror Redis -------------------------------------------


def test_job_counters_equal_the_redis_deltas_per_queue_and_class(
    nodes: Nodes, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given, across queues qa and qb: 6+4 successes of T.Ok, 3 failures of T.Fail that may
    # retry (qa) and 2 that may not (max_retries=0, qb), and 2+3 payloads naming classes
    # no worker is registered for (retried in qa; not allowed to, so dead, in qb)
    redis_client.set(keys.stat("processed"), 7)  # earlier history: only the delta counts
    redis_client.set(keys.stat("failed"), 5)
    before = {k: stat(redis_client, keys, k) for k in ("processed", "failed")}
    retry_before, dead_before = redis_client.zcard(keys.retry), redis_client.zcard(keys.dead)
    plan = [("qa", "T.Ok", 6, {}), ("qb", "T.Ok", 4, {}),
            ("qa", "T.Fail", 3, {"max_retries": 3}), ("qb", "T.Fail", 2, {"max_retries": 0}),
            ("qa", "Nope.One", 1, {}), ("qa", "Nope.Two", 1, {}),
            ("qb", "Nope.Three", 3, {"max_retries": 0})]
    enqueuer.enqueue_all([(q, cls, [], opts) for q, cls, n, opts in plan for _ in range(n)])

    # When a node consumes both queues until every job is acked
    exq = nodes.start(nodes.config(queues=["qa", "qb"], metrics_port=0),
                      {"T.Ok": ok, "T.Fail": fail})
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_processed_total") == 10
                 and s.value("exq_jobs_failed_total") == 10 and s, what="20 jobs counted")

    # Then the sums over labels equal the Redis deltas, and the set growths
    assert m.value("exq_jobs_processed_total") == stat(redis_client, keys, "processed") \
        - before["processed"] == 10
    assert m.value("exq_jobs_failed_total") == stat(redis_client, keys, "failed") \
        - before["failed"] == 10
    assert m.value("exq_jobs_retried_total") == redis_client.zcard(keys.retry) - retry_before \
        == 5
    assert m.value("exq_jobs_dead_total") == redis_client.zcard(keys.dead) - dead_before == 5

    # ... each (queue, job_class) has its own figures; unknown classes are "unknown"
    expected = {  # (queue, class): (processed, failed, retried, dead)
        ("qa", "T.Ok"): (6, 0, 0, 0), ("qb", "T.Ok"): (4, 0, 0, 0),
        ("qa", "T.Fail"): (0, 3, 3, 0), ("qb", "T.Fail"): (0, 2, 0, 2),
        ("qa", "unknown"): (0, 2, 2, 0), ("qb", "unknown"): (0, 3, 0, 3),
    }
    for (queue, cls), (processed, failed, retried, dead) in expected.items():
        labels = {"queue": queue, "job_class": cls}
        assert m.value("exq_jobs_processed_total", **labels) == processed, labels
        assert m.value("exq_jobs_failed_total", **labels) == failed, labels
        assert m.value("exq_jobs_retried_total", **labels) == retried, labels
        assert m.value("exq_jobs_dead_total", **labels) == dead, labels
        # ... and every finished job is one duration and one queue latency observation
        assert m.value("exq_job_duration_seconds_count", **labels) == processed + failed
        assert m.value("exq_job_queue_latency_seconds_count", **labels) == processed + failed
    assert {s.labels["job_class"] for s in m.samples if "job_class" in s.labels} == {
        "T.Ok", "T.Fail", "unknown"}
    # ... the latencies are those of jobs enqueued a moment ago
    assert 0 <= m.value("exq_job_queue_latency_seconds_sum") < 20 * 5
    assert m.value("exq_stats_flush_duration_seconds_count") >= 1


def test_durations_and_latencies_land_in_the_right_buckets(
    nodes: Nodes, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given one job sleeping ~50 ms, five no-op jobs, and a Sidekiq 8 payload whose
    # enqueued_at is integer epoch milliseconds
    enqueuer.enqueue("slow", "T.Slow", [])
    enqueuer.enqueue_all([("fast", "T.Ok", [])] * 5)
    now_ms = int(time.time() * 1000)
    redis_client.sadd(keys.queues, "s8")
    redis_client.lpush(keys.queue("s8"), json.dumps(
        {"class": "T.Ok", "args": [], "jid": "x", "queue": "s8", "retry": 0,
         "enqueued_at": now_ms}).encode())

    # When a node runs them
    exq = nodes.start(nodes.config(queues=["slow", "fast", "s8"]),
                      {"T.Ok": ok, "T.Slow": slow})
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_processed_total") == 7 and s,
                 what="7 jobs counted")

    # Then the slow job is above 50 ms and well under 250 ms; the no-ops under 50 ms
    name = "exq_job_duration_seconds"
    slow_job = {"queue": "slow", "job_class": "T.Slow"}
    assert m.bucket(name, "0.025", **slow_job) == 0
    assert m.bucket(name, "0.05", **slow_job) == 0
    assert m.bucket(name, "0.25", **slow_job) == 1
    assert m.bucket(name, "+Inf", **slow_job) == 1
    assert 0.05 <= m.value(f"{name}_sum", **slow_job) < 0.25
    fast = {"queue": "fast", "job_class": "T.Ok"}
    assert m.bucket(name, "0.05", **fast) == m.bucket(name, "+Inf", **fast) == 5
    # ... the bounds go from 1 ms to 4 h
    bounds = {s.labels["le"] for s in m.matching(f"{name}_bucket", **fast)}
    assert {"0.001", "0.05", "14400.0", "+Inf"} <= bounds

    # ... and queue latency is observed for every job; the Sidekiq 8 millisecond
    # timestamp gives a small, non-negative latency, not ~1.7e12 seconds
    latency = "exq_job_queue_latency_seconds"
    assert m.value(f"{latency}_count") == 7
    s8 = {"queue": "s8", "job_class": "T.Ok"}
    assert m.value(f"{latency}_count", **s8) == 1
    assert 0 <= m.value(f"{latency}_sum", **s8) < 5
    assert m.bucket(latency, "5.0", **s8) == 1
    assert 0 <= m.value(f"{latency}_sum", **fast) < 5 * 5


# -- 2. gauges read at scrape time ---------------------------------------------------------


def test_gauges_while_a_job_runs_and_at_rest(nodes: Nodes, enqueuer: Enqueuer) -> None:
    # Given a node with qa (concurrency 3) and qb (unlimited), one job of qa waiting at a
    # gate and two no-op jobs on qb
    gate = nodes.gate()
    enqueuer.enqueue("qa", "T.Gate", [])
    enqueuer.enqueue_all([("qb", "T.Ok", [])] * 2)
    started = time.time()
    exq = nodes.start(nodes.config(queues=[("qa", 3), ("qb", None)], metrics_port=0),
                      {"T.Ok": ok, "T.Gate": nodes.gated(gate)})

    # When the gated job has been running for a while
    wait_for(lambda: scrape(exq).value("exq_jobs_processed_total") == 2, what="qb done")
    wait_for(lambda: scrape(exq).value("exq_oldest_running_job_age_seconds") >= 0.3,
             what="the running job to age")
    m = scrape(exq)

    # Then the node's figures are those of that moment
    assert m.value("exq_jobs_in_progress", queue="qa") == 1
    assert m.value("exq_jobs_in_progress", queue="qb") == 0
    assert 0.3 <= m.value("exq_oldest_running_job_age_seconds") < time.time() - started + 1
    assert m.value("exq_queue_concurrency", queue="qa") == 3
    assert m.value("exq_queue_concurrency", queue="qb") == 1000  # the unlimited cap
    assert m.value("exq_jobs_fetched_total", queue="qa") == 1
    assert m.value("exq_jobs_fetched_total", queue="qb") == 2
    assert m.matching("exq_build_info") == m.matching("exq_build_info",
                                                      version=exq_fast.__version__)
    assert m.value("exq_build_info", version=exq_fast.__version__) == 1
    last_beat = m.value("exq_heartbeat_last_success_timestamp_seconds")
    assert started - 1 <= last_beat <= time.time()
    assert m.families["exq_jobs_fetched"].type == "counter"
    assert m.families["exq_jobs_in_progress"].type == "gauge"

    # When the gate opens and the node comes to rest
    gate.set()
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_processed_total") == 3
                 and s.value("exq_jobs_in_progress") == 0 and s, what="rest")

    # Then nothing runs and nothing waits to be acked
    assert m.value("exq_oldest_running_job_age_seconds") == 0
    assert m.value("exq_stats_pending") == 0
    assert m.value("exq_jobs_fetched_total") == 3


# -- 3. recoveries -------------------------------------------------------------------------


def test_jobs_recovered_at_startup_and_on_subscribe(
    nodes: Nodes, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given jobs left in this node id's backup lists by an earlier process
    redis_client.sadd(keys.queues, "qa", "qb", "qc")
    redis_client.lpush(keys.backup(node_id, "qa"), *[raw_job("qa", "T.Ok") for _ in range(3)])
    redis_client.lpush(keys.backup(node_id, "qb"), *[raw_job("qb", "T.Ok") for _ in range(2)])
    redis_client.lpush(keys.backup(node_id, "qc"), *[raw_job("qc", "T.Ok") for _ in range(4)])

    # When the node starts with qa and qb
    exq = nodes.start(nodes.config(queues=["qa", "qb"]))

    # Then those are counted as recovered at startup, and they run
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_processed_total") == 5 and s,
                 what="recovered jobs ran")
    assert m.value("exq_jobs_recovered_total", queue="qa", reason="startup") == 3
    assert m.value("exq_jobs_recovered_total", queue="qb", reason="startup") == 2
    assert m.value("exq_jobs_recovered_total") == 5

    # When it subscribes to qc at run time
    exq.subscribe("qc", 2)

    # Then qc's backup is counted with reason "subscribe"
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_processed_total") == 9 and s,
                 what="qc jobs ran")
    assert m.value("exq_jobs_recovered_total", queue="qc", reason="subscribe") == 4
    assert m.value("exq_queue_concurrency", queue="qc") == 2


def test_jobs_recovered_from_a_dead_node_by_the_heartbeat_monitor(
    nodes: Nodes, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a live node with the heartbeat monitor on, and a dead node (last beat an hour
    # ago) with jobs in its backup lists of qa and of a queue nobody lists
    exq = nodes.start(nodes.config(queues=["qa"], heartbeat_enable=True,
                                   heartbeat_interval=100))
    dead = "dead-" + uuid.uuid4().hex[:8]
    redis_client.lpush(keys.backup(dead, "qa"), *[raw_job("qa", "T.Ok") for _ in range(4)])
    redis_client.lpush(keys.backup(dead, "qz"), raw_job("qz", "T.Ok"))
    redis_client.zadd(keys.heartbeats, {dead: round(time.time() - 3600, 3)})

    # When its monitor runs
    exq.heartbeat.run_once()

    # Then the jobs moved are counted with reason "heartbeat", per queue
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_recovered_total") == 5 and s,
                 what="5 recovered")
    assert m.value("exq_jobs_recovered_total", queue="qa", reason="heartbeat") == 4
    assert m.value("exq_jobs_recovered_total", queue="qz", reason="heartbeat") == 1
    assert m.label_values("exq_jobs_recovered_total", "reason") == {"heartbeat"}
    wait_for(lambda: scrape(exq).value("exq_jobs_processed_total", queue="qa") == 4,
             what="qa's recovered jobs ran")
    assert redis_client.llen(keys.queue("qz")) == 1


# -- 4. Redis errors -----------------------------------------------------------------------


def test_redis_errors_are_counted_per_operation_and_the_node_recovers(
    private_redis: RedisServer, nodes: Nodes, namespace: str
) -> None:
    # Given a node on its own Redis, running one job held at a gate
    gate = nodes.gate()
    config = nodes.config(redis_url=private_redis.url, queues=["qa"], metrics_port=0)
    client = redis.Redis.from_url(private_redis.url)
    keys = Keys(namespace)
    try:
        with Enqueuer(config) as enq:
            enq.enqueue("qa", "T.Gate", [])
        exq = nodes.start(config, {"T.Ok": ok, "T.Gate": nodes.gated(gate)})
        wait_for(lambda: scrape(exq).value("exq_jobs_in_progress", queue="qa") == 1,
                 what="the gated job runs")
        assert scrape(exq).value("exq_redis_errors_total") == 0

        # When Redis dies for a moment: the fetcher polls, a ping is due, and the held job
        # ends, so its ack and counts cannot be written
        private_redis.kill()
        exq.pinger.tick()
        gate.set()
        m = wait_for(lambda: (s := scrape(exq)).value("exq_redis_errors_total",
                                                      operation="fetch") >= 2
                     and s.value("exq_redis_errors_total", operation="stats_flush") >= 2
                     and s, what="fetch and stats_flush errors")

        # Then every failed operation is counted under its name; nothing was counted done
        assert m.value("exq_redis_errors_total", operation="node_ping") >= 1
        assert m.label_values("exq_redis_errors_total", "operation") <= {
            "fetch", "stats_flush", "node_ping", "scheduler", "heartbeat", "heartbeat_monitor"}
        assert m.value("exq_jobs_processed_total") == 0
        assert m.value("exq_stats_pending") == 1

        # When Redis is back (empty: it keeps nothing on disk) and new jobs arrive
        private_redis.start()
        with Enqueuer(config) as enq:
            enq.enqueue_all([("qa", "T.Ok", [])] * 5)

        # Then the node works again: the held job's counts land, the new jobs run, and the
        # metric equals Redis again
        m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_processed_total") == 6
                     and s, what="6 jobs counted after the restart")
        assert stat(client, keys, "processed") == 6
        assert m.value("exq_stats_pending") == 0
        # ... and nothing fails any more: once every operation has succeeded after this
        # point (a fetch and a stats flush: a 7th job counted; a scheduler poll, maybe
        # at the end of its backoff; a ping), no error was added
        errors = m.value("exq_redis_errors_total")
        since = time.time()
        with Enqueuer(config) as enq:
            enq.enqueue("qa", "T.Ok", [])
        wait_for(lambda: scrape(exq).value("exq_jobs_processed_total") == 7,
                 what="a 7th job counted")
        wait_for(lambda: exq.scheduler.last_success > since, what="a scheduler poll")
        exq.pinger.tick()
        assert exq.pinger.last_success > since
        assert scrape(exq).value("exq_redis_errors_total") == errors  # no new errors
    finally:
        client.close()


# -- 5. the cluster collector --------------------------------------------------------------


def test_cluster_collector_reads_redis_wide_figures(
    nodes: Nodes, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a queue nobody consumes whose oldest job was enqueued 30 s ago, a queue whose
    # oldest job is a Sidekiq 8 payload (integer ms), an empty known queue, entries in
    # the retry, schedule and dead sets, and a history of 3 processed, 2 failed
    now = time.time()
    redis_client.sadd(keys.queues, "idle", "s8", "empty")
    redis_client.lpush(keys.queue("idle"), raw_job("idle", "T.Ok", enqueued_at=now - 30),
                       raw_job("idle", "T.Ok", enqueued_at=now - 10), raw_job("idle", "T.Ok"))
    redis_client.lpush(keys.queue("s8"), raw_job("s8", "T.Ok", enqueued_at=int(now * 1000) - 5000))
    later = now + 3600
    redis_client.zadd(keys.retry, {raw_job("idle", "T.Ok", jid=f"r{i}"): later for i in range(2)})
    redis_client.zadd(keys.schedule, {raw_job("idle", "T.Ok", jid=f"s{i}"): later
                                      for i in range(4)})
    redis_client.zadd(keys.dead, {raw_job("idle", "T.Ok", jid="d0"): now})
    enqueuer.enqueue_all([("work", "T.Ok", [])] * 3 + [("work", "T.Fail", [], {"max_retries": 0})]
                         * 2)

    # When two nodes run, the cluster collector on one of them; one job is held at a gate
    gate = nodes.gate()
    workers = {"T.Ok": ok, "T.Fail": fail, "T.Gate": nodes.gated(gate)}
    exq = nodes.start(nodes.config(queues=["work"], metrics_cluster=True, metrics_port=0),
                      workers)
    other = nodes.start(nodes.config(queues=["work"], node_id=node_id + "-b"), workers)
    wait_for(lambda: stat(redis_client, keys, "processed") == 3
             and stat(redis_client, keys, "failed") == 2, what="5 jobs done")
    enqueuer.enqueue("work", "T.Gate", [])
    wait_for(lambda: exq.fetcher.busy() + other.fetcher.busy() == 1, what="the gated job runs")
    exq.pinger.tick()
    other.pinger.tick()  # the busy counts are those of the last ping
    m = scrape(exq)

    # Then the cluster figures are Redis's
    assert m.value("exq_queue_size", queue="idle") == 3
    assert m.value("exq_queue_size", queue="s8") == 1
    assert m.value("exq_queue_size", queue="empty") == 0
    assert m.value("exq_queue_size", queue="work") == 0
    assert 30 <= m.value("exq_queue_latency_seconds", queue="idle") < 30 + 5
    assert 5 <= m.value("exq_queue_latency_seconds", queue="s8") < 5 + 5
    assert m.value("exq_queue_latency_seconds", queue="empty") == 0
    assert m.value("exq_retry_set_size") == redis_client.zcard(keys.retry) == 2
    assert m.value("exq_scheduled_set_size") == redis_client.zcard(keys.schedule) == 4
    assert m.value("exq_dead_set_size") == redis_client.zcard(keys.dead) == 1 + 2
    assert m.value("exq_processed_jobs") == stat(redis_client, keys, "processed") == 3
    assert m.value("exq_failed_jobs") == stat(redis_client, keys, "failed") == 2
    assert m.value("exq_processes") == redis_client.scard(keys.processes) == 2
    assert m.value("exq_busy_workers") == 1

    # ... and a node without metrics_cluster exports none of them
    plain = Scrape(generate_latest(other.metrics.registry).decode())
    for family in ("exq_queue_size", "exq_queue_latency_seconds", "exq_retry_set_size",
                   "exq_scheduled_set_size", "exq_dead_set_size", "exq_processed_jobs",
                   "exq_failed_jobs", "exq_processes", "exq_busy_workers"):
        assert family in m.families, family
        assert family not in plain.families, family


# -- 6. the endpoint -----------------------------------------------------------------------


def test_port_zero_picks_a_free_port_on_loopback_and_stop_releases_it(
    nodes: Nodes,
) -> None:
    # Given a node asked for port 0 and no address
    config = nodes.config(queues=["qa"], metrics_port=0)
    assert config.metrics_addr == "127.0.0.1"
    exq = nodes.new(config)
    assert exq.metrics_url is None  # not serving before start

    # When it starts
    exq.start()

    # Then it serves /metrics on a port the system chose, on 127.0.0.1 only
    assert exq.metrics_server is not None and exq.metrics_server._server is not None
    port = exq.metrics_server.port
    assert port > 0
    assert exq.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert exq.metrics_server._server.server_address[:2] == ("127.0.0.1", port)
    assert "exq_build_info" in scrape(exq).families
    # 127.0.0.2 is loopback too: a socket bound to all addresses would answer there
    assert refused("127.0.0.2", port)

    # When it stops
    exq.stop()

    # Then the port is free again: nothing answers, and a new node can bind it
    assert refused("127.0.0.1", port)
    again = nodes.start(nodes.config(queues=["qa"], metrics_port=port,
                                     node_id=config.node_id + "-2"))
    assert again.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert "exq_build_info" in scrape(again).families


def test_metrics_addr_can_be_changed(nodes: Nodes) -> None:
    # Given a node asked to listen on 127.0.0.2
    exq = nodes.start(nodes.config(queues=["qa"], metrics_port=0, metrics_addr="127.0.0.2"))

    # Then it serves there, and not on 127.0.0.1
    assert exq.metrics_server is not None
    port = exq.metrics_server.port
    assert exq.metrics_url == f"http://127.0.0.2:{port}/metrics"
    assert "exq_build_info" in scrape(exq).families
    assert refused("127.0.0.1", port)


def test_an_ipv6_address_is_bracketed_in_the_url(nodes: Nodes) -> None:
    # Given a machine with IPv6 loopback (skipped without one, except under CI: failed)
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        skip_or_fail("no IPv6 loopback here")

    # When a node listens on ::1
    exq = nodes.start(nodes.config(queues=["qa"], metrics_port=0, metrics_addr="::1"))

    # Then its URL brackets the address and works
    assert exq.metrics_server is not None
    assert exq.metrics_url == f"http://[::1]:{exq.metrics_server.port}/metrics"
    assert "exq_build_info" in scrape(exq).families


def test_a_port_in_use_fails_at_start_naming_the_option(nodes: Nodes) -> None:
    # Given a port something else listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # When a node is asked for it, Then start fails with a ConfigError naming the option
        exq = nodes.new(nodes.config(queues=["qa"], metrics_port=port))
        with pytest.raises(ConfigError, match=r"'metrics_port'.*Address already in use"):
            exq.start()
        assert exq.subscriptions() == []  # nothing else was started


def test_a_stop_while_redis_is_down_still_releases_the_port(
    private_redis: RedisServer, nodes: Nodes
) -> None:
    # Given a serving node whose Redis has just died
    exq = nodes.start(nodes.config(redis_url=private_redis.url, queues=["qa"], metrics_port=0))
    assert exq.metrics_server is not None
    port = exq.metrics_server.port
    assert "exq_build_info" in http_scrape(f"http://127.0.0.1:{port}/metrics").families
    private_redis.kill()

    # When it is stopped (it cannot unregister itself from Redis)
    exq.stop(timeout=1)

    # Then the stop completes and the port is released all the same
    assert exq.stopped.is_set()
    assert refused("127.0.0.1", port)


def test_a_failed_start_releases_the_metrics_port(private_redis: RedisServer, nodes: Nodes
                                                  ) -> None:
    # Given a node whose Redis is down
    private_redis.kill()
    exq = nodes.new(nodes.config(redis_url=private_redis.url, queues=["qa"], metrics_port=0,
                                 redis_timeout=500))

    # When its start fails and it is stopped
    with pytest.raises(redis.exceptions.ConnectionError):
        exq.start()
    exq.stop()

    # Then the metrics port is free again
    assert exq.metrics_server is not None
    assert refused("127.0.0.1", exq.metrics_server.port)


# -- 7. registries, prefix, switch ---------------------------------------------------------


def test_the_callers_registry_receives_the_metrics(
    nodes: Nodes, enqueuer: Enqueuer, node_id: str
) -> None:
    # Given a registry of the caller's
    mine = CollectorRegistry()
    enqueuer.enqueue_all([("qa", "T.Ok", [])] * 3)

    # When a node is built with it and runs jobs
    exq = nodes.start(nodes.config(queues=["qa"]), metrics_registry=mine)

    # Then the node's metrics are in that registry, and not in the global one
    assert exq.metrics.registry is mine
    wait_for(lambda: Scrape(generate_latest(mine).decode()).value(
        "exq_jobs_processed_total", queue="qa", job_class="T.Ok") == 3, what="3 in my registry")
    m = Scrape(generate_latest(mine).decode())
    assert m.value("exq_build_info", version=exq_fast.__version__) == 1
    assert m.value("exq_jobs_fetched_total", queue="qa") == 3
    assert "exq_jobs_processed" not in Scrape(generate_latest(REGISTRY).decode()).families


def test_the_callers_registry_serves_a_new_node_after_a_stop(
    nodes: Nodes, enqueuer: Enqueuer
) -> None:
    # Given a node that used the caller's registry and stopped (an in-process restart)
    mine = CollectorRegistry()
    first = nodes.start(nodes.config(queues=["qa"]), metrics_registry=mine)
    assert first.stop()
    assert "exq_jobs_processed" not in Scrape(generate_latest(mine).decode()).families
    # When a new node is built with the same registry, then it registers and counts
    second = nodes.start(nodes.config(queues=["qa"]), metrics_registry=mine)
    enqueuer.enqueue("qa", "T.Ok", [])
    wait_for(lambda: Scrape(generate_latest(mine).decode()).value(
        "exq_jobs_processed_total", queue="qa", job_class="T.Ok") == 1, what="1 after restart")
    assert second.metrics.registry is mine


def test_two_nodes_in_one_process_keep_their_own_registries(
    nodes: Nodes, enqueuer: Enqueuer, node_id: str
) -> None:
    # Given two nodes in this process, each with its default (private) registry
    a = nodes.start(nodes.config(queues=["qa"], metrics_port=0, node_id=node_id + "-a"))
    b = nodes.start(nodes.config(queues=["qb"], metrics_port=0, node_id=node_id + "-b"))
    assert a.metrics.registry is not b.metrics.registry
    assert a.metrics_url != b.metrics_url

    # When each runs its own jobs
    enqueuer.enqueue_all([("qa", "T.Ok", [])] * 2 + [("qb", "T.Ok", [])] * 3)

    # Then each endpoint shows its own
    wait_for(lambda: scrape(a).value("exq_jobs_processed_total") == 2, what="a's 2 jobs")
    wait_for(lambda: scrape(b).value("exq_jobs_processed_total") == 3, what="b's 3 jobs")
    assert scrape(a).label_values("exq_jobs_processed_total", "queue") == {"qa"}
    assert scrape(b).label_values("exq_jobs_processed_total", "queue") == {"qb"}
    assert scrape(a).label_values("exq_queue_concurrency", "queue") == {"qa"}


def test_metrics_prefix_renames_every_family(nodes: Nodes, enqueuer: Enqueuer) -> None:
    # Given a node with prefix "myapp_" (cluster collector included)
    enqueuer.enqueue_all([("qa", "T.Ok", [])] * 2)
    exq = nodes.start(nodes.config(queues=["qa"], metrics_port=0, metrics_prefix="myapp_",
                                   metrics_cluster=True))

    # When it has run jobs
    m = wait_for(lambda: (s := scrape(exq)).value("myapp_jobs_processed_total") == 2 and s,
                 what="2 jobs under myapp_")

    # Then every family carries the prefix, none the default one
    assert m.families
    assert all(name.startswith("myapp_") for name in m.families), sorted(m.families)
    assert not any(s.name.startswith("exq_") for s in m.samples)
    for name in ("myapp_build_info", "myapp_jobs_in_progress", "myapp_job_duration_seconds",
                 "myapp_queue_size", "myapp_jobs_recovered", "myapp_redis_errors"):
        assert name in m.families, name


def test_metrics_disabled_leaves_job_counters_at_zero_while_jobs_run(
    nodes: Nodes, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node with metrics_enabled=False
    enqueuer.enqueue_all([("qa", "T.Ok", [])] * 4 + [("qa", "T.Fail", [], {"max_retries": 0})])
    exq = nodes.start(nodes.config(queues=["qa"], metrics_enabled=False),
                      {"T.Ok": ok, "T.Fail": fail})

    # When its jobs have run, and then one more (its batch counted means that the
    # earlier batches' listeners, metrics included if attached, have all run: one
    # flusher thread applies a batch, then calls them, then builds the next batch)
    wait_for(lambda: stat(redis_client, keys, "processed") == 4
             and stat(redis_client, keys, "failed") == 1, what="5 jobs done in Redis")
    enqueuer.enqueue("qa", "T.Ok", [])
    wait_for(lambda: exq.acks.totals == {"processed": 5, "failed": 1}, what="a 6th job counted")
    m = scrape(exq)

    # Then the job counters and histograms stayed at zero
    for name in ("exq_jobs_processed_total", "exq_jobs_failed_total", "exq_jobs_dead_total",
                 "exq_job_duration_seconds_count", "exq_job_queue_latency_seconds_count",
                 "exq_stats_flush_duration_seconds_count"):
        assert m.value(name) == 0, name
    assert exq.acks.totals == {"processed": 5, "failed": 1}


# -- 8. label cardinality ------------------------------------------------------------------


def test_fifty_unknown_classes_make_a_single_series(
    nodes: Nodes, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given 50 payloads naming 50 different unregistered classes, and one that is no JSON
    redis_client.sadd(keys.queues, "junk")
    redis_client.lpush(keys.queue("junk"),
                       *[raw_job("junk", f"Junk.Class{i}") for i in range(50)], b"not json")

    # When a node consumes them
    exq = nodes.start(nodes.config(queues=["junk"], metrics_port=0))
    m = wait_for(lambda: (s := scrape(exq)).value("exq_jobs_failed_total") == 51 and s,
                 what="51 failures counted")

    # Then one series per family holds them all: job_class="unknown"
    for name in ("exq_jobs_failed_total", "exq_jobs_dead_total",
                 "exq_job_duration_seconds_count", "exq_job_queue_latency_seconds_count"):
        assert len(m.matching(name)) == 1, name
    assert m.value("exq_jobs_dead_total", queue="junk", job_class="unknown") == 51
    assert m.value("exq_job_queue_latency_seconds_count", job_class="unknown") == 50
    job_classes = {s.labels["job_class"] for s in m.samples if "job_class" in s.labels}
    assert job_classes == {"unknown"}
    assert "Junk.Class" not in m.text
