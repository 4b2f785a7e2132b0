"""A real Prometheus scrapes a real exq-fast node; every dashboard and alert query runs on it.

Prometheus (``/usr/bin/prometheus``, Debian package ``prometheus``) runs on a
free 127.0.0.1 port with a temporary data dir, scrapes the node every second
and loads ``grafana/alerts.yml``. After ~200 jobs (two queues, two classes,
some failing into the retry set, some into the dead set) every PromQL query of
``grafana/exq-fast.json`` is evaluated with the dashboard variables filled in,
as Grafana would, and the Prometheus counters are compared with Redis.

Without the binary the test skips, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from exq_fast import Exq, Registry
from exq_fast.config import Config
from exq_fast.keys import Keys
from tests.test_grafana import (
    ALERTS,
    ALERTS_PATH,
    WORKERS,
    Target,
    dashboard_targets,
    load_dashboard,
    require_binary,
    stat,
    variables,
    wait_for,
)

JOB = "exq"
"""The scrape job name, as ``$job``."""

BUDGET = 45.0
"""Seconds the run may wait in all (the test stays under a minute with set-up)."""

WARMUP = 20
TOTAL = 200
PARKED = 3
"""Jobs left in a queue nobody consumes (queue size and latency > 0)."""

EMPTY_AFTER_A_RUN = {
    ("Recovered jobs by reason", "A"),  # no backup list to recover in a clean run
    ("Redis errors by operation", "A"),  # no Redis error in a clean run
}
"""Dashboard queries that legitimately return no series after a healthy run."""

VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
LABEL_VALUES = re.compile(r"label_values\((.+), (\w+)\)")


@dataclass(frozen=True)
class Plan:
    """One job of the run and what must become of it."""

    queue: str
    job_class: str
    args: list[Any]
    options: dict[str, Any]

    @property
    def fails(self) -> bool:
        return bool(self.args[1] == "fail")


def plan(count: int) -> list[Plan]:
    """Jobs 0..count-1: odd ones on ``mail``, even on ``default``; two classes; one in ten
    fails, and only on ``mail``: half of those are dead at once, half go to the retry set."""
    out = []
    for i in range(count):
        fails = i % 10 == 3
        out.append(Plan("mail" if i % 2 else "default",
                        "App.Notify" if (i // 2) % 2 else "App.Charge",
                        [i, "fail" if fails else "ok"],
                        {"max_retries": 0 if i % 20 == 3 else 5}))
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana variables (``$v``, ``${v}``, ``${v:fmt}``, ``[[v]]``) filled in.

    The values used here are single and match themselves as regexes, so every
    format (``:regex``, ``:pipe``, ...) renders them unchanged.
    """

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise AssertionError(f"unknown variable ${name} in {expr}")
        return values[name]

    out = VARIABLE.sub(fill, expr)
    assert "$" not in out, out
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- Prometheus ---------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str
    target: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """GET an API path; a 4xx/5xx answer's JSON body is returned, not raised."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                body = json.loads(exc.read())
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def result(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` (fails on a query error)."""
        answer = self.query(expr)
        assert answer.get("status") == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The single value of ``expr``, or None when it has no series."""
        result = self.result(expr)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n"
                                 + self.log.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def start_node(config: Config) -> Exq:
    return Exq(config, workers=Registry(WORKERS)).start()


@pytest.fixture
def node(make_config: Callable[..., Config]) -> Iterator[Exq]:
    """A node with the cluster collector and ``/metrics`` on a free port; stopped at the end."""
    config = make_config(queues=[("default", 10), ("mail", 10)], metrics_port=0,
                         metrics_cluster=True, scheduler_enable=False, poll_timeout=20)
    exq = start_node(config)
    try:
        yield exq
    finally:
        exq.stop()


@pytest.fixture
def prometheus(node: Exq, tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus scraping ``node`` every second with the alert rules; stopped at the end."""
    binary = require_binary("prometheus")
    assert node.metrics_url is not None
    target = urlsplit(node.metrics_url).netloc
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_PATH)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", target, process, log)
    try:
        wait_for(server.ready, 10, "prometheus to be ready")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- the test -----------------------------------------------------------------------------------


class Deadline:
    """One time budget shared by every wait of the test."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        assert left > 0, "the test's time budget is spent"
        return left


def run_jobs(exq: Exq, jobs: list[Plan], client: redis.Redis, keys: Keys,
             processed: int, failed: int, deadline: Deadline) -> None:
    """Enqueue ``jobs`` and wait until Redis counts them as done."""
    exq.enqueue_all([(j.queue, j.job_class, j.args, j.options) for j in jobs])
    processed += sum(not j.fails for j in jobs)
    failed += sum(j.fails for j in jobs)
    wait_for(lambda: stat(client, keys, "processed") == processed
             and stat(client, keys, "failed") == failed, deadline.left(),
             f"{len(jobs)} jobs to finish")


def check_variables(prom: Prometheus, values: dict[str, str]) -> None:
    """Each query variable's ``label_values`` finds values, as Grafana's /api/v1/series call."""
    for name, var in variables(load_dashboard()).items():
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.fullmatch(substitute(query, values))
        assert match, query
        answer = prom.get("/api/v1/series", **{"match[]": match.group(1)})
        assert answer.get("status") == "success", (name, answer)
        found = {series.get(match.group(2)) for series in answer["data"]} - {None}
        assert found, f"variable {name}: {query} found no value"


def check_dashboard(prom: Prometheus, targets: list[Target],
                    values: dict[str, str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Evaluate every dashboard query; return the results by (panel, refId)."""
    results = {}
    problems = []
    for target in targets:
        expr = substitute(target.expr, values)
        answer = prom.query(expr)
        key = (target.panel, target.ref_id)
        if answer.get("status") != "success" or "error" in answer:
            problems.append(f"{key}: {expr}: {answer}")
            continue
        results[key] = answer["data"]["result"]
        if not results[key] and key not in EMPTY_AFTER_A_RUN:
            problems.append(f"{key}: {expr}: no data")
    assert not problems, "\n".join(problems)
    return results


