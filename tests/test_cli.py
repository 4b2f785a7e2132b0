"""The operator CLI as an operator runs it: ``python -m exq_fast VERB`` in a subprocess.

Every verb runs against the test Redis in the test's namespace; JSON output is
compared with what Redis holds, tables are checked for their rows, and writes
for what they changed. Errors must be one line on stderr with no traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import redis

from exq_fast import cli, cli_output, current_job
from exq_fast.app import Exq
from exq_fast.config import Config
from exq_fast.embedded import RedisServer
from exq_fast.enqueuer import Enqueuer
from exq_fast.job import Job
from exq_fast.keys import Keys

from .conftest import fixture_members

FIXTURE_DIR = "exq-0.23.0"
RETRY_JID = "a23d06ba-e938-484e-b47f-188e8e16c8d3"  # twice in retry.jsonl (retry_count 1, 2)
DEAD_JID = "18e24879-9589-49b1-896f-b81448ee7901"
BOTH_JID = "19041c3e-2087-4476-b36c-171949fe72bb"  # in retry.jsonl and in dead.jsonl
VERBS = ("enqueue", "run", "demo", "stats", "queues", "jobs", "retries", "scheduled", "dead",
         "processes", "requeue", "remove", "clear", "signal", "prune")


def clean_env() -> dict[str, str]:
    """The environment without REDIS_URL / EXQ_* (the flags alone choose Redis)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EXQ_") and k != "REDIS_URL"}


class Cli:
    """Runs ``python -m exq_fast`` on the test Redis and namespace."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.env = clean_env()

    def run(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a verb (stdin not a terminal); return the finished process."""
        command = [sys.executable, "-m", "exq_fast", *args, "--redis-url", url or self.redis_url,
                   "--namespace", self.namespace]
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=self.env, timeout=30, check=False)

    def ok(self, *args: str) -> str:
        """Run a verb that must succeed; return its stdout."""
        done = self.run(*args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        return done.stdout

    def json(self, *args: str) -> Any:
        """Run a read verb with ``--json``; return the parsed output."""
        return json.loads(self.ok(*args, "--json"))


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int | None = None,
                          contains: str = "") -> str:
    """The process failed with one line on stderr, no traceback, nothing on stdout."""
    assert done.returncode != 0
    if code is not None:
        assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert contains in lines[0]
    return lines[0]


def table_rows(text: str) -> list[list[str]]:
    """The cells of a table's lines (cells are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def iso(seconds: float, precise: bool = True) -> str:
    """What the CLI prints for a Unix time."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.fromtimestamp(seconds, UTC).strftime(fmt)


def load_set(client: redis.Redis, key: str, name: str) -> list[tuple[bytes, str]]:
    """Load a fixture .jsonl into the zset ``key``; return its (member, score) pairs."""
    members = fixture_members(f"{FIXTURE_DIR}/{name}.jsonl")
    client.zadd(key, {member: float(score) for member, score in members})
    return members


def zset(client: redis.Redis, key: str) -> list[tuple[bytes, float]]:
    """The members of ``key`` and their scores, lowest first."""
    pairs = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
    return [(bytes(m), float(s)) for m, s in pairs]


def enqueue(enqueuer: Enqueuer, queue: str, job_class: str, args: list[Any],
            **options: Any) -> str:
    """Enqueue one job; return its jid."""
    jid = enqueuer.enqueue(queue, job_class, args, **options)
    assert isinstance(jid, str)
    return jid


@pytest.fixture
def run_cli(redis_url: str, namespace: str) -> Cli:
    return Cli(redis_url, namespace)


