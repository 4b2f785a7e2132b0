"""``exq-fast``'s logging and start-up checks, as an operator sees them on stderr.

``--log-level`` / ``--log-format`` (the level is exq-fast's only: other libraries
stay at WARNING), the warning on an unknown ``EXQ_*`` variable, the refusal to
run without a worker, and the start-up lines listing the workers per queue.
Nodes run as subprocesses (``python -m exq_fast run``), stopped with SIGTERM.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from exq_fast import config as config_module
from exq_fast.config import Config, QueueSpec
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from exq_fast.logs import JsonFormatter, setup_logging
from exq_fast.registry import Registry
from exq_fast.runner import log_workers
from tests.conftest import RunProcesses, wait_for

WORKERS = '''\
import logging

from exq_fast import worker

# A library's logger: its DEBUG must stay hidden whatever --log-level says.
logging.getLogger("redis.probe").debug("probe debug line")
logging.getLogger("redis.probe").warning("probe warning line")


@worker("LogCli.Ok")
def ok(*args):
    logging.getLogger("myapp").warning("order done", extra={"order_id": 42})


@worker("LogCli.Boom")
def boom(*args):
    raise RuntimeError("boom " + repr(args))


@worker("LogCli.Mail", queue="mail")
def mail(*args):
    return None
'''

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) ([\w.]+): (.*)$")


class Node(RunProcesses):
    """``python -m exq_fast run`` in ``tmp_path``, its stderr in a file."""

    def __init__(self, tmp_path: Path, redis_url: str, namespace: str, node_id: str) -> None:
        super().__init__(tmp_path, "log_workers", WORKERS)
        self.redis_url = redis_url
        self.namespace = namespace
        self.node_id = node_id

    def args(self, *extra: str, workers: bool = True) -> list[str]:
        out = ["--redis-url", self.redis_url, "--namespace", self.namespace,
               "--node-id", self.node_id, "--shutdown-timeout", "2000", *extra]
        return [*out, "--workers", "log_workers"] if workers else out

    def lines(self) -> list[str]:
        return [line for line in self.stderr().splitlines() if line.strip()]

    def wait_for_line(self, needle: str, timeout: float = 15) -> str:
        def found() -> str | None:
            return next((line for line in self.lines() if needle in line), None)
        return wait_for(found, timeout, what=f"a stderr line with {needle!r}",
                        detail=self.stderr)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, self.stderr()


@pytest.fixture
def node(tmp_path: Path, redis_url: str, namespace: str, node_id: str) -> Iterator[Node]:
    runner = Node(tmp_path, redis_url, namespace, node_id)
    yield runner
    runner.close()


def text_records(lines: list[str]) -> list[tuple[str, str, str]]:
    """``(level, logger, message)`` of each text log line (others are skipped)."""
    matches = [TEXT_LINE.match(line) for line in lines]
    return [(m[1], m[2], m[3]) for m in matches if m]


# -- --log-level --------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [("--log-level", "debug"), ("--debug",)])
def test_debug_shows_exq_fast_job_lines_and_not_other_libraries_debug(
    node: Node, enqueuer: Enqueuer, flags: tuple[str, ...]
) -> None:
    # Given a node started at debug (or with --debug, which implies it)
    process = node.start(*node.args("--queue", "a", *flags))
    node.wait_for_line("exq-fast node")

    # When a job runs
    jid = enqueuer.enqueue("a", "LogCli.Ok", [1])
    node.wait_for_line(f"done LogCli.Ok jid={jid}")
    node.stop(process)

    # Then exq_fast.job logged its start and its end, at DEBUG
    records = text_records(node.lines())
    assert ("DEBUG", "exq_fast.job", f"start LogCli.Ok jid={jid}") in records, node.stderr()
    assert any(r[:2] == ("DEBUG", "exq_fast.job") and r[2].startswith(f"done LogCli.Ok jid={jid}")
               for r in records)
    # And another library's logger logs its warnings, not its debug lines
    assert ("WARNING", "redis.probe", "probe warning line") in records
    assert "probe debug line" not in node.stderr()
    assert not [r for r in records if r[0] == "DEBUG" and not r[1].startswith("exq_fast")]
    # And --debug does not turn a clean run into tracebacks
    assert "Traceback" not in node.stderr()


def test_info_is_the_default_and_has_no_job_lines(node: Node, enqueuer: Enqueuer) -> None:
    process = node.start(*node.args("--queue", "a"))
    node.wait_for_line("exq-fast node")
    jid = enqueuer.enqueue("a", "LogCli.Ok", [1])
    node.wait_for_line("order done")  # the job ran (its own warning line)
    node.stop(process)
    records = text_records(node.lines())
    assert any(r[:2] == ("INFO", "exq_fast") for r in records)
    assert not [r for r in records if r[0] == "DEBUG"], node.stderr()
    assert jid not in node.stderr()


def test_log_level_warning_shows_no_info_line(
    node: Node, redis_client: redis.Redis, keys: Keys, node_id: str
) -> None:
    # Given a node at warning that does not consume the Mail worker's queue
    process = node.start(*node.args("--queue", "a", "--log-level", "warning"))
    wait_for(lambda: redis_client.sismember(keys.processes, node_id), what="node registered",
             detail=node.stderr)
    node.wait_for_line("LogCli.Mail enqueues to queue 'mail'")
    node.stop(process)
    # Then its warnings are there and none of its INFO lines (start-up, stop)
    records = text_records(node.lines())
    assert records and all(level == "WARNING" for level, _, _ in records), node.stderr()
    assert "exq-fast node" not in node.stderr()
    assert "stopped (processed" not in node.stderr()


# -- --log-format json --------------------------------------------------------------------


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Every line, decoded: a line that is not a JSON object fails the test."""
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


