"""``exq-fast run``: a worker node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
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
    while not (stop.wait(0.2) or exq.stopped.is_set()):
        pass
    idle = exq.stop()
    logger.info("stopped (processed %d, failed %d)", exq.stats.totals["processed"],
                exq.stats.totals["failed"])
    if not idle:
        # Jobs that outlived shutdown_timeout stay in the backup list for the
        # next start; Python cannot stop their threads, so leave without them.
        logging.shutdown()
        os._exit(0)
    return 0
