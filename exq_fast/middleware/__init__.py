"""Middleware: the pipeline type and the optional built-in chain.

Default order: Snooze, Unique, Logger (Snooze must stand before Unique: a
snoozed job keeps its lock). Exq's Stats, Job and Manager middleware are not
middleware here: counting, decoding, the ack/retry/dead decision and the slot
are the worker's core (see ``worker``).
"""

from __future__ import annotations

from ..outcome import Outcome, Status
from .base import Middleware, Pipeline, Services
from .logger import LoggerMiddleware
from .snooze import Snooze, SnoozeMiddleware
from .unique import UniqueMiddleware

__all__ = [
    "LoggerMiddleware",
    "Middleware",
    "Outcome",
    "Pipeline",
    "Services",
    "Snooze",
    "SnoozeMiddleware",
    "Status",
    "UniqueMiddleware",
    "default_chain",
]


def default_chain() -> list[Middleware]:
    """A new instance of the default middleware chain."""
    return [SnoozeMiddleware(), UniqueMiddleware(), LoggerMiddleware()]