def test_json_format_is_one_object_per_line_with_the_fields(
    node: Node, enqueuer: Enqueuer
) -> None:
    # Given a node logging JSON at debug
    process = node.start(*node.args("--queue", "a", "--log-format", "json",
                                    "--log-level", "debug"))
    node.wait_for_line("exq-fast node")

    # When a job succeeds and another fails
    ok = enqueuer.enqueue("a", "LogCli.Ok", [1])
    boom = enqueuer.enqueue("a", "LogCli.Boom", [2], max_retries=0)
    node.wait_for_line(f"done LogCli.Ok jid={ok}")
    node.wait_for_line(f"failed LogCli.Boom jid={boom}")
    node.stop(process)

    # Then every stderr line is a JSON object with ts (ISO 8601 UTC), level, logger, message
    records = json_lines(node.lines())
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), record
    levels = {(r["level"], r["logger"]) for r in records}
    assert {("INFO", "exq_fast"), ("DEBUG", "exq_fast.job"), ("WARNING", "redis.probe")} <= levels
    # And the failing job's line carries the traceback in "exc"
    failed = next(r for r in records if r["message"].startswith(f"failed LogCli.Boom jid={boom}"))
    assert failed["level"] == "WARNING" and failed["logger"] == "exq_fast.job"
    assert "Traceback" in failed["exc"] and "RuntimeError: boom (2,)" in failed["exc"], failed
    # And the fields given with extra= are there
    done = next(r for r in records if r["message"] == "order done")
    assert done["order_id"] == 42 and done["logger"] == "myapp"
    assert "exc" not in done


def test_json_formatter_fields_exc_and_extras() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logging.LogRecord("exq_fast", logging.ERROR, __file__, 1, "n=%d", (3,),
                                   sys.exc_info())
    record.__dict__.update(queue="mail", level="not the level", when=object())
    out = json.loads(formatter.format(record))
    assert out["message"] == "n=3" and out["level"] == "ERROR" and out["logger"] == "exq_fast"
    assert out["ts"].endswith("Z")
    assert "ValueError: bad value" in out["exc"]
    assert out["queue"] == "mail"  # an extra
    assert out["when"].startswith("<object object")  # not JSON: its str
    plain = json.loads(formatter.format(logging.LogRecord("x", logging.INFO, "", 0, "hi", None,
                                                          None)))
    assert set(plain) == {"ts", "level", "logger", "message"}


def test_setup_logging_levels_exq_fast_only_and_can_be_called_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, ours = logging.getLogger(), logging.getLogger("exq_fast")
    saved = (root.level, list(root.handlers), ours.level)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        setup_logging("debug", "text")
        handler = setup_logging("debug", "json")  # replaces the first one
        assert [h for h in root.handlers if h not in saved[1]] == [handler]
        logging.getLogger("exq_fast.job").debug("mine")
        logging.getLogger("urllib3.x").debug("theirs")
        logging.getLogger("urllib3.x").warning("their warning")
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        ours.setLevel(saved[2])
    messages = [json.loads(line)["message"] for line in stderr.getvalue().splitlines()]
    assert messages == ["mine", "their warning"]
    with pytest.raises(ValueError, match="log level"):
        setup_logging("verbose")


# -- unknown EXQ_* variables --------------------------------------------------------------


