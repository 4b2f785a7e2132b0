"""Prometheus metrics of one exq-fast node, and the ``/metrics`` endpoint.

Counters mirror Redis exactly: they move when a stats batch is *applied*
(``AckWriter`` tells ``Metrics.batch_applied``), the same moment
``stat:processed`` / ``stat:failed`` move, so over a run the sum over labels of
``exq_jobs_processed_total`` equals the ``stat:processed`` delta. The worker
threads do no metric work at all: durations and latencies travel with the
finished job and are counted by the flusher thread, one lock per batch.
Queue latency is observed for first attempts only: a retried job keeps its
original ``enqueued_at`` (as Exq writes it), so its wait includes the backoff.
Gauges and the counters owned by other parts (fetched, recovered, Redis
errors) are read at scrape time by a collector.

Labels are ``queue`` and ``job_class`` (the registered worker's name;
``unknown`` for payloads that named no registered worker, so junk payloads
cannot create series), plus ``operation`` and ``reason`` where stated. Never
jid, args or error text.

The opt-in cluster collector (``Config(metrics_cluster=True)``, in one process
of a fleet) reads Redis-wide figures at scrape time with one Lua call.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .background import REDIS_ERRORS
from .config import Config, ConfigError
from .connection import text
from .inflight import InFlight
from .job import loads_object, to_seconds
from .keys import Keys

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

    def fetch_paused(self) -> bool:
        """True while fetching is paused because finished jobs' acks do not reach Redis."""

    def fetch_pauses(self) -> int:
        """Such pauses since start."""

    def stuck(self) -> int:
        """Jobs running that ignored their timeout."""


class _Histogram:
    """Bucket counts of one series, updated by the flusher thread only."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class _Series:
    """The counts of one (queue, job_class)."""

    __slots__ = ("dead", "duration", "failed", "latency", "processed", "retried")

    def __init__(self) -> None:
        self.processed = self.failed = self.retried = self.dead = 0
        self.duration = _Histogram()
        self.latency = _Histogram()


class Metrics:
    """The metrics of one node, in ``registry`` (a private one by default).

    The per-job figures are kept as plain counts, updated under one lock per
    applied batch and exported at scrape time: prometheus-client's own
    counters and histograms take a lock per increment, which cost about 10 %
    of throughput on no-op jobs.
    """

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "exq_",
                 version: str = "", source: NodeSource | None = None) -> None:
        """``source``: the node whose gauges and counters are read at scrape time."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.prefix = prefix
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()
        self._registered: list[Collector] = []
        self.flush_duration = Histogram(f"{prefix}stats_flush_duration_seconds",
                                        "Time to apply one stats batch", buckets=FLUSH_BUCKETS,
                                        registry=None)
        build = Gauge(f"{prefix}build_info", "exq-fast version", ["version"], registry=None)
        build.labels(version).set(1)
        for collector in (_JobCollector(self), self.flush_duration, build):
            self._register(collector)
        if source is not None:
            self._register(_NodeCollector(prefix, source))

    def _register(self, collector: Collector) -> None:
        self.registry.register(collector)
        self._registered.append(collector)

    def close(self) -> None:
        """Unregister everything, so the registry can serve another node later."""
        for collector in self._registered:
            with contextlib.suppress(KeyError):
                self.registry.unregister(collector)
        self._registered.clear()

    def batch_applied(self, done: Sequence[InFlight], seconds: float) -> None:
        """Mirror a stats batch that reached Redis (called by the flusher thread)."""
        self.flush_duration.observe(seconds)
        with self._lock:
            for item in done:
                self._record(item)

    def _record(self, record: InFlight) -> None:
        outcome = record.outcome
        stat = outcome.stat if outcome is not None and outcome.ack else None
        if outcome is None or stat is None:
            return  # not counted in Redis either (terminated, or an internal error)
        key = (record.queue, record.job_class)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        if stat == "processed":
            series.processed += 1
        else:
            series.failed += 1
        if outcome.fate == "retried":
            series.retried += 1
        elif outcome.fate == "dead":
            series.dead += 1
        series.duration.observe(record.duration)
        latency = record.latency
        if latency is not None:
            series.latency.observe(max(latency, 0.0))

    def snapshot(self) -> list[tuple[tuple[str, str], _Series]]:
        """A consistent copy of every series (for the collector)."""
        with self._lock:
            return [(key, copy.deepcopy(series)) for key, series in self._series.items()]


