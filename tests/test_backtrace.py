"""Failure backtraces: Sidekiq's ``error_backtrace`` in retry and dead entries, the
traceback in the failure log, and the CLI that shows them (docs/wire-format.md §3.5).

Outside-in: a real in-process node on the test Redis runs ``@worker`` jobs that
raise from nested helpers; what is asserted is the bytes it leaves in the retry
and dead sets (decoded as Sidekiq's Web UI decodes them: Base64, zlib inflate,
JSON), the log records, and what ``python -m exq_fast`` prints.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

import exq_fast
from exq_fast import Snooze
from exq_fast.app import Exq
from exq_fast.config import Config
from exq_fast.define import worker
from exq_fast.enqueuer import Enqueuer
from exq_fast.job import encode
from exq_fast.keys import Keys
from exq_fast.registry import Registry
from exq_fast.retry import (
    BACKTRACE_LINE_MAX,
    BACKTRACE_MAX_LINES,
    compress_backtrace,
    decode_backtrace,
)
from tests.conftest import NodeFactory, fixture_members, wait_for

QUEUE = "btq"
CLASS = "Bt.Nested"
HERE = os.path.abspath(__file__)
PACKAGE_DIR = os.path.dirname(os.path.abspath(exq_fast.__file__)) + os.sep


# -- the jobs --------------------------------------------------------------------------


def innermost_helper(tag: str) -> None:
    raise ValueError(f"nested failure {tag}")


def middle_helper(tag: str) -> None:
    innermost_helper(tag)


def nested_job(tag: str = "x") -> None:
    """The worker: its failure comes from two calls down."""
    middle_helper(tag)


RAISE_LINE = innermost_helper.__code__.co_firstlineno + 1
"""The line of the ``raise`` in ``innermost_helper``."""


def recursive_job(depth: int) -> None:
    """Recurses ``depth`` times, then raises: a traceback deeper than the cap."""
    if depth <= 0:
        raise RuntimeError("bottom")
    recursive_job(depth - 1)


_LONG_FILE = "/" + "very-long-directory-name/" * 30 + "job.py"
_long_ns: dict[str, Any] = {}
exec(compile("def long_named():\n    raise KeyError('long')\n", _LONG_FILE, "exec"), _long_ns)


def long_path_job() -> None:
    """Fails in a function whose file name is longer than a backtrace line may be."""
    _long_ns["long_named"]()


def snoozing_job() -> Snooze:
    return Snooze(60)


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def runtime(make_config: Callable[..., Config]) -> Iterator[NodeFactory]:
    factory = NodeFactory(make_config)
    yield factory
    factory.close()


def start_node(runtime: NodeFactory, target: Callable[..., Any], *, name: str = CLASS,
               backtrace: bool | int = False, **config: Any) -> Exq:
    """A started node running ``target`` registered with ``@worker(name, backtrace=...)``."""
    registry = Registry()
    worker(name, backtrace=backtrace, registry=registry)(target)
    config.setdefault("queues", [QUEUE])
    config.setdefault("scheduler_enable", False)  # retries stay in the retry set
    exq = Exq(runtime.config(**config), workers=registry)
    runtime.nodes.append(exq)  # stopped by the fixture
    return exq.start()


def enqueue(exq: Exq, job_class: str, args: list[Any], **options: Any) -> str:
    """Enqueue on the node's own connection; the jid."""
    jid = exq.enqueue(QUEUE, job_class, args, **options)
    assert isinstance(jid, str)
    return jid


def failure_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """Wait for the first ``failed ...`` log record and return it."""
    def find() -> logging.LogRecord | None:
        return next((r for r in caplog.records if r.getMessage().startswith("failed ")), None)

    record = wait_for(find, what="the failure's log record")
    assert record is not None
    return record


def sidekiq_lines(value: object) -> list[str]:
    """``error_backtrace`` decoded exactly as Sidekiq's Web UI does: Base64, zlib
    inflate, JSON; it must be a list of strings."""
    assert isinstance(value, str), f"error_backtrace is not Sidekiq's string: {value!r}"
    lines = json.loads(zlib.decompress(base64.b64decode(value)))
    assert isinstance(lines, list) and all(isinstance(line, str) for line in lines)
    return cast(list[str], lines)


def one_member(client: redis.Redis, key: str) -> tuple[bytes, dict[str, Any]]:
    """Wait for the zset ``key`` to hold one member; return its bytes and its JSON."""
    wait_for(lambda: client.zcard(key) >= 1, what=f"an entry in {key}")
    [member] = cast(list[bytes], client.zrange(key, 0, -1))
    return member, json.loads(member)


