"""``exq-fast run --processes N``: N full worker nodes under one supervisor.

One Python process runs one core's worth of jobs (the GIL). The supervisor
starts N children, each a complete ``exq-fast run`` node with its own node id
``<base>.<n>`` (``base``: ``--node-id``, else this supervisor's unique default
id), so a child that is restarted gets its own backup list back at start-up.

* A child that exits while the supervisor is not stopping is restarted after a
  backoff (1 s, doubling up to 30 s; back to 1 s once a child has run a minute),
  with the reason logged.
* SIGTERM / SIGINT are forwarded (a graceful stop; the second one forces it),
  and SIGTSTP (quiet). The supervisor exits when every child has exited:
  0 if all stopped cleanly.
* With ``--metrics-port`` the supervisor serves one ``/metrics`` for all:
  each child serves its own on a loopback port, and the supervisor merges
  them at scrape time, adding a ``node`` label (the child's id) to every
  sample so children are told apart and summed with ``sum by``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .config import Config
from .embedded import free_port
from .metrics import MetricsServer, serve_metrics

logger = logging.getLogger("exq_fast")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0
"""Seconds a child must run before its restart backoff starts again from 1 s."""
SCRAPE_TIMEOUT = 2.0
USAGE_ERROR = 2
"""The exit status of ``exq-fast`` for an error a restart cannot mend."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGTSTP)


def processes_value(text: str) -> int:
    """``--processes``: a positive integer, or ``auto`` (the number of CPUs)."""
    if text == "auto":
        return os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--processes must be a positive integer or 'auto', got {text!r}")
    return value


@dataclass
class Child:
    """One worker node process and its restart state."""

    index: int
    node_id: str
    metrics_port: int | None
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        """True while its process runs."""
        return self.process is not None and self.process.poll() is None


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Starts, watches, restarts and stops the children (see the module doc)."""

    def __init__(self, config: Config, count: int, child_args: Sequence[str]) -> None:
        self.config = config
        self.child_args = list(child_args)
        base = config.node_id
        self.children = [
            Child(n, f"{base}.{n}", free_port() if config.metrics_port is not None else None)
            for n in range(1, count + 1)]
        self.stopping = 0  # graceful stop signals received
        self.failed = False  # a child could not start: exit with USAGE_ERROR
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.metrics_server: MetricsServer | None = None

    # -- children -----------------------------------------------------------------

    def command(self, child: Child) -> list[str]:
        """The ``exq-fast run`` command line of ``child``."""
        args = [sys.executable, "-m", "exq_fast", "run", *self.child_args,
                "--node-id", child.node_id, "--supervisor-pid", str(os.getpid())]
        if child.metrics_port is not None:
            args += ["--metrics-port", str(child.metrics_port), "--metrics-addr", "127.0.0.1"]
        return args

    def spawn(self, child: Child) -> None:
        """Start ``child``'s process (it inherits stdout/stderr: one log stream).

        In a process group of its own: a Ctrl-C on the terminal reaches the
        supervisor only, which forwards it once (twice would force the stop).
        """
        child.process = subprocess.Popen(self.command(child), stdin=subprocess.DEVNULL,
                                         process_group=0)
        child.started = time.monotonic()
        child.restart_at = None
        logger.info("supervisor: started node %s (pid %d)", child.node_id, child.process.pid)

    def _reap(self, child: Child, now: float) -> None:
        process = child.process
        code = None if process is None else process.poll()
        if process is None or code is None:
            return
        child.process = None  # reaped: its exit is handled once
        child.exits.append(code)
        if code == USAGE_ERROR and not self.stopping:
            # A bad option, an unknown worker module, a node id in use: a restart
            # would fail the same way, so the whole supervisor stops.
            logger.error("supervisor: node %s could not start (status %d): stopping every node",
                         child.node_id, code)
            self.failed = True
            self.stopping += 1
            self.forward(signal.SIGTERM)
            return
        if self.stopping:
            logger.info("supervisor: node %s %s", child.node_id, _exit_reason(code))
            return
        if now - child.started >= STABLE_AFTER:
            child.backoff = FIRST_BACKOFF
        logger.warning("supervisor: node %s (pid %d) %s; restarting it in %.0f s",
                       child.node_id, process.pid, _exit_reason(code), child.backoff)
        child.restart_at = now + child.backoff
        child.backoff = min(child.backoff * 2, MAX_BACKOFF)

    def step(self) -> bool:
        """Reap and restart as due; True while any child runs or is due to restart."""
        now = time.monotonic()
        with self._lock:
            for child in self.children:
                self._reap(child, now)
                if (not self.stopping and child.restart_at is not None
                        and now >= child.restart_at):
                    self.spawn(child)
            if self.stopping:
                return any(child.alive for child in self.children)
            return True

    # -- signals ------------------------------------------------------------------

    def forward(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every running child."""
        for child in self.children:
            if child.alive and child.process is not None:
                child.process.send_signal(sig)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop (forwarded; a second one forces); SIGTSTP: quiet."""
        sig = signal.Signals(signum)
        if sig is signal.SIGTSTP:
            logger.info("supervisor: SIGTSTP: quieting every node")
        else:
            self.stopping += 1
            logger.info("supervisor: %s: %s every node", sig.name,
                        "stopping" if self.stopping == 1 else "forcing the stop of")
        self.forward(sig)
        self._wake.set()

    # -- running ------------------------------------------------------------------

    def run(self) -> int:
        """Run until every child has exited after a stop; 0 if all exited with 0."""
        for sig in FORWARDED:
            signal.signal(sig, self.on_signal)
        if self.config.metrics_port is not None:
            registry = CollectorRegistry(auto_describe=True)
            registry.register(ChildMetrics(self.children))
            self.metrics_server = serve_metrics(registry, self.config)
            logger.info("supervisor: metrics of every node at %s", self.metrics_server.url)
        with self._lock:
            for child in self.children:
                self.spawn(child)
        try:
            while self.step():
                self._wake.wait(0.2)
                self._wake.clear()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
        clean = all(child.exits and child.exits[-1] == 0 for child in self.children)
        logger.info("supervisor: every node has stopped")
        if self.failed:
            return USAGE_ERROR
        return 0 if clean else 1


class ChildMetrics:
    """A collector that merges the children's ``/metrics``, labelled by node id."""

    def __init__(self, children: Sequence[Child]) -> None:
        self.children = children

    def collect(self) -> Iterator[Metric]:
        """One family per metric name, with every child's samples."""
        merged: dict[str, Metric] = {}
        for child in self.children:
            for family in self._scrape(child):
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type))
                target.samples += [
                    Sample(s.name, {**s.labels, "node": child.node_id}, s.value, s.timestamp,
                           s.exemplar) for s in family.samples]
        yield from merged.values()

    @staticmethod
    def _scrape(child: Child) -> list[Metric]:
        if child.metrics_port is None or not child.alive:
            return []
        url = f"http://127.0.0.1:{child.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
                body = response.read().decode("utf-8")
        except OSError:
            return []  # starting or restarting: its samples are missing from this scrape
        return list(text_string_to_metric_families(body))


def supervise(config: Config, count: int, child_args: Sequence[str]) -> int:
    """Entry point of ``exq-fast run --processes N`` (N > 1)."""
    logger.info("supervisor: running %d nodes %s.1 .. %s.%d (namespace %r)", count,
                config.node_id, config.node_id, count, config.namespace)
    return Supervisor(config, count, child_args).run()