def test_every_dashboard_and_alert_query_runs_on_a_real_prometheus(
        node: Exq, prometheus: Prometheus, redis_client: redis.Redis, keys: Keys) -> None:
    started = time.monotonic()
    deadline = Deadline(BUDGET)
    prom = prometheus
    # Given a node scraped every second by a real Prometheus, and Redis's counters before
    processed_before = stat(redis_client, keys, "processed")
    failed_before = stat(redis_client, keys, "failed")
    wait_for(lambda: prom.scalar(f'up{{job="{JOB}"}}') == 1, deadline.left(),
             "the first scrape")
    jobs = plan(TOTAL)
    expected_processed = sum(not j.fails for j in jobs)
    expected_failed = sum(j.fails for j in jobs)

    # When a warm-up batch runs and is scraped (so that every series exists before the
    # main batch and rates see it increase), then the rest runs and is scraped too
    node.enqueue_all([("parked", "App.Charge", [i, "ok"]) for i in range(PARKED)])
    warmup = jobs[:WARMUP]
    run_jobs(node, warmup, redis_client, keys, processed_before, failed_before, deadline)
    warm_processed = sum(not j.fails for j in warmup)
    wait_for(lambda: prom.scalar("sum(exq_jobs_processed_total)") == warm_processed,
             deadline.left(),
             "prometheus to scrape the warm-up")
    run_jobs(node, jobs[WARMUP:], redis_client, keys, processed_before + warm_processed,
             failed_before + sum(j.fails for j in warmup), deadline)
    wait_for(lambda: prom.scalar("sum(exq_jobs_processed_total)") == expected_processed,
             deadline.left(),
             "prometheus to scrape the run")

    # Then Prometheus's counters equal the stat:processed / stat:failed deltas in Redis
    processed_delta = stat(redis_client, keys, "processed") - processed_before
    failed_delta = stat(redis_client, keys, "failed") - failed_before
    assert processed_delta == expected_processed
    assert failed_delta == expected_failed
    assert prom.scalar(f'sum(exq_jobs_processed_total{{job="{JOB}"}})') == processed_delta
    assert prom.scalar(f'sum(exq_jobs_failed_total{{job="{JOB}"}})') == failed_delta
    assert prom.scalar("sum(exq_jobs_dead_total)") == sum(
        j.fails and j.options["max_retries"] == 0 for j in jobs)
    assert prom.scalar("sum(exq_jobs_retried_total)") == sum(
        j.fails and j.options["max_retries"] > 0 for j in jobs)

    # And every dashboard variable and query runs, with data where a run must give some
    values = {"job": JOB, "instance": prom.target, "queue": ".*", "job_class": ".*",
              "__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
    check_variables(prom, values)
    targets = dashboard_targets(load_dashboard())
    results = check_dashboard(prom, targets, values)
    assert len(results) == len(targets) >= 30
    assert set(EMPTY_AFTER_A_RUN) <= set(results)
    assert float(results[("Processed/s", "A")][0]["value"][1]) > 0
    assert float(results[("Failed/s", "A")][0]["value"][1]) > 0
    assert 0 < float(results[("Error ratio", "A")][0]["value"][1]) < 1
    sizes = {r["metric"]["queue"]: float(r["value"][1]) for r in results[("Queue size", "A")]}
    assert sizes.get("parked") == PARKED
    failing = {r["metric"]["job_class"] for r in results[("Top failing classes", "A")]}
    assert failing == {"App.Charge", "App.Notify"}

    # And Prometheus loaded the five alert rules, evaluates them without error, and each
    # rule's query runs on the node's series
    def rules() -> list[dict[str, Any]] | None:
        answer = prom.get("/api/v1/rules", type="alert")
        assert answer.get("status") == "success", answer
        found = [r for g in answer["data"]["groups"] for r in g["rules"]]
        return found if found and all(r["health"] == "ok" for r in found) else None

    loaded = wait_for(rules, deadline.left(), "the alert rules to be evaluated")
    assert [r["name"] for r in loaded] == ALERTS
    for rule in loaded:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["name"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["name"]
        assert not rule.get("lastError"), rule
    by_name = {r["name"]: prom.result(r["query"]) for r in loaded}
    assert {r["metric"]["queue"] for r in by_name["ExqHighFailureRatio"]} == {"mail"}
    assert {r["metric"]["queue"] for r in by_name["ExqNoProcessing"]} == {"parked"}
    assert by_name["ExqHeartbeatStale"] == []
    assert {r["metric"]["queue"] for r in by_name["ExqDeadSetGrowing"]} == {"mail"}
    assert time.monotonic() - started < BUDGET