def retry_entry(client: redis.Redis, keys: Keys) -> tuple[bytes, dict[str, Any]]:
    return one_member(client, keys.retry)


def frame_line(function: str, line: int, file: str = HERE) -> str:
    return f"{file}:{line}:in `{function}'"


# -- what is written -------------------------------------------------------------------


def test_backtrace_true_writes_sidekiqs_compressed_lines_innermost_first(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a @worker(backtrace=True) whose failure comes from a nested helper
    exq = start_node(runtime, nested_job, backtrace=True)

    # When its job fails
    jid = enqueue(exq, CLASS, ["a"])
    member, entry = retry_entry(redis_client, keys)

    # Then the retry entry carries Sidekiq's error_backtrace: a string Sidekiq's Web
    # UI decodes to Ruby-style lines, innermost frame first, the job's own frames only
    assert entry["jid"] == jid and entry["error_class"] == "ValueError"
    lines = sidekiq_lines(entry["error_backtrace"])
    assert lines == [
        frame_line("innermost_helper", RAISE_LINE),
        frame_line("middle_helper", middle_helper.__code__.co_firstlineno + 1),
        frame_line("nested_job", nested_job.__code__.co_firstlineno + 2),
    ]
    assert not any(PACKAGE_DIR in line for line in lines)  # the dispatch is left out
    # ... as strict Base64 (no line breaks), appended after the fields already there
    assert "\n" not in entry["error_backtrace"]
    assert list(entry)[-1] == "error_backtrace"
    assert b"error_backtrace" in member
    # ... and exq-fast's own reader agrees
    assert decode_backtrace(entry["error_backtrace"]) == lines


def test_dead_entry_carries_the_backtrace_too(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a @worker(backtrace=True) job with no retries
    exq = start_node(runtime, nested_job, backtrace=True)
    exq.enqueue(QUEUE, CLASS, ["dead"], max_retries=0)

    # When it fails, then its dead entry has the lines
    _, entry = one_member(redis_client, keys.dead)
    assert sidekiq_lines(entry["error_backtrace"])[0] == frame_line("innermost_helper",
                                                                    RAISE_LINE)
    assert redis_client.zcard(keys.retry) == 0


def test_an_integer_option_keeps_exactly_that_many_innermost_lines(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    exq = start_node(runtime, nested_job, backtrace=2)
    exq.enqueue(QUEUE, CLASS, ["two"])
    _, entry = retry_entry(redis_client, keys)
    assert sidekiq_lines(entry["error_backtrace"]) == [
        frame_line("innermost_helper", RAISE_LINE),
        frame_line("middle_helper", middle_helper.__code__.co_firstlineno + 1),
    ]


def test_no_option_writes_no_backtrace(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    exq = start_node(runtime, nested_job)
    exq.enqueue(QUEUE, CLASS, ["none"])
    member, entry = retry_entry(redis_client, keys)
    assert entry["error_class"] == "ValueError"
    assert "error_backtrace" not in entry and b"error_backtrace" not in member


@pytest.mark.parametrize(("worker_option", "payload_option", "expected"), [
    (True, 1, 1),        # the payload's count wins over the worker's True
    (True, False, 0),    # the payload turns it off
    (False, True, 3),    # the payload turns it on for a worker without it
    (2, None, 2),        # no payload field: the worker's option
])
def test_the_payloads_backtrace_field_takes_precedence_over_the_workers_option(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer,
    worker_option: bool | int, payload_option: bool | int | None, expected: int,
) -> None:
    # Given a worker with one option and a job enqueued with another (or none)
    start_node(runtime, nested_job, backtrace=worker_option)
    if payload_option is None:
        enqueuer.enqueue(QUEUE, CLASS, ["p"])
    else:
        enqueuer.enqueue(QUEUE, CLASS, ["p"], backtrace=payload_option)

    # When it fails, then the entry has as many lines as the payload says
    _, entry = retry_entry(redis_client, keys)
    if expected == 0:
        assert "error_backtrace" not in entry
    else:
        lines = sidekiq_lines(entry["error_backtrace"])
        assert len(lines) == expected
        assert lines[0] == frame_line("innermost_helper", RAISE_LINE)


def test_a_deep_traceback_is_capped_at_50_lines(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a job that recurses 80 times before it raises, asking for every line
    exq = start_node(runtime, recursive_job, name="Bt.Deep", backtrace=True)
    exq.enqueue(QUEUE, "Bt.Deep", [80])

    # Then only the 50 innermost lines are stored
    _, entry = retry_entry(redis_client, keys)
    lines = sidekiq_lines(entry["error_backtrace"])
    assert BACKTRACE_MAX_LINES == 50
    assert len(lines) == 50
    raise_line = recursive_job.__code__.co_firstlineno + 3
    recurse_line = recursive_job.__code__.co_firstlineno + 4
    assert lines[0] == frame_line("recursive_job", raise_line)
    assert lines[1:] == [frame_line("recursive_job", recurse_line)] * 49


def test_a_line_longer_than_500_characters_is_cut(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    exq = start_node(runtime, long_path_job, name="Bt.Long", backtrace=True)
    exq.enqueue(QUEUE, "Bt.Long", [])
    _, entry = retry_entry(redis_client, keys)
    lines = sidekiq_lines(entry["error_backtrace"])
    full = frame_line("long_named", 2, file=_LONG_FILE)
    assert len(full) > BACKTRACE_LINE_MAX == 500
    assert lines[0] == full[:500]
    assert lines[1] == frame_line("long_path_job",
                                  long_path_job.__code__.co_firstlineno + 2)


def test_a_retry_without_the_option_drops_a_stale_backtrace(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a job that failed before with a backtrace (stored in its payload), now
    # run by a worker that does not ask for one
    stale = compress_backtrace(["/old/code.rb:1:in `gone'"])
    payload = {"args": ["again"], "class": CLASS, "enqueued_at": time.time(),
               "error_backtrace": stale, "error_class": "OldError", "jid": "stale-jid",
               "queue": QUEUE, "retry": 5, "retry_count": 1}
    redis_client.lpush(keys.queue(QUEUE), encode(payload))
    start_node(runtime, nested_job)

    # When it fails again, then the old lines are gone, not left to describe this failure
    member, entry = retry_entry(redis_client, keys)
    assert entry["jid"] == "stale-jid" and entry["retry_count"] == 2
    assert entry["error_class"] == "ValueError"
    assert "error_backtrace" not in entry and b"error_backtrace" not in member


def test_a_retry_with_the_option_replaces_a_stale_backtrace_in_place(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    stale = compress_backtrace(["/old/code.rb:1:in `gone'"])
    payload = {"args": ["again"], "class": CLASS, "error_backtrace": stale, "jid": "j2",
               "queue": QUEUE, "retry": 5}
    redis_client.lpush(keys.queue(QUEUE), encode(payload))
    start_node(runtime, nested_job, backtrace=1)
    _, entry = retry_entry(redis_client, keys)
    assert sidekiq_lines(entry["error_backtrace"]) == [frame_line("innermost_helper",
                                                                  RAISE_LINE)]
    assert list(entry)[2] == "error_backtrace"  # an existing key keeps its place


def test_a_snooze_writes_no_backtrace(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    exq = start_node(runtime, snoozing_job, name="Bt.Snooze", backtrace=True)
    exq.enqueue(QUEUE, "Bt.Snooze", [])
    member, entry = retry_entry(redis_client, keys)
    assert entry["error_message"] == "Snoozed for 60 seconds"
    assert b"error_backtrace" not in member


def test_an_unknown_worker_gets_no_backtrace_even_when_the_payload_asks(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys, enqueuer: Enqueuer
) -> None:
    start_node(runtime, nested_job, backtrace=True)
    enqueuer.enqueue(QUEUE, "Bt.NoSuchWorker", [], backtrace=True)
    member, entry = retry_entry(redis_client, keys)
    assert entry["error_class"] == "UnknownWorker"
    assert b"error_backtrace" not in member


# -- the log ---------------------------------------------------------------------------


def test_a_failure_is_logged_at_warning_with_its_traceback(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given failure logging captured, and a job whose worker does NOT keep backtraces
    caplog.set_level(logging.WARNING, logger="exq_fast.job")
    exq = start_node(runtime, nested_job)

    # When it fails
    jid = enqueue(exq, CLASS, ["logged"])
    retry_entry(redis_client, keys)
    record = failure_record(caplog)

    # Then one WARNING from exq_fast.job gives the summary and the Python traceback
    assert record.name == "exq_fast.job" and record.levelno == logging.WARNING
    assert record.getMessage() == f"failed {CLASS} jid={jid}: nested failure logged"
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError
    assert isinstance(record.exc_info[1], ValueError)
    assert "Traceback (most recent call last)" in caplog.text
    assert f'File "{HERE}", line {RAISE_LINE}, in innermost_helper' in caplog.text


def test_an_unknown_worker_is_logged_as_one_line_without_a_traceback(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="exq_fast.job")
    exq = start_node(runtime, nested_job)
    jid = enqueue(exq, "Bt.NoSuchWorker", [])
    record = failure_record(caplog)
    assert record.name == "exq_fast.job" and record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"failed Bt.NoSuchWorker jid={jid}: unknown worker 'Bt.NoSuchWorker'")
    assert record.exc_info is None
    assert "Traceback" not in caplog.text


# -- the CLI ---------------------------------------------------------------------------


def cli(redis_url: str, namespace: str, *args: str) -> str:
    """``python -m exq_fast ARGS`` on the test Redis and namespace; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_") and k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "exq_fast", *args, "--redis-url", redis_url,
         "--namespace", namespace],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=30,
        check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def lines_after(output: str, jid: str) -> list[str]:
    """The indented lines right under the table row of ``jid``."""
    rows = output.splitlines()
    [index] = [i for i, row in enumerate(rows) if jid in row and not row.startswith(" ")]
    out = []
    for row in rows[index + 1:]:
        if not row.startswith("    "):
            break
        out.append(row[4:])
    return out


def test_cli_retries_and_dead_print_the_backtrace_under_each_job(
    runtime: NodeFactory, redis_client: redis.Redis, keys: Keys, redis_url: str,
    namespace: str,
) -> None:
    # Given a retry entry and a dead entry of a backtrace worker's jobs
    exq = start_node(runtime, nested_job, backtrace=True)
    retry_jid = enqueue(exq, CLASS, ["r"])
    dead_jid = enqueue(exq, CLASS, ["d"], max_retries=0)
    _, retried = retry_entry(redis_client, keys)
    _, died = one_member(redis_client, keys.dead)
    expected = sidekiq_lines(retried["error_backtrace"])
    assert expected[0] == frame_line("innermost_helper", RAISE_LINE)

    # When the sets are listed with --backtrace
    retries = cli(redis_url, namespace, "retries", "--backtrace")
    dead = cli(redis_url, namespace, "dead", "--backtrace")

    # Then each job's lines are printed, indented, under its row
    assert lines_after(retries, retry_jid) == expected
    assert lines_after(dead, dead_jid) == sidekiq_lines(died["error_backtrace"])
    # ... and not without the flag
    plain = cli(redis_url, namespace, "retries")
    assert lines_after(plain, retry_jid) == [] and "innermost_helper" not in plain
    # ... while --json has the field, decoded, and the stored payload
    [record] = json.loads(cli(redis_url, namespace, "retries", "--json"))
    assert record["error_backtrace"] == expected
    assert record["payload"]["error_backtrace"] == retried["error_backtrace"]


def test_cli_dead_backtrace_reads_sidekiqs_own_entries(
    redis_client: redis.Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    # Given Sidekiq 6.4.1's dead entry with backtrace: 5 (Base64 with line breaks)
    member, score = fixture_members("sidekiq-6.4.1/dead.jsonl")[1]
    assert b"error_backtrace" in member
    redis_client.zadd(keys.dead, {member: float(score)})

    # When the dead set is listed with --backtrace, then Sidekiq's 5 lines are shown
    lines = lines_after(cli(redis_url, namespace, "dead", "--backtrace"),
                        "bab9216d068845addf7720b4")
    assert len(lines) == 5
    assert lines[0] == "/app/workers.rb:36:in `perform'"
    assert lines[1].endswith("sidekiq/processor.rb:196:in `execute_job'")


def test_processes_shows_a_nodes_stuck_jobs(
    redis_client: redis.Redis, keys: Keys, redis_url: str, namespace: str
) -> None:
    # Given two registered nodes as the node pinger writes them, one with 2 stuck jobs
    now = time.time()
    for node, busy, stuck in (("n-stuck", 3, 2), ("n-fine", 1, 0)):
        info = {"busy": busy, "concurrency": 10, "embedded": False,
                "hostname": socket.gethostname(), "identity": node, "labels": [],
                "pid": 4242, "queues": [QUEUE], "quiet": False, "started_at": now,
                "stuck": stuck, "tag": "", "version": "test"}
        redis_client.sadd(keys.processes, node)
        redis_client.hset(keys.node(node), mapping={
            "info": json.dumps(info, separators=(",", ":")), "busy": str(busy),
            "beat": repr(now), "quiet": "false", "rss": "0", "rtt_us": "0"})
        redis_client.expire(keys.node(node), 60)

    # When the processes are listed
    table = cli(redis_url, namespace, "processes")
    data = json.loads(cli(redis_url, namespace, "processes", "--json"))

    # Then the stuck count shows next to the busy one, only where it is not zero
    rows = {row.split()[0]: row for row in table.splitlines() if row.startswith("n-")}
    assert re.search(r"\b3 \(2 stuck\)", rows["n-stuck"])
    assert "stuck" not in rows["n-fine"]
    assert re.match(r"n-fine\s+4242\s+1\s+no\b", rows["n-fine"])
    assert {n["identity"]: n["stuck"] for n in data["nodes"]} == {"n-stuck": 2, "n-fine": 0}
