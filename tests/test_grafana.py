"""The Grafana dashboard, its provisioning files and the Prometheus alert rules in ``grafana/``.

``promtool`` checks and unit-tests the rules, the dashboard JSON is checked for
structure (identity, variables, data source, filters, rows, units), and a real
node's ``/metrics`` page after a run passes ``promtool check metrics``.

``promtool`` comes with Prometheus (Debian package ``prometheus``). Without it
these tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from exq_fast import Exq, Registry
from exq_fast.config import Config
from exq_fast.keys import Keys, StatKind
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD_PATH = GRAFANA / "exq-fast.json"
ALERTS_PATH = GRAFANA / "alerts.yml"
ALERTS_TEST_PATH = GRAFANA / "alerts_test.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Overview", "Per queue", "Per job class", "Reliability", "Internals"]
ALERTS = ["ExqHighFailureRatio", "ExqQueueLatencyHigh", "ExqHeartbeatStale",
          "ExqDeadSetGrowing", "ExqNoProcessing"]
UNITS = {"ops", "s", "percentunit", "short"}

JOB_LABELS = {"queue", "job_class"}
QUEUE_LABEL = {"queue"}
METRIC_LABELS: dict[str, set[str]] = {
    "exq_jobs_processed_total": JOB_LABELS,
    "exq_jobs_failed_total": JOB_LABELS,
    "exq_jobs_retried_total": JOB_LABELS,
    "exq_jobs_dead_total": JOB_LABELS,
    "exq_job_duration_seconds_bucket": JOB_LABELS,
    "exq_job_queue_latency_seconds_bucket": JOB_LABELS,
    "exq_stats_flush_duration_seconds_bucket": set(),
    "exq_jobs_in_progress": QUEUE_LABEL,
    "exq_queue_concurrency": QUEUE_LABEL,
    "exq_oldest_running_job_age_seconds": set(),
    "exq_stats_pending": set(),
    "exq_heartbeat_last_success_timestamp_seconds": set(),
    "exq_build_info": set(),
    "exq_jobs_fetched_total": QUEUE_LABEL,
    "exq_jobs_recovered_total": QUEUE_LABEL,
    "exq_redis_errors_total": set(),
    "exq_queue_size": QUEUE_LABEL,
    "exq_queue_latency_seconds": QUEUE_LABEL,
    "exq_retry_set_size": set(),
    "exq_scheduled_set_size": set(),
    "exq_dead_set_size": set(),
    "exq_processed_jobs": set(),
    "exq_failed_jobs": set(),
    "exq_processes": set(),
    "exq_busy_workers": set(),
}
"""Every exq metric a dashboard query may select, with the job labels it carries."""

SELECTOR = re.compile(r"\b(exq_\w+)\s*\{([^}]*)\}")
RANGE = re.compile(r"\[([^\]]*)\]")


# -- helpers shared with test_prometheus_e2e ----------------------------------------------------


def require_binary(name: str) -> str:
    """The path of a Prometheus binary; skip when missing, fail when missing under CI."""
    path = shutil.which(name)
    if path is None:
        if "CI" in os.environ:
            pytest.fail(f"{name} is not on PATH: CI must install it (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (Debian package prometheus)")
    return path


@dataclass(frozen=True)
class Target:
    """One query of one dashboard panel."""

    panel: str
    ref_id: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that are not rows."""
    return [p for p in iter_panels(dashboard["panels"]) if p["type"] != "row"]


