"""Prometheus metrics of one exq-fast node, and the ``/metrics`` endpoint.

Counters mirror Redis exactly: they move when a stats batch is *applied*
(``StatsWriter`` tells ``Metrics.batch_applied``), the same moment
``stat:processed`` / ``stat:failed`` move, so over a run the sum over labels of
``exq_jobs_processed_total`` equals the ``stat:processed`` delta. The worker
threads do no metric work at all: durations and latencies travel with the
finished job and are observed by the flusher thread, one uncontended lock per
observation. Gauges and the counters owned by other parts (fetched,
recovered, Redis errors) are read at scrape time by a collector.

Labels are ``queue`` and ``job_class`` (the registered worker's name;
``unknown`` for payloads that named no registered worker, so junk payloads
cannot create series), plus ``operation`` and ``reason`` where stated. Never
jid, args or error text.

The opt-in cluster collector (``Config(metrics_cluster=True)``, in one process
of a fleet) reads Redis-wide figures at scrape time with one Lua call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .keys import Keys
from .scripts import Script
from .stats import Done

logger = logging.getLogger("exq_fast")

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
)
"""Job duration and queue latency buckets: 1 ms to 4 h."""

FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class NodeSource(Protocol):
    """What the collector reads from a running node at scrape time."""

    def in_progress(self) -> dict[str, int]:
        """Jobs running now, per queue."""

    def concurrency(self) -> dict[str, int]:
        """Concurrency limit per subscribed queue (the in-flight cap when unlimited)."""

    def oldest_running_age(self) -> float:
        """Seconds the oldest running job has been running (0 when idle)."""

    def stats_pending(self) -> int:
        """Finished jobs whose ack and counts are not yet in Redis."""

    def fetched(self) -> dict[str, int]:
        """Jobs fetched since start, per queue."""

    def recovered(self) -> dict[tuple[str, str], int]:
        """Jobs re-enqueued from backup lists, per (queue, reason)."""

    def redis_errors(self) -> dict[str, int]:
        """Failed Redis operations, per operation."""

    def heartbeat_last_success(self) -> float:
        """Unix time of the last successful node ping (0 before the first)."""


class _Series:
    """The label children of one (queue, job_class): looked up once, reused."""

    __slots__ = ("dead", "duration", "failed", "latency", "processed", "retried")

    def __init__(self, metrics: Metrics, queue: str, job_class: str) -> None:
        self.processed = metrics.processed.labels(queue, job_class)
        self.failed = metrics.failed.labels(queue, job_class)
        self.retried = metrics.retried.labels(queue, job_class)
        self.dead = metrics.dead.labels(queue, job_class)
        self.duration = metrics.duration.labels(queue, job_class)
        self.latency = metrics.latency.labels(queue, job_class)


class Metrics:
    """The metrics of one node, in ``registry`` (a private one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "exq_",
                 version: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.prefix = prefix
        jobs = ("queue", "job_class")
        reg = self.registry
        self.processed = Counter(f"{prefix}jobs_processed", "Jobs that succeeded "
                                 "(as stat:processed; snoozes included)", jobs, registry=reg)
        self.failed = Counter(f"{prefix}jobs_failed", "Jobs that failed (as stat:failed)",
                              jobs, registry=reg)
        self.retried = Counter(f"{prefix}jobs_retried", "Failed jobs sent to the retry set",
                               jobs, registry=reg)
        self.dead = Counter(f"{prefix}jobs_dead", "Jobs sent to the dead set", jobs,
                            registry=reg)
        self.duration = Histogram(f"{prefix}job_duration_seconds", "Time a job ran",
                                  jobs, buckets=DURATION_BUCKETS, registry=reg)
        self.latency = Histogram(f"{prefix}job_queue_latency_seconds",
                                 "Time from enqueued_at to start", jobs,
                                 buckets=DURATION_BUCKETS, registry=reg)
        self.flush_duration = Histogram(f"{prefix}stats_flush_duration_seconds",
                                        "Time to apply one stats batch", buckets=FLUSH_BUCKETS,
                                        registry=reg)
        Gauge(f"{prefix}build_info", "exq-fast version", ["version"],
              registry=reg).labels(version).set(1)
        self._series: dict[tuple[str, str], _Series] = {}
        self._collector: _NodeCollector | None = None

    def attach(self, source: NodeSource) -> None:
        """Export the gauges and counters that ``source`` keeps (once per node)."""
        self._collector = _NodeCollector(self.prefix, source)
        self.registry.register(self._collector)

    def batch_applied(self, done: Sequence[Done], seconds: float) -> None:
        """Mirror a stats batch that reached Redis (called by the flusher thread)."""
        self.flush_duration.observe(seconds)
        for item in done:
            self._record(item)

    def _record(self, item: Done) -> None:
        key = (item.flight.queue, item.job_class)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, *key)
        if item.stat == "processed":
            series.processed.inc()
        elif item.stat == "failed":
            series.failed.inc()
        if item.fate == "retried":
            series.retried.inc()
        elif item.fate == "dead":
            series.dead.inc()
        if item.stat is not None:
            series.duration.observe(item.duration)
            if item.latency is not None:
                series.latency.observe(max(item.latency, 0.0))


