"""``exq-fast run``: a worker node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from types import FrameType

from .app import Exq
from .config import Config, QueueSpec
from .registry import WorkerSpec

logger = logging.getLogger("exq_fast")


class WorkerModuleError(ValueError):
    """A ``--workers`` module could not be imported; the message says which and why."""


def import_worker_modules(modules: Sequence[str]) -> None:
    """Import the modules the operator named, so their ``@worker`` registrations run.

    A name is a module (``myapp.jobs``, found from the current directory too) or
    a file (``myapp/jobs.py``, imported by its stem with its folder on the
    path). Any failure is a ``WorkerModuleError`` naming the module and the
    cause (file and line for a syntax error).
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            _import_one(name)
        except WorkerModuleError:
            raise
        except SyntaxError as exc:
            raise WorkerModuleError(f"--workers {name}: syntax error in {exc.filename}, line "
                                    f"{exc.lineno}: {exc.msg}") from None
        except Exception as exc:
            raise WorkerModuleError(f"--workers {name}: cannot import it: "
                                    f"{type(exc).__name__}: {exc}{_where(exc)}") from None


def _where(exc: BaseException) -> str:
    """`` (file, line N)`` of the innermost frame of ``exc`` outside exq-fast and the
    import machinery: where the module failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "importlib" not in f.filename and os.sep + "exq_fast" + os.sep not in f.filename]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _import_one(name: str) -> None:
    if name.endswith(".py") or os.sep in name:
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise WorkerModuleError(f"--workers {name}: no such file")
        folder, stem = os.path.split(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        name = stem.removesuffix(".py")
    importlib.import_module(name)


class _Status:
    """A one-line live status on a terminal: processed/s, failed, busy."""

    def __init__(self, exq: Exq) -> None:
        self.exq = exq
        self.last = (time.monotonic(), 0)

    def show(self) -> None:
        now, totals = time.monotonic(), self.exq.acks.totals
        then, before = self.last
        rate = (totals["processed"] - before) / max(now - then, 1e-9)
        self.last = (now, totals["processed"])
        line = (f"processed {totals['processed']} ({rate:,.0f}/s)  failed {totals['failed']}  "
                f"busy {self.exq.fetcher.busy()}  queues {','.join(self.exq.subscriptions())}")
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def log_workers(queues: Sequence[QueueSpec], specs: Sequence[WorkerSpec]) -> None:
    """The start-up lines on the workers: per consumed queue, the workers whose own
    queue it is (``"default"`` when the worker names none); then the others (a node
    runs any worker on any queue it consumes); and a WARNING for each worker that
    names a queue of its own the node does not consume."""
    consumed = {queue.name for queue in queues}
    for queue in queues:
        names = [spec.name for spec in specs if (spec.queue or "default") == queue.name]
        concurrency = "unlimited" if queue.concurrency is None else queue.concurrency
        # "none" alone read as "nothing runs here": any registered worker does.
        logger.info("queue %s (concurrency %s): %s", queue.name, concurrency,
                    ", ".join(names) or "no worker of its own (any worker runs here)")
    others = [spec for spec in specs if (spec.queue or "default") not in consumed]
    if others:
        logger.info("other workers (run on any queue): %s",
                    ", ".join(spec.name for spec in others))
    for spec in others:
        if spec.queue is not None:
            logger.warning("worker %s enqueues to queue %r, which this node does not consume",
                           spec.name, spec.queue)


def _orphaned(supervisor_pid: int | None) -> bool:
    """True when this node was started by a supervisor that is gone (killed)."""
    return supervisor_pid is not None and os.getppid() != supervisor_pid


def run(config: Config, supervisor_pid: int | None = None) -> int:
    """Run a node until SIGTERM/SIGINT (or a TERM signal through Redis); 0 on a clean stop.

    The caller has imported the worker modules (``import_worker_modules``). A
    second SIGTERM/SIGINT during the graceful stop stops at once; SIGTSTP
    quiets the node (no more fetching), as Sidekiq's TSTP.
    """
    stop = threading.Event()
    exq = Exq(config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            exq.exit_now(name)
        logger.info("received %s: stopping gracefully (send it again to stop at once)", name)
        stop.set()

    def on_quiet(signum: int, frame: FrameType | None) -> None:
        logger.info("received SIGTSTP: quiet (no more fetching)")
        exq.unsubscribe_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTSTP, on_quiet)
    exq.start()  # refused (node id in use, Redis down): one error line, nothing else
    log_workers(config.queue_specs, exq.registry.specs())
    status = _Status(exq) if sys.stderr.isatty() else None
    while not (stop.wait(1.0) or exq.stopped.is_set()):
        if _orphaned(supervisor_pid):
            logger.warning("the supervisor (pid %d) is gone: stopping", supervisor_pid)
            break
        if status is not None:
            status.show()
    if status is not None:
        status.clear()
    idle = exq.stop()
    logger.info("stopped (processed %d, failed %d)", exq.acks.totals["processed"],
                exq.acks.totals["failed"])
    if not idle:
        # Jobs that outlived shutdown_timeout stay in the backup list for the
        # next start; Python cannot stop their threads, so leave without them.
        logging.shutdown()
        os._exit(0)
    return 0