def dashboard_targets(dashboard: dict[str, Any]) -> list[Target]:
    return [Target(panel["title"], target["refId"], target["expr"])
            for panel in graph_panels(dashboard) for target in panel["targets"]]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def alert_blocks(text: str) -> dict[str, str]:
    """``alert name -> its YAML block`` (the text up to the next rule)."""
    parts = re.split(r"^\s*- alert:\s*", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool")
    return subprocess.run([binary, *args], input=stdin.decode() if stdin is not None else None,
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)



def charge(n: int, mode: str) -> None:
    """A job that fails when told to."""
    if mode == "fail":
        raise RuntimeError(f"charge {n} declined")


def notify(n: int, mode: str) -> None:
    """Another job class, same behaviour."""
    if mode == "fail":
        raise ValueError(f"notify {n} bounced")


WORKERS = {"App.Charge": charge, "App.Notify": notify}


# -- alert rules --------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    # Given the alert rules file
    # When promtool checks it
    result = promtool("check", "rules", str(ALERTS_PATH))
    # Then it is valid, with the five rules
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    # Given the promtool unit tests of the rules (bad and healthy series)
    # When promtool runs them
    result = promtool("test", "rules", str(ALERTS_TEST_PATH))
    # Then every expected alert fires, on the expected series only
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_have_severity_and_annotations() -> None:
    # Given the alert rules file
    text = ALERTS_PATH.read_text(encoding="utf-8")
    # When it is split into rules
    blocks = alert_blocks(text)
    # Then the group holds the five alerts, each with a severity, a summary and a description
    assert re.search(r"^\s*- name:\s*exq-fast\s*$", text, flags=re.MULTILINE)
    assert list(blocks) == ALERTS
    for name, block in blocks.items():
        assert re.search(r"severity:\s*(warning|critical)\b", block), name
        assert re.search(r"^\s+summary:", block, flags=re.MULTILINE), name
        assert re.search(r"^\s+description:", block, flags=re.MULTILINE), name
        assert re.search(r"^\s+for:\s*\d+m\b", block, flags=re.MULTILINE), name


def test_alert_unit_tests_cover_failure_ratio_and_heartbeat() -> None:
    # Given the promtool unit test file
    text = ALERTS_TEST_PATH.read_text(encoding="utf-8")
    # When its tested alert names are collected
    tested = set(re.findall(r"alertname:\s*(\w+)", text))
    # Then at least the failure ratio and the stale heartbeat alerts are tested
    assert {"ExqHighFailureRatio", "ExqHeartbeatStale"} <= tested
    assert tested <= set(ALERTS)


# -- dashboard ----------------------------------------------------------------------------------


def test_dashboard_identity() -> None:
    # Given the dashboard file
    # When it is parsed as JSON
    dashboard = load_dashboard()
    # Then it is a classic, importable-as-is dashboard with a fixed uid
    assert dashboard["uid"] == "exq-fast"
    assert dashboard["title"] == "exq-fast"
    assert dashboard["schemaVersion"] == 39
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert dashboard.get("id") is None
    assert "${DS_" not in DASHBOARD_PATH.read_text(encoding="utf-8")


def test_dashboard_variables() -> None:
    # Given the dashboard
    dashboard = load_dashboard()
    # When its template variables are read
    found = variables(dashboard)
    # Then there is a Prometheus data source variable and four label_values query variables
    assert list(found) == ["datasource", "job", "instance", "queue", "job_class"]
    source = found["datasource"]
    assert source["type"] == "datasource"
    assert source["query"] == "prometheus"
    for name in ("job", "instance", "queue", "job_class"):
        var = found[name]
        assert var["type"] == "query", name
        assert var["datasource"] == DATASOURCE, name
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert re.fullmatch(rf"label_values\(.+, {name}\)", query), query
        assert var["definition"] == query, name
        assert var["multi"] is True and var["includeAll"] is True, name
        assert var["refresh"] in (1, 2), name
    # And each variable is filtered by the ones before it
    assert '$job' in found["instance"]["query"]
    assert all(v in found["queue"]["query"] for v in ("$job", "$instance"))
    assert all(v in found["job_class"]["query"] for v in ("$job", "$instance", "$queue"))


def test_every_panel_uses_the_datasource_variable() -> None:
    # Given the dashboard
    dashboard = load_dashboard()
    # When its panels and their queries are walked
    panels = graph_panels(dashboard)
    # Then each panel (rows included) and each query reads the data source chosen in the
    # variable
    assert len(panels) >= 20
    for row in iter_panels(dashboard["panels"]):
        assert row["datasource"] == DATASOURCE, row["title"]
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for var in variables(dashboard).values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE


def test_every_query_filters_by_the_variables() -> None:
    # Given the dashboard queries
    targets = dashboard_targets(load_dashboard())
    # When each metric selector in each query is read
    for target in targets:
        selectors = SELECTOR.findall(target.expr)
        where = f"{target.panel}/{target.ref_id}: {target.expr}"
        # Then the query names only known exq metrics, each filtered by $job and $instance,
        # and by $queue / $job_class when the metric carries those labels
        assert "$job" in target.expr and "$instance" in target.expr, where
        assert selectors, where
        assert not re.search(r"\bexq_\w+\b(?!\s*\{)", SELECTOR.sub("", target.expr)), where
        for metric, matchers in selectors:
            assert metric in METRIC_LABELS, where
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, where
            for label in METRIC_LABELS[metric]:
                assert f'{label}=~"${label}"' in matchers, where


def test_every_range_uses_grafana_intervals() -> None:
    # Given the dashboard queries
    targets = dashboard_targets(load_dashboard())
    # When their range selectors are read
    ranges = [(t, r) for t in targets for r in RANGE.findall(t.expr)]
    # Then rates use $__rate_interval (or $__range for totals over the time picker)
    assert ranges
    for target, window in ranges:
        assert window in ("$__rate_interval", "$__range"), f"{target.panel}: {target.expr}"
        if "rate(" in target.expr:
            assert "[$__rate_interval]" in target.expr, target.panel


def test_dashboard_rows_and_units() -> None:
    # Given the dashboard
    dashboard = load_dashboard()
    # When its top-level panels are read in order
    top = dashboard["panels"]
    rows = [p["title"] for p in top if p["type"] == "row"]
    # Then the five rows exist in order, each followed by panels with a unit
    assert rows == ROWS
    counts = dict.fromkeys(ROWS, 0)
    current = None
    for panel in top:
        if panel["type"] == "row":
            current = panel["title"]
            counts[current] += len(panel.get("panels", []))
        else:
            assert current is not None, panel["title"]
            counts[current] += 1
    assert all(n >= 3 for n in counts.values()), counts
    for panel in graph_panels(dashboard):
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]
    ids = [p["id"] for p in iter_panels(top)]
    assert len(ids) == len(set(ids))