class _NodeCollector(Collector):
    """Reads a node's own figures at scrape time: no cost per job."""

    def __init__(self, prefix: str, source: NodeSource) -> None:
        self.prefix = prefix
        self.source = source

    def collect(self) -> Iterable[Metric]:
        p, src = self.prefix, self.source
        yield _labelled(GaugeMetricFamily(f"{p}jobs_in_progress", "Jobs running now",
                                          labels=["queue"]), src.in_progress())
        yield _labelled(GaugeMetricFamily(f"{p}queue_concurrency", "Concurrency limit",
                                          labels=["queue"]), src.concurrency())
        yield GaugeMetricFamily(f"{p}oldest_running_job_age_seconds",
                                "Age of the oldest running job", value=src.oldest_running_age())
        yield GaugeMetricFamily(f"{p}stats_pending", "Finished jobs not yet acked in Redis",
                                value=src.stats_pending())
        yield GaugeMetricFamily(f"{p}heartbeat_last_success_timestamp_seconds",
                                "Unix time of the last successful node ping",
                                value=src.heartbeat_last_success())
        yield _labelled(CounterMetricFamily(f"{p}jobs_fetched", "Jobs fetched",
                                            labels=["queue"]), src.fetched())
        yield _labelled(CounterMetricFamily(f"{p}redis_errors", "Failed Redis operations",
                                            labels=["operation"]), src.redis_errors())
        recovered = CounterMetricFamily(f"{p}jobs_recovered", "Jobs re-enqueued from backups",
                                        labels=["queue", "reason"])
        for (queue, reason), count in sorted(src.recovered().items()):
            recovered.add_metric([queue, reason], count)
        yield recovered


def _labelled(family: Any, values: dict[str, int]) -> Metric:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    result: Metric = family
    return result


# -- cluster-wide figures (opt-in) ----------------------------------------------------------

CLUSTER = Script("cluster_stats", """
local out = {}
local queues = redis.call('SMEMBERS', KEYS[1])
for _, q in ipairs(queues) do
  local key = ARGV[1] .. 'queue:' .. q
  local oldest = redis.call('LINDEX', key, -1)
  local at = false
  if oldest then
    local ok, job = pcall(cjson.decode, oldest)
    if ok and type(job) == 'table' and type(job['enqueued_at']) == 'number' then
      at = tostring(job['enqueued_at'])
    end
  end
  table.insert(out, {q, redis.call('LLEN', key), at})
end
local busy = 0
local nodes = redis.call('SMEMBERS', KEYS[5])
for _, node in ipairs(nodes) do
  local b = redis.call('HGET', ARGV[2] .. node, 'busy')
  if b then busy = busy + tonumber(b) end
end
return {out, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
        redis.call('ZCARD', KEYS[4]), redis.call('GET', KEYS[6]) or '0',
        redis.call('GET', KEYS[7]) or '0', #nodes, busy}
""")


class ClusterCollector(Collector):
    """Redis-wide queue, set and process figures, read at scrape time in one call."""

    def __init__(self, client: redis.Redis, keys: Keys, prefix: str = "exq_",
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.keys = keys
        self.prefix = prefix
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        try:
            reply = self._read()
        except redis.exceptions.RedisError as exc:
            logger.warning("cluster metrics: %s", exc)
            return
        yield from self._families(reply)

    def _read(self) -> list[Any]:
        k = self.keys
        keys = [k.queues, k.retry, k.schedule, k.dead, k.processes, k.stat("processed"),
                k.stat("failed")]
        reply: list[Any] = CLUSTER(self.client, keys, [k.prefix, k.raw_prefix])
        return reply

    def _families(self, reply: list[Any]) -> Iterable[Metric]:
        p, now = self.prefix, self.clock()
        queues, retry, scheduled, dead, processed, failed, nodes, busy = reply
        size = GaugeMetricFamily(f"{p}queue_size", "Jobs waiting", labels=["queue"])
        latency = GaugeMetricFamily(f"{p}queue_latency_seconds", "Age of the oldest waiting job",
                                    labels=["queue"])
        for name, length, at in sorted(queues):
            queue = _text(name)
            size.add_metric([queue], int(length))
            latency.add_metric([queue], max(now - _seconds(at), 0.0) if at else 0.0)
        yield size
        yield latency
        yield GaugeMetricFamily(f"{p}retry_set_size", "Jobs in the retry set", value=int(retry))
        yield GaugeMetricFamily(f"{p}scheduled_set_size", "Jobs scheduled", value=int(scheduled))
        yield GaugeMetricFamily(f"{p}dead_set_size", "Jobs in the dead set", value=int(dead))
        yield GaugeMetricFamily(f"{p}processed_jobs", "stat:processed in Redis",
                                value=int(processed))
        yield GaugeMetricFamily(f"{p}failed_jobs", "stat:failed in Redis", value=int(failed))
        yield GaugeMetricFamily(f"{p}processes", "Registered nodes", value=int(nodes))
        yield GaugeMetricFamily(f"{p}busy_workers", "Jobs running, all nodes", value=int(busy))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _seconds(value: bytes | str) -> float:
    number = float(_text(value))
    return number / 1000 if number > 1e11 else number  # Sidekiq 8 millis


# -- the HTTP endpoint ------------------------------------------------------------------------

class MetricsServer:
    """``/metrics`` served from a daemon thread; port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> None:
        self.registry = registry
        self.addr = addr
        self.requested_port = port
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Bind and serve. Raises OSError when the address is taken."""
        server, thread = start_http_server(self.requested_port, self.addr, self.registry)
        self._server, self._thread = server, thread
        self.port = server.server_port
        logger.info("metrics at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
