"""``exq-fast run`` as an operator runs it: a subprocess, a worker module, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from tests.conftest import RunProcesses, wait_for

WORKER_MODULE = '''\
import json
import os
import threading
import time

from exq_fast import current_job, worker

_lock = threading.Lock()


def _write(record):
    with _lock, open(os.environ["CLI_OUT"], "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\\n")


@worker("Cli.Echo")
def echo(*args):
    job = current_job()
    _write({"event": "run", "jid": job.jid, "queue": job.queue, "args": list(args)})


@worker("Cli.Slow")
def slow(*args):
    job = current_job()
    _write({"event": "start", "jid": job.jid, "queue": job.queue, "t": time.monotonic()})
    time.sleep(0.1)
    _write({"event": "end", "jid": job.jid, "queue": job.queue, "t": time.monotonic()})
'''



class Cli(RunProcesses):
    """Runs ``python -m exq_fast`` in ``tmp_path`` with the worker module there."""

    def __init__(self, tmp_path: Path, redis_url: str, namespace: str, node_id: str) -> None:
        super().__init__(tmp_path, "cli_workers", WORKER_MODULE)
        self.redis_url = redis_url
        self.namespace = namespace
        self.node_id = node_id
        self.out = tmp_path / "out.jsonl"
        self.out.touch()
        self.env["CLI_OUT"] = str(self.out)

    def node_args(self, *queues: str) -> list[str]:
        args = ["--redis-url", self.redis_url, "--namespace", self.namespace,
                "--node-id", self.node_id, "--workers", "cli_workers", "--shutdown-timeout", "2000"]
        for queue in queues:
            args += ["--queue", queue]
        return args

    def records(self) -> list[dict[str, Any]]:
        lines = self.out.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, namespace: str, node_id: str) -> Iterator[Cli]:
    runner = Cli(tmp_path, redis_url, namespace, node_id)
    yield runner
    runner.close()


def registered(client: redis.Redis, keys: Keys, node_id: str) -> bool:
    return bool(client.sismember(keys.processes, node_id)) and bool(
        client.exists(keys.node(node_id)))


def test_run_processes_jobs_and_stops_cleanly_on_sigterm(
    cli: Cli, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given jobs enqueued before the node starts
    before = {str(enqueuer.enqueue("a", "Cli.Echo", [i, "before"])) for i in range(3)}

    # When `exq-fast run` starts, and more jobs come after it is up
    process = cli.start(*cli.node_args("a"))
    wait_for(lambda: registered(redis_client, keys, node_id), what="node registered")
    after = {str(enqueuer.enqueue("a", "Cli.Echo", [i, "after"])) for i in range(3)}

    # Then all of them run, once, with their args
    wait_for(lambda: len(cli.records()) >= 6, what="6 jobs run")
    runs = cli.records()
    assert sorted(r["jid"] for r in runs) == sorted(before | after)
    assert sorted(tuple(r["args"]) for r in runs) == sorted(
        [(i, "before") for i in range(3)] + [(i, "after") for i in range(3)])
    wait_for(lambda: redis_client.get(keys.stat("processed")) == b"6", what="6 acks")

    # When it gets SIGTERM
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(10)
    elapsed = time.monotonic() - started

    # Then it exits 0 within a few seconds, unregistered, with nothing left behind
    assert code == 0, cli.stderr()
    # (the bound is the assertion: an idle node exits at once, not after a ping
    # interval, 5 s, or a wait on jobs it does not have)
    assert elapsed < 3
    assert "Traceback" not in cli.stderr()
    assert redis_client.exists(keys.node(node_id), keys.workers(node_id)) == 0
    assert not redis_client.sismember(keys.processes, node_id)
    assert redis_client.llen(keys.backup(node_id, "a")) == 0
    assert redis_client.llen(keys.queue("a")) == 0


def test_run_with_several_queues_and_a_concurrency(
    cli: Cli, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given slow jobs in "a" and quick jobs in "b"
    slow = {str(enqueuer.enqueue("a", "Cli.Slow", [i])) for i in range(6)}
    quick = {str(enqueuer.enqueue("b", "Cli.Echo", [i])) for i in range(3)}

    # When the node runs with --queue a:2,b (split as EXQ_QUEUES is)
    process = cli.start(*cli.node_args("a:2,b"))
    wait_for(lambda: registered(redis_client, keys, node_id), what="node registered")

    # Then it consumes both queues, "a" two jobs at a time
    info = json.loads(redis_client.hget(keys.node(node_id), "info") or b"{}")
    assert sorted(info["queues"]) == ["a", "b"]
    wait_for(lambda: len([r for r in cli.records() if r["event"] != "start"]) == 9,
             what="9 jobs done")
    records = cli.records()
    assert {r["jid"] for r in records if r["event"] == "run"} == quick
    assert {r["jid"] for r in records if r["event"] == "end"} == slow
    running = peak = 0
    for record in sorted((r for r in records if r["event"] != "run"),
                         key=lambda r: (r["t"], r["event"] == "start")):
        running += 1 if record["event"] == "start" else -1
        peak = max(peak, running)
    assert peak == 2

    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0, cli.stderr()


def test_run_with_a_bad_queue_concurrency_exits_with_one_line(cli: Cli) -> None:
    # When the node is given --queue a:x
    result = cli.run(*cli.node_args("a:x"))

    # Then it exits non-zero with one line naming the option and the value
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "queue" in lines[0]
    assert "a:x" in lines[0]
    assert "Traceback" not in result.stderr


def test_run_with_unreachable_redis_exits_with_one_line(cli: Cli) -> None:
    # When the node is pointed at a port where no Redis listens
    cli.redis_url = "redis://127.0.0.1:1/0"
    started = time.monotonic()
    result = cli.run(*cli.node_args("a"))

    # Then it exits non-zero, promptly, with a one-line message and no traceback
    assert result.returncode != 0
    assert time.monotonic() - started < 10
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Redis" in lines[0]
    assert "127.0.0.1:1" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("module", "expected"), [
    ("nosuch_module", "--workers nosuch_module: cannot import it: ModuleNotFoundError"),
    ("broken_jobs", "--workers broken_jobs: syntax error in "),
    ("raising_jobs", "--workers raising_jobs: cannot import it: RuntimeError: boom at import"),
])
def test_a_bad_workers_module_is_one_line_and_exit_2(cli: Cli, module: str,
                                                     expected: str) -> None:
    # Given a module with a syntax error beside the worker module
    (cli.tmp_path / "broken_jobs.py").write_text("def broken(:\n", encoding="utf-8")
    (cli.tmp_path / "raising_jobs.py").write_text("x = 1\nraise RuntimeError('boom at import')\n",
                                                  encoding="utf-8")
    for processes in ("1", "2"):
        # When a node (or a supervisor of two) is started with it
        result = cli.run(*cli.node_args("a"), "--workers", module, "--processes", processes)
        # Then it exits 2 with one line naming the module and the cause (file and line)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        if module == "broken_jobs":
            assert "broken_jobs.py, line 1" in lines[0]
        if module == "raising_jobs":  # where it raised, not exq-fast's import call
            assert lines[0].endswith("raising_jobs.py, line 2)"), lines[0]


def test_workers_may_be_a_file_path(
    cli: Cli, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given the worker module given by its path
    jid = enqueuer.enqueue("a", "Cli.Echo", [1])
    process = cli.start("--redis-url", cli.redis_url, "--namespace", cli.namespace,
                        "--node-id", node_id, "--workers", str(cli.tmp_path / "cli_workers.py"),
                        "--queue", "a")
    # Then its workers run
    wait_for(lambda: jid in {r["jid"] for r in cli.records()}, what="the job ran")
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0, cli.stderr()


def test_a_metrics_port_in_use_is_one_line_and_exit_2(cli: Cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli.run(*cli.node_args("a"), "--metrics-port", str(port))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics_port" in lines[0] and "in use" in lines[0], lines


def test_argument_errors_are_one_line(cli: Cli) -> None:
    result = cli.run(*cli.node_args("a"), "--processes", "many")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --processes must be a positive integer or "
                                     "'auto', got 'many'")
    result = cli.run("--shutdown-timeout", "soon")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --shutdown-timeout: invalid int value: 'soon' "
        "(see 'exq-fast run --help')"]


def test_numbers_no_integer_can_hold_neither_wedge_the_node_nor_lose_the_job(
    cli: Cli, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given jobs whose retry_count / enqueued_at overflow (1e400 is JSON for infinity
    # to simdjson; NaN is what a Python json.dumps writes for a float nan)
    payloads = [b'{"class":"Cli.Echo","args":[1],"jid":"inf-count","queue":"a",'
                b'"retry_count":1e400,"enqueued_at":1e400}',
                b'{"class":"Cli.Echo","args":[2],"jid":"nan-count","queue":"a",'
                b'"retry_count":NaN}']
    redis_client.sadd(keys.queues, "a")
    redis_client.lpush(keys.queue("a"), *payloads)

    # When `exq-fast run` takes them
    process = cli.start(*cli.node_args("a"))
    wait_for(lambda: len(cli.records()) + int(redis_client.zcard(keys.dead)) >= 2,
             what="both jobs run or buried")

    # Then each one ran or went to the dead set with its reason; none is left in the
    # backup list, and the node logged no internal error
    ran = {r["jid"] for r in cli.records()}
    dead = [json.loads(m) for m in redis_client.zrange(keys.dead, 0, -1)]
    assert ran | {d.get("jid") for d in dead} >= {"inf-count"}
    assert len(ran) + len(dead) == 2
    wait_for(lambda: redis_client.llen(keys.backup(node_id, "a")) == 0, what="acks")
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert "internal error" not in cli.stderr(), cli.stderr()
