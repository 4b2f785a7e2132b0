"""``exq-fast run``: a worker node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from .app import Exq
from .config import Config

logger = logging.getLogger("exq_fast")


def import_worker_modules(modules: Sequence[str]) -> None:
    """Import the modules the operator named, so their ``@worker`` registrations run."""
    for name in modules:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        importlib.import_module(name)


class _Status:
    """A one-line live status on a terminal: processed/s, failed, busy."""

    def __init__(self, exq: Exq) -> None:
        self.exq = exq
        self.last = (time.monotonic(), 0)

    def show(self) -> None:
        now, totals = time.monotonic(), self.exq.stats.totals
        then, before = self.last
        rate = (totals["processed"] - before) / max(now - then, 1e-9)
        self.last = (now, totals["processed"])
        line = (f"processed {totals['processed']} ({rate:,.0f}/s)  failed {totals['failed']}  "
                f"busy {self.exq.manager.busy()}  queues {','.join(self.exq.subscriptions())}")
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def run(config: Config, worker_modules: Sequence[str]) -> int:
    """Run a node until SIGTERM/SIGINT (or a TERM signal through Redis); 0 on a clean stop."""
    import_worker_modules(worker_modules)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exq = Exq(config).start()
    logger.info("exq-fast node %s consuming %s (namespace %r)", config.node_id,
                ", ".join(exq.subscriptions()), config.namespace)
    status = _Status(exq) if sys.stderr.isatty() else None
    while not (stop.wait(1.0) or exq.stopped.is_set()):
        if status is not None:
            status.show()
    if status is not None:
        status.clear()
    idle = exq.stop()
    logger.info("stopped (processed %d, failed %d)", exq.stats.totals["processed"],
                exq.stats.totals["failed"])
    if not idle:
        # Jobs that outlived shutdown_timeout stay in the backup list for the
        # next start; Python cannot stop their threads, so leave without them.
        logging.shutdown()
        os._exit(0)
    return 0