def test_dashboard_panels_do_not_overlap() -> None:
    # Given the dashboard's grid positions
    panels = list(iter_panels(load_dashboard()["panels"]))
    cells: dict[tuple[int, int], str] = {}
    # When each panel's cells are marked on the 24-column grid
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                # Then no cell holds two panels
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_the_requested_panels() -> None:
    # Given the dashboard queries
    exprs = "\n".join(t.expr for t in dashboard_targets(load_dashboard()))
    # When searched for the signals the dashboard promises
    wanted = [
        "rate(exq_jobs_processed_total", "rate(exq_jobs_failed_total",
        "exq_jobs_in_progress", "exq_queue_concurrency", "exq_queue_size",
        "exq_queue_latency_seconds{", "rate(exq_jobs_fetched_total",
        "histogram_quantile(0.95, sum by (queue, le) (rate(exq_job_queue_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (job_class, le) (rate(exq_job_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (job_class, le) (rate(exq_job_duration_seconds_bucket",
        "topk(", "rate(exq_jobs_retried_total", "rate(exq_jobs_dead_total",
        "sum by (reason) (rate(exq_jobs_recovered_total",
        "sum by (operation) (rate(exq_redis_errors_total",
        "time() - max by (instance) (exq_heartbeat_last_success_timestamp_seconds",
        "exq_dead_set_size", "exq_retry_set_size", "exq_stats_pending",
        "exq_stats_flush_duration_seconds_bucket", "exq_oldest_running_job_age_seconds",
        "exq_build_info",
    ]
    # Then each is there
    missing = [w for w in wanted if w not in exprs]
    assert not missing


# -- provisioning -------------------------------------------------------------------------------


def test_provisioning_files() -> None:
    # Given the Grafana provisioning files
    dashboards = (GRAFANA / "provisioning/dashboards/exq-fast.yml").read_text(encoding="utf-8")
    sources = (GRAFANA / "provisioning/datasources/prometheus.yml").read_text(encoding="utf-8")
    # When read as text (no YAML parser is a dependency)
    # Then the dashboard provider is a file provider on the folder the comment says to fill
    assert re.search(r"^apiVersion: 1$", dashboards, flags=re.MULTILINE)
    assert re.search(r"^\s+type: file$", dashboards, flags=re.MULTILINE)
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards/exq-fast$", dashboards,
                     flags=re.MULTILINE)
    assert "cp grafana/exq-fast.json /var/lib/grafana/dashboards/exq-fast/" in dashboards
    # And the data source is a Prometheus with the uid the dashboard defaults to
    assert re.search(r"^apiVersion: 1$", sources, flags=re.MULTILINE)
    assert re.search(r"^\s+type: prometheus$", sources, flags=re.MULTILINE)
    assert re.search(r"^\s+uid: prometheus$", sources, flags=re.MULTILINE)
    assert re.search(r"^\s+url: http://localhost:9090$", sources, flags=re.MULTILINE)
    assert "\t" not in dashboards + sources


# -- a real scrape ------------------------------------------------------------------------------


def stat(client: redis.Redis, keys: Keys, kind: StatKind) -> int:
    return int(client.get(keys.stat(kind)) or 0)


def test_a_real_scrape_passes_promtool_check_metrics(
        make_config: Callable[..., Config], redis_client: redis.Redis, keys: Keys) -> None:
    # Given a node with the cluster collector and a metrics endpoint on a free port
    require_binary("promtool")
    config = make_config(queues=[("default", 5), ("mail", 5)], metrics_port=0,
                         metrics_cluster=True, scheduler_enable=False, poll_timeout=20)
    exq = Exq(config, workers=Registry(WORKERS)).start()
    try:
        # When it runs jobs of two classes on two queues, some failing (retried or dead)
        jobs = []
        for i in range(40):
            failing = i % 5 == 0
            options = {"max_retries": 0 if i % 10 == 0 else 3}
            jobs.append(("default" if i % 2 else "mail", "App.Charge" if i % 4 < 2
                         else "App.Notify", [i, "fail" if failing else "ok"], options))
        exq.enqueue_all(jobs)
        exq.enqueue("parked", "App.Charge", [0, "ok"])  # nobody consumes it
        wait_for(lambda: stat(redis_client, keys, "processed") == 32
                 and stat(redis_client, keys, "failed") == 8, 10, "the jobs to finish")
        url = exq.metrics_url
        assert url is not None
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    finally:
        exq.stop()
    # Then the scrape holds the job, node and cluster families
    text = body.decode()
    for family in ("exq_jobs_processed_total", "exq_jobs_dead_total", "exq_jobs_retried_total",
                   "exq_job_duration_seconds_bucket", "exq_queue_size", "exq_build_info"):
        assert f"\n{family}" in text, family
    # And promtool's linter finds no problem in it
    result = promtool("check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr
