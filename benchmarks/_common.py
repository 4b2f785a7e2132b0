"""What the benchmark scripts share: server description, chunking, a process's RSS
and CPU time, and starting ``exq-fast run`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import redis

from exq_fast.embedded import delete_namespace

__all__ = ["CLOCK_TICKS", "chunks", "cpu_seconds", "delete_namespace", "describe_server",
           "exq_fast_command", "rss_mb", "wait_consuming", "worker_env"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second: the unit of ``/proc/<pid>/stat``'s CPU times."""


def chunks(n: int, size: int) -> Iterator[int]:
    """Sizes of the batches that make up ``n`` items, ``size`` at most each."""
    for start in range(0, n, size):
        yield min(size, n - start)


def describe_server(client: redis.Redis, url: str, private: bool) -> str:
    """Where the Redis is (host and port only, never credentials) and its version."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port}" if parts.hostname else url.split("?", 1)[0]
    version = client.info("server").get("redis_version", "?")
    kind = "private server started for this run" if private else "existing server"
    return f"Redis {version} at {where} ({kind})"


def rss_mb(pid: int | str = "self") -> float:
    """``VmRSS`` of process ``pid`` (default: this one) in MB; NaN if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``, all its threads
    (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after "pid (comm) ": state is field 3, utime 14 and stime 15 (man 5 proc);
    # comm may hold spaces or parentheses, hence the split after the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def exq_fast_command() -> list[str]:
    """The ``exq-fast`` console script of this interpreter, else ``python -m exq_fast``."""
    script = Path(sys.executable).parent / "exq-fast"
    return [str(script)] if script.exists() else [sys.executable, "-m", "exq_fast"]


def worker_env(*paths: Path | str) -> dict[str, str]:
    """This environment for a worker process: no inherited ``EXQ_*`` or ``REDIS_URL``
    (the command line says everything), and ``paths`` (where the benchmark's worker
    module is) first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_")}
    env.pop("REDIS_URL", None)
    inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *inherited])
    return env


def wait_consuming(workers: Sequence[tuple[subprocess.Popen[bytes], Path]],
                   timeout: float) -> None:
    """Wait until every worker (a process and the log its output goes to) has logged
    that it is consuming; ``RuntimeError`` with the logs when one exits or
    ``timeout`` seconds pass first (stopping them is the caller's)."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while True:
        pending = [(p, log) for p, log in pending
                   if " consuming " not in log.read_text(errors="replace")]
        if not pending:
            return
        exited = [(p, log) for p, log in pending if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise RuntimeError("\n".join(_not_ready(p, log, timeout)
                                         for p, log in exited or pending))
        time.sleep(0.05)


def _not_ready(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    why = (f"exited with {process.returncode}" if process.poll() is not None
           else f"not consuming after {timeout:.0f} s")
    return f"{log.stem}: {why}:\n{log.read_text(errors='replace')}"