def test_an_unknown_exq_variable_is_warned_with_the_closest_name(node: Node) -> None:
    # Given EXQ_QUEUE (no S) and a name close to nothing in the environment
    process = node.start(*node.args("--queue", "a"), env={"EXQ_QUEUE": "x", "EXQ_ZZZ": "1"})
    node.wait_for_line("exq-fast node")
    node.stop(process)
    # Then each is warned about once, on the exq_fast logger, before the node starts
    records = text_records(node.lines())
    assert records.count(("WARNING", "exq_fast", "unknown environment variable EXQ_QUEUE "
                                                 "(did you mean EXQ_QUEUES?)")) == 1, node.stderr()
    assert records.count(("WARNING", "exq_fast", "unknown environment variable EXQ_ZZZ")) == 1
    messages = [r[2] for r in records]
    assert messages.index("unknown environment variable EXQ_ZZZ") < next(
        i for i, m in enumerate(messages) if m.startswith("exq-fast node"))


def test_unknown_variables_are_warned_once_and_known_ones_never(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(config_module, "_warned", set())
    monkeypatch.setattr(config_module, "ENV_READ_ELSEWHERE", frozenset({"EXQ_BENCH_SIZE"}))
    env = {"EXQ_NAMESPAC": "app", "EXQ_QUEUES": "a", "EXQ_JOB_TIMEOUT": "5",
           "EXQ_BENCH_SIZE": "9", "REDIS_URL": "redis://h:1/0", "EXQ": "1"}
    caplog.set_level(logging.WARNING, logger="exq_fast")
    for _ in range(2):
        config = Config.from_env(env)
    assert config.namespace == "exq" and config.queue_names == ["a"]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("exq_fast", "unknown environment variable EXQ_NAMESPAC (did you mean EXQ_NAMESPACE?)")]


# -- run without a worker -----------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_run_without_a_worker_refuses_in_one_line_and_starts_nothing(
    node: Node, redis_client: redis.Redis, namespace: str, processes: str
) -> None:
    # Given a module that registers no worker, or no --workers at all
    (node.tmp_path / "empty_jobs.py").write_text("VALUE = 1\n", encoding="utf-8")
    for extra in ((), ("--workers", "empty_jobs")):
        # When a node (or a supervisor of two) is started with nothing to run
        result = node.run(*node.args("--processes", processes, *extra, workers=False))
        # Then it exits 2 with one line saying what to do, and nothing reached Redis
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: no worker is registered: pass --workers MODULE")
        assert "@worker" in lines[0]
        assert redis_client.keys(f"{namespace}:*") == []


# -- the start-up lines -------------------------------------------------------------------


def test_start_up_lists_the_workers_per_queue_and_warns_of_an_unconsumed_queue(
    node: Node,
) -> None:
    # Given workers of queue "default" and one of queue "mail", and a node on default and b
    process = node.start(*node.args("--queue", "default:10,b"))
    node.wait_for_line("other workers")
    node.stop(process)
    # Then each consumed queue is listed with its workers, the others apart, and a warning
    records = text_records(node.lines())
    assert ("INFO", "exq_fast", "queue default (concurrency 10): LogCli.Boom, LogCli.Ok") \
        in records, node.stderr()
    assert ("INFO", "exq_fast", "queue b (concurrency 100): no worker of its own "
                                "(any worker runs here)") in records
    assert ("INFO", "exq_fast", "other workers (run on any queue): LogCli.Mail") in records
    assert ("WARNING", "exq_fast", "worker LogCli.Mail enqueues to queue 'mail', which this "
                                   "node does not consume") in records


def test_start_up_lines_without_an_unconsumed_queue(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    registry.register("App.Mail", lambda: None, queue="mail")
    registry.register("App.Any", lambda: None)  # registered without a queue of its own
    caplog.set_level(logging.INFO, logger="exq_fast")
    log_workers([QueueSpec("mail", None)], registry.specs())
    # (a worker without a queue of its own enqueues to "default": no warning for it)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "queue mail (concurrency unlimited): App.Mail"),
        ("INFO", "other workers (run on any queue): App.Any")]


# -- the supervisor -----------------------------------------------------------------------


def test_processes_pass_the_log_flags_to_their_children(
    node: Node, enqueuer: Enqueuer, node_id: str
) -> None:
    # Given a supervisor of two nodes logging JSON at debug
    process = node.start(*node.args("--queue", "a", "--processes", "2",
                                    "--log-format", "json", "--log-level", "debug"))
    node.wait_for_line(f"exq-fast node {node_id}.1 consuming")
    node.wait_for_line(f"exq-fast node {node_id}.2 consuming")
    # When a job runs on one of them
    jid = enqueuer.enqueue("a", "LogCli.Ok", [1])
    node.wait_for_line(f"done LogCli.Ok jid={jid}")
    node.stop(process)
    # Then every line, the supervisor's and the children's, is JSON, at debug for exq_fast
    records = json_lines(node.lines())
    messages = [r["message"] for r in records]
    assert any(m.startswith("supervisor: running 2 nodes") for m in messages)
    assert any(r["level"] == "DEBUG" and r["message"] == f"start LogCli.Ok jid={jid}"
               for r in records)
    assert "probe debug line" not in messages