@pytest.fixture
def loaded(redis_client: redis.Redis, keys: Keys) -> dict[str, list[tuple[bytes, str]]]:
    """The Exq 0.23 retry and dead fixtures, in this test's namespace."""
    return {"retry": load_set(redis_client, keys.retry, "retry"),
            "dead": load_set(redis_client, keys.dead, "dead")}


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_the_connection_flags(
    verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: exq-fast {verb}" in text
    assert "--redis-url" in text and "--namespace" in text and "--debug" in text


def test_help_runs_as_a_command(run_cli: Cli) -> None:
    done = subprocess.run([sys.executable, "-m", "exq_fast", "--help"], capture_output=True,
                          text=True, env=run_cli.env, check=True)
    for verb in VERBS:
        assert verb in done.stdout


# -- read verbs ------------------------------------------------------------------------


def test_stats_reports_the_counters_the_sets_and_the_days(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    # Given counters, per-day counts for today, fixture sets and three queued jobs
    now = time.time()
    redis_client.mset({keys.stat("processed"): 1234, keys.stat("failed"): 56,
                       keys.stat_day("processed", now): 40, keys.stat_day("failed", now): 3})
    for n in range(3):
        enqueuer.enqueue("stats_q", "App.Work", [n])
    enqueuer.enqueue_in("stats_q", 3600, "App.Later", [])

    # When an operator asks for the stats, as JSON and as a table
    data = run_cli.json("stats", "--days", "3")
    table = run_cli.ok("stats")

    # Then the numbers are Redis's, with one entry per day, newest first
    today = datetime.fromtimestamp(now, UTC).date().isoformat()
    assert {k: v for k, v in data.items() if k != "days"} == {
        "processed": 1234, "failed": 56, "retries": len(loaded["retry"]), "scheduled": 1,
        "dead": len(loaded["dead"]), "enqueued": 3, "busy": 0, "processes": 0, "in_flight": 0}
    assert len(data["days"]) == 3
    assert data["days"][0] == {"date": today, "processed": 40, "failed": 3}
    assert [d["date"] for d in data["days"]] == sorted((d["date"] for d in data["days"]),
                                                       reverse=True)
    rows = table_rows(table)
    assert ["processed", "1234"] in rows and ["failed", "56"] in rows
    assert ["retries", "3"] in rows and ["dead", "2"] in rows and ["enqueued", "3"] in rows
    assert ["DATE", "PROCESSED", "FAILED"] in rows and [today, "40", "3"] in rows
    assert len([r for r in rows if re.fullmatch(r"\d{4}-\d\d-\d\d", r[0])]) == 7


def test_queues_lists_each_queue_with_size_and_latency(
    run_cli: Cli, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given queued jobs, and two jobs of alpha left in flight by a node that is gone
    for n in range(3):
        enqueuer.enqueue("alpha", "App.Work", [n])
    enqueuer.enqueue("beta", "App.Work", [])
    redis_client.lpush(keys.backup("gone-node", "alpha"), b'{"class":"A","jid":"1"}',
                       b'{"class":"A","jid":"2"}')

    data = run_cli.json("queues")
    table = run_cli.ok("queues")

    assert [(q["name"], q["size"], q["in_flight"]) for q in data] == [("alpha", 3, 2),
                                                                       ("beta", 1, 0)]
    assert all(0 <= q["latency"] < 60 for q in data)
    rows = table_rows(table)
    assert rows[0] == ["QUEUE", "SIZE", "LATENCY", "IN FLIGHT"]
    assert [[r[0], r[1], r[3]] for r in rows[1:]] == [["alpha", "3", "2"], ["beta", "1", "0"]]
    assert all(re.fullmatch(r"\d+\.\ds", r[2]) for r in rows[1:])


def test_backups_lists_every_nodes_jobs_in_flight_and_requeues_a_gone_one(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given jobs in flight on a live node (its process record beats) and on one that is gone
    redis_client.hset(keys.node("live-node"), "beat", repr(time.time()))
    redis_client.lpush(keys.backup("live-node", "q"), b'{"class":"A","jid":"l1"}')
    gone = [b'{"class":"A","jid":"g1"}', b'{"class":"A","jid":"g2"}']
    redis_client.lpush(keys.backup("gone-node", "q"), *gone)

    # When the operator lists them
    data = run_cli.json("backups")
    # Then both are listed with their node's state
    assert data == [{"node": "gone-node", "state": "unknown", "queue": "q", "jobs": 2},
                    {"node": "live-node", "state": "alive", "queue": "q", "jobs": 1}]
    assert "gone-node" in run_cli.ok("processes")

    # When the live node's jobs are asked back, the request is refused in one line
    refused = run_cli.run("backups", "--requeue", "live-node", "--yes")
    assert refused.returncode == 2
    assert "is alive" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert redis_client.llen(keys.backup("live-node", "q")) == 1

    # When the gone node's jobs are asked back
    out = run_cli.ok("backups", "--requeue", "gone-node", "--yes")
    # Then they are at the front of their queue (its right end), g1, fetched first, first
    assert "put 2 jobs" in out
    assert redis_client.lrange(keys.queue("q"), 0, -1) == [gone[1], gone[0]]
    assert not redis_client.exists(keys.backup("gone-node", "q"))


def test_jobs_pages_a_queue_newest_first(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer
) -> None:
    # Given three jobs, one with long args
    jids = [enqueuer.enqueue("work", "App.Mailer", [n, "x" * 100]) for n in range(3)]
    stored = [json.loads(raw) for raw in redis_client.lrange(keys.queue("work"), 0, -1)]

    # When the queue is listed as JSON, paged, and as a table
    everything = run_cli.json("jobs", "work")
    page = run_cli.json("jobs", "work", "--offset", "1", "--size", "1")
    table = run_cli.ok("jobs", "work")

    # Then JSON is the list in Redis order (newest first), every field there
    assert [j["jid"] for j in everything] == [p["jid"] for p in stored] == jids[::-1]
    for record, payload in zip(everything, stored, strict=True):
        assert record["payload"] == payload
        assert record["class"] == "App.Mailer" and record["queue"] == "work"
        assert record["args"] == payload["args"]
        assert record["enqueued_at"] == iso(payload["enqueued_at"])
    assert [j["jid"] for j in page] == [jids[1]]
    # ... and the table has a row per job, args cut short, times to the second
    rows = table_rows(table)
    assert rows[0] == ["JID", "CLASS", "ARGS", "ENQUEUED AT"]
    assert [r[0] for r in rows[1:]] == jids[::-1]
    for row, payload in zip(rows[1:], stored, strict=True):
        assert row[1] == "App.Mailer"
        assert row[2].startswith(f'[{payload["args"][0]}, "xxx') and row[2].endswith("…")
        assert row[3] == iso(payload["enqueued_at"], precise=False)


def test_retry_and_dead_listings_match_the_sets(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    retries = run_cli.json("retries")
    dead = run_cli.json("dead")
    dead_table = run_cli.ok("dead")

    # retries: soonest first, each with its exact score and the stored payload
    in_redis = zset(redis_client, keys.retry)
    assert [(r["score"], r["payload"]) for r in retries] == [
        (score, json.loads(member)) for member, score in in_redis]
    assert [r["jid"] for r in retries] == [RETRY_JID, RETRY_JID, BOTH_JID]
    assert [r["retry_count"] for r in retries] == [1, 2, 1]
    assert all(r["at"] == iso(r["score"]) for r in retries)
    # dead: newest first, with the error fields
    assert [r["jid"] for r in dead] == [BOTH_JID, DEAD_JID]
    assert [r["error_class"] for r in dead] == ["ExqGenericError"] * 2
    assert all(r["error_message"].startswith("{%RuntimeError") for r in dead)
    rows = table_rows(dead_table)
    assert rows[0] == ["DIED AT", "JID", "CLASS", "RETRIES", "ERROR", "MESSAGE"]
    assert [r[:5] for r in rows[1:]] == [
        [iso(r["score"], precise=False), r["jid"], "Bench.FailingWorker",
         str(r["retry_count"]), "ExqGenericError"] for r in dead]
    assert all(r[5].endswith("…") and "\n" not in r[5] for r in rows[1:])


def test_scheduled_listing_and_paging_notes(run_cli: Cli, enqueuer: Enqueuer) -> None:
    jids = [enqueuer.enqueue_in("later", 3600 + n, "App.Later", [n]) for n in range(3)]

    data = run_cli.json("scheduled", "--size", "2")
    table = run_cli.ok("scheduled", "--offset", "2")

    assert [r["jid"] for r in data] == jids[:2]
    assert all(r["at"] == iso(r["score"]) for r in data)
    rows = table_rows(table)
    assert rows[0][:3] == ["RUN AT", "JID", "CLASS"]
    assert rows[1][1:4] == [jids[2], "App.Later", "0"]
    assert rows[-1] == ["showing 3-3 of 3"]


# -- processes and signals -------------------------------------------------------------


class Node:
    """An in-process exq-fast node whose worker blocks until released."""

    def __init__(self, config: Config) -> None:
        self.gate = threading.Event()
        self.jobs: list[Job] = []
        self.exq = Exq(config, workers={"Cli.Blocker": self.perform})

    def perform(self, *args: Any) -> None:
        job = current_job()
        assert job is not None
        self.jobs.append(job)
        self.gate.wait(20)

    def ping_until(self, condition: Callable[[], object], what: str) -> None:
        """Ping (as the pinger does every 5 s) until ``condition`` holds."""
        deadline = time.monotonic() + 10
        while not (self.exq.pinger.run_once() is not None and condition()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)


@pytest.fixture
def node(make_config: Callable[..., Config]) -> Iterator[Node]:
    running = Node(make_config(queues=["cli_q"]))
    running.exq.start()
    yield running
    running.gate.set()
    running.exq.stop(timeout=5)


def test_processes_and_signals_reach_a_running_node(
    run_cli: Cli, node: Node, node_id: str, enqueuer: Enqueuer
) -> None:
    # Given a node running one job
    jid = enqueue(enqueuer, "cli_q", "Cli.Blocker", [1])
    node.ping_until(lambda: node.jobs, "the job to start")
    node.ping_until(lambda: True, "a ping with the job recorded")

    # When the processes are listed
    data = run_cli.json("processes")
    table = run_cli.ok("processes")

    # Then the node and its running job are there
    assert [n["identity"] for n in data["nodes"]] == [node_id]
    assert data["nodes"][0]["queues"] == ["cli_q"] and data["nodes"][0]["busy"] == 1
    assert data["nodes"][0]["pid"] == os.getpid() and data["nodes"][0]["quiet"] is False
    assert [(p["node"], p["queue"], p["jid"], p["class"]) for p in data["running"]] == [
        (node_id, "cli_q", jid, "Cli.Blocker")]
    rows = table_rows(table)
    assert ["NODE", "PID", "BUSY", "QUIET", "QUEUES", "STARTED"] in rows
    assert [node_id, str(os.getpid()), "1", "no", "cli_q"] in [r[:5] for r in rows]
    assert [node_id, "cli_q", jid, "Cli.Blocker"] in [r[:4] for r in rows]

    # When the job is cancelled, then the node flags it
    assert "CANCEL" in run_cli.ok("signal", node_id, "cancel", jid)
    node.ping_until(lambda: node.jobs[0].cancelled, "the job to be cancelled")
    # ... a job that is not running cannot be
    assert_one_line_error(run_cli.run("signal", node_id, "cancel", "no-such-jid"), 1,
                          "is running job 'no-such-jid'")
    # ... stop is refused without --yes when stdin is not a terminal
    assert_one_line_error(run_cli.run("signal", node_id, "stop"), 2, "--yes")
    # ... and quiet makes the node stop fetching
    assert "TSTP" in run_cli.ok("signal", node_id, "quiet")
    node.ping_until(lambda: node.exq.subscriptions() == [], "TSTP to be handled")
    assert not node.exq.stopped.is_set()


def test_signal_to_an_unknown_node_is_an_error(run_cli: Cli) -> None:
    assert_one_line_error(run_cli.run("signal", "ghost", "quiet"), 1,
                          "no live node named 'ghost'")


def test_prune_removes_stopped_nodes(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys
) -> None:
    redis_client.sadd(keys.processes, "gone-node")  # registered, but its hash expired

    assert run_cli.ok("prune").strip() == "pruned 1 dead node: gone-node"
    assert redis_client.smembers(keys.processes) == set()
    assert run_cli.ok("prune").strip() == "no dead nodes to prune"


# -- requeue, remove, clear ------------------------------------------------------------


def test_requeue_by_jid_moves_the_exact_members(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    dead_member = next(m for m, _ in loaded["dead"] if json.loads(m)["jid"] == DEAD_JID)
    retry_members = [m for m, _ in loaded["retry"] if json.loads(m)["jid"] == RETRY_JID]

    # requeue needs no confirmation for named jobs
    assert run_cli.ok("requeue", "dead", "--jid", DEAD_JID).strip() == \
        "requeued 1 job from the dead set"
    assert run_cli.ok("requeue", "retry", "--jid", RETRY_JID).strip() == \
        "requeued 2 jobs from the retry set"

    # byte for byte into their queue; the other members stay
    queued = redis_client.lrange(keys.queue("fxq"), 0, -1)
    assert sorted(queued) == sorted([dead_member, *retry_members])
    assert [json.loads(m)["jid"] for m, _ in zset(redis_client, keys.dead)] == [BOTH_JID]
    assert [json.loads(m)["jid"] for m, _ in zset(redis_client, keys.retry)] == [BOTH_JID]


def test_requeue_of_an_unknown_jid_moves_nothing(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    line = assert_one_line_error(
        run_cli.run("requeue", "dead", "--jid", DEAD_JID, "--jid", "nope"), 1)
    assert line == "error: no job with jid nope in the dead set"
    assert redis_client.zcard(keys.dead) == len(loaded["dead"])
    assert not redis_client.exists(keys.queue("fxq"))


def test_requeue_all_needs_yes_without_a_terminal(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    assert_one_line_error(run_cli.run("requeue", "retry", "--all"), 2, "--yes")
    assert redis_client.zcard(keys.retry) == 3

    assert run_cli.ok("requeue", "retry", "--all", "--yes").strip() == \
        "requeued 3 jobs from the retry set"
    assert redis_client.zcard(keys.retry) == 0
    assert sorted(redis_client.lrange(keys.queue("fxq"), 0, -1)) == \
        sorted(m for m, _ in loaded["retry"])


def test_remove_by_jid_from_a_set_and_from_a_queue(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    # From the dead set: refused without --yes, done with it
    assert_one_line_error(run_cli.run("remove", "dead", "--jid", DEAD_JID), 2, "--yes")
    assert redis_client.zcard(keys.dead) == 2
    assert run_cli.ok("remove", "dead", "--jid", DEAD_JID, "--yes").strip() == \
        "removed 1 job from the dead set"
    assert [json.loads(m)["jid"] for m, _ in zset(redis_client, keys.dead)] == [BOTH_JID]

    # From a queue, releasing the job's unique lock
    keep = enqueue(enqueuer, "uq", "App.Work", [1])
    jid = enqueue(enqueuer, "uq", "App.Unique", [2], unique_for=600)
    token = json.loads(redis_client.lindex(keys.queue("uq"), 0) or b"")["unique_token"]
    assert redis_client.get(keys.unique(token)) == jid.encode()
    out = run_cli.ok("remove", "queue", "uq", "--jid", jid, "--clear-unique", "--yes")
    assert out.strip() == "removed 1 job from queue 'uq' (unique locks released)"
    assert [json.loads(m)["jid"] for m in redis_client.lrange(keys.queue("uq"), 0, -1)] == [keep]
    assert not redis_client.exists(keys.unique(token))


def test_clear_a_queue_and_a_set(
    run_cli: Cli, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    loaded: dict[str, list[tuple[bytes, str]]],
) -> None:
    for n in range(2):
        enqueuer.enqueue("cq", "App.Work", [n])

    assert_one_line_error(run_cli.run("clear", "queue", "cq"), 2, "--yes")
    assert redis_client.llen(keys.queue("cq")) == 2
    assert run_cli.ok("clear", "queue", "cq", "-y").strip() == "deleted 2 jobs from queue 'cq'"
    assert redis_client.llen(keys.queue("cq")) == 0
    assert redis_client.sismember(keys.queues, "cq")  # the name is kept

    assert run_cli.ok("clear", "dead", "--yes").strip() == "deleted 2 jobs from the dead set"
    assert not redis_client.exists(keys.dead)
    assert redis_client.zcard(keys.retry) == 3


def test_destructive_verbs_ask_on_a_terminal(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys,
    loaded: dict[str, list[tuple[bytes, str]]],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for name in [k for k in os.environ if k.startswith("EXQ_") or k == "REDIS_URL"]:
        monkeypatch.delenv(name)
    argv = ["clear", "dead", "--redis-url", redis_url, "--namespace", namespace]

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert cli.main(argv) == 1
    assert "delete all 2 jobs of the dead set? [y/N]" in capsys.readouterr().err
    assert redis_client.zcard(keys.dead) == 2

    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert cli.main(argv) == 0
    assert "deleted 2 jobs" in capsys.readouterr().out
    assert redis_client.zcard(keys.dead) == 0


# -- errors ----------------------------------------------------------------------------


def test_unknown_queue_is_named_with_the_known_ones(run_cli: Cli, enqueuer: Enqueuer) -> None:
    enqueuer.enqueue("b", "App.Work", [])
    enqueuer.enqueue("a", "App.Work", [])

    for verb in (("jobs", "x"), ("clear", "queue", "x", "--yes")):
        line = assert_one_line_error(run_cli.run(*verb), 1)
        assert line == "error: no queue named 'x' (known: a, b)"


def test_unreachable_redis_is_one_line(run_cli: Cli) -> None:
    line = assert_one_line_error(run_cli.run("stats", url="redis://127.0.0.1:1/0"))
    assert line.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0: ")
    assert line.endswith("check --redis-url / REDIS_URL")


def test_a_wrong_password_is_reported_without_the_password(run_cli: Cli) -> None:
    with RedisServer(extra_args=("--requirepass", "pw")) as server:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        done = run_cli.run("queues", url=url)
    line = assert_one_line_error(done, contains="Redis refused the credentials")
    assert "wrong" not in done.stderr + done.stdout
    assert f"redis://:***@127.0.0.1:{server.port}/0" in line


def test_bad_args_json_is_one_line(run_cli: Cli) -> None:
    assert_one_line_error(run_cli.run("enqueue", "q", "App.Work", "[1,"), 2,
                          "ARGS_JSON is not valid JSON")


def test_debug_shows_the_traceback(run_cli: Cli) -> None:
    done = run_cli.run("stats", "--debug", url="redis://127.0.0.1:1/0")
    assert done.returncode != 0
    assert "Traceback" in done.stderr


# -- rendering helpers -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://user:p@ss@host/1", "redis://user:***@host/1"),
    ("unix:///tmp/redis.sock?db=0&password=pw", "unix:///tmp/redis.sock?db=0&password=***"),
    ("rediss://user@host:6380", "rediss://user@host:6380"),
])
def test_urls_are_printed_with_their_password_masked(url: str, shown: str) -> None:
    assert cli_output.mask_url(url) == shown
    assert cli_output.scrub(f"invalid value {url!r} (why)") == f"invalid value {shown!r} (why)"


def test_tables_align_columns_and_cut_long_text() -> None:
    columns = [cli_output.Column("NAME"), cli_output.Column("SIZE", right=True)]
    text = cli_output.render_table(columns, [("a", 5), ("longer", 12345), ("c", None)])
    assert text.splitlines() == ["NAME     SIZE", "a           5", "longer  12345", "c           -"]
    assert cli_output.render_table(columns, []).splitlines() == ["NAME  SIZE", "(none)"]
    assert cli_output.truncate("a\n  b\tc", 10) == "a b c"
    assert cli_output.truncate("x" * 20, 10) == "x" * 9 + "…"
    assert cli_output.iso_time(1795867316.548978) == "2026-11-28T12:01:56Z"
    assert cli_output.iso_time(1795867316.548978, precise=True) == "2026-11-28T12:01:56.548978Z"
    assert cli_output.iso_time(1e300) == "1e+300"
    assert [cli_output.duration(s) for s in (0.42, 75, 3 * 3600 + 420, 2 * 86400 + 4 * 3600)] \
        == ["0.4s", "1m15s", "3h07m", "2d04h"]


def test_enqueue_in_a_negative_time_is_refused(run_cli: Cli, redis_client: redis.Redis,
                                               keys: Keys) -> None:
    # When a job is enqueued to run 5 s in the past
    result = run_cli.run("enqueue", "q", "App.Work", "--in", "-5")
    # Then it is refused in one line, and nothing is written
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --in must be 0 or more seconds, got -5"
    assert redis_client.zcard(keys.schedule) == 0 and redis_client.llen(keys.queue("q")) == 0


def test_enqueue_with_a_jid_and_a_timeout(run_cli: Cli, redis_client: redis.Redis,
                                          keys: Keys) -> None:
    # When a job is enqueued with its own jid and time limit
    result = run_cli.run("enqueue", "q", "App.Work", "[1]", "--jid", "my-jid", "--timeout", "2.5")
    # Then it carries both, and the jid is printed
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "my-jid"
    job = json.loads(cast(bytes, redis_client.lindex(keys.queue("q"), 0)))
    assert (job["jid"], job["timeout"]) == ("my-jid", 2.5)
    # and one jid cannot name several jobs
    refused = run_cli.run("enqueue", "q", "App.Work", "--jid", "x", "--count", "2")
    assert refused.returncode == 2
    assert "--jid names one job" in refused.stderr