class _JobCollector(Collector):
    """Exports the per-(queue, job_class) counters and histograms."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        p, labels = self.metrics.prefix, ["queue", "job_class"]
        counters = {name: CounterMetricFamily(f"{p}jobs_{name}", help_text, labels=labels)
                    for name, help_text in _COUNTER_HELP.items()}
        duration = HistogramMetricFamily(f"{p}job_duration_seconds", "Time a job ran",
                                         labels=labels)
        latency = HistogramMetricFamily(f"{p}job_queue_latency_seconds",
                                        "Time from enqueued_at to start (first attempts)",
                                        labels=labels)
        for key, series in sorted(self.metrics.snapshot()):
            for name, counter in counters.items():
                counter.add_metric(list(key), getattr(series, name))
            duration.add_metric(list(key), series.duration.cumulative(), series.duration.sum)
            latency.add_metric(list(key), series.latency.cumulative(), series.latency.sum)
        yield from counters.values()
        yield duration
        yield latency


_COUNTER_HELP = {
    "processed": "Jobs that succeeded (as stat:processed; snoozes included)",
    "failed": "Jobs that failed (as stat:failed)",
    "retried": "Failed jobs sent to the retry set",
    "dead": "Jobs sent to the dead set",
}


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
        yield GaugeMetricFamily(f"{p}fetch_paused",
                                "1 while fetching waits for the acks of a batch of finished jobs",
                                value=int(src.fetch_paused()))
        yield GaugeMetricFamily(f"{p}jobs_stuck",
                                "Jobs still running after their timeout fired (slot held)",
                                value=src.stuck())
        yield CounterMetricFamily(f"{p}fetch_pauses",
                                  "Times fetching paused because acks did not reach Redis",
                                  value=src.fetch_pauses())
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

class ClusterCollector(Collector):
    """Redis-wide queue, set and process figures, read at scrape time in two
    pipelined round trips: the queue and node names, then their figures. (Not a
    script: the keys it reads are named by what it finds, and a script must name
    every key it touches; a scrape needs no atomicity.)"""

    def __init__(self, client: redis.Redis, keys: Keys, prefix: str = "exq_",
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.keys = keys
        self.prefix = prefix
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        try:
            reply = self._read()
        except REDIS_ERRORS as exc:
            logger.warning("cluster metrics: %s", exc)
            return
        yield from self._families(reply)

    def _read(self) -> list[Any]:
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(k.queues)
        pipe.smembers(k.processes)
        for key in (k.retry, k.schedule, k.dead):
            pipe.zcard(key)
        pipe.get(k.stat("processed"))
        pipe.get(k.stat("failed"))
        queues, nodes, retry, scheduled, dead, processed, failed = pipe.execute()
        names, node_ids = sorted(text(q) for q in queues), sorted(text(n) for n in nodes)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.llen(k.queue(name))
            pipe.lindex(k.queue(name), -1)
        for node_id in node_ids:
            pipe.hget(k.node(node_id), "busy")
        figures = pipe.execute() if names or node_ids else []
        out = [(name, figures[2 * i], _enqueued_at(figures[2 * i + 1]))
               for i, name in enumerate(names)]
        busy = sum(_count(b) for b in figures[2 * len(names):])
        return [out, retry, scheduled, dead, processed or b"0", failed or b"0", len(node_ids),
                busy]

    def _families(self, reply: list[Any]) -> Iterable[Metric]:
        p, now = self.prefix, self.clock()
        queues, retry, scheduled, dead, processed, failed, nodes, busy = reply
        size = GaugeMetricFamily(f"{p}queue_size", "Jobs waiting", labels=["queue"])
        latency = GaugeMetricFamily(f"{p}queue_latency_seconds", "Age of the oldest waiting job",
                                    labels=["queue"])
        for name, length, at in sorted(queues):
            queue = text(name)
            size.add_metric([queue], int(length))
            latency.add_metric([queue], max(now - at, 0.0) if at is not None else 0.0)
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


def _enqueued_at(oldest: bytes | None) -> float | None:
    """The oldest job's ``enqueued_at`` in seconds (Sidekiq 8 millis too), when it is a
    JSON object with a number there."""
    job = loads_object(oldest) if oldest is not None else None
    return to_seconds(job.get("enqueued_at")) if job is not None else None


def _count(value: bytes | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


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


def serve_metrics(registry: CollectorRegistry, config: Config) -> MetricsServer:
    """``/metrics`` on ``config.metrics_addr``:``metrics_port``, or a ``ConfigError`` naming
    the option when the address cannot be bound (in use, not an address of this host)."""
    port = config.metrics_port if config.metrics_port is not None else 0
    try:
        return MetricsServer(registry, port, config.metrics_addr).start()
    except OSError as exc:
        raise ConfigError("metrics_port", port, f"cannot listen on {config.metrics_addr}:"
                          f"{port}: {exc.strerror or exc}") from None
