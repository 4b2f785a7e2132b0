"""Middleware: the pipeline type and the built-in chain.

Default order, Exq's plus Snooze (which must stand before Unique):
Stats, Job, Manager, Snooze, Unique, Logger.
"""

from __future__ import annotations

from .base import Middleware, Pipeline, Services, SlotManager
from .job import JobMiddleware
from .logger import LoggerMiddleware
from .manager import ManagerMiddleware
from .snooze import Snooze, SnoozeMiddleware
from .stats import StatsMiddleware
from .unique import UniqueMiddleware

__all__ = [
    "JobMiddleware",
    "LoggerMiddleware",
    "ManagerMiddleware",
    "Middleware",
    "Pipeline",
    "Services",
    "SlotManager",
    "Snooze",
    "SnoozeMiddleware",
    "StatsMiddleware",
    "UniqueMiddleware",
    "default_chain",
]


def default_chain() -> list[Middleware]:
    """A new instance of the default middleware chain."""
    return [
        StatsMiddleware(),
        JobMiddleware(),
        ManagerMiddleware(),
        SnoozeMiddleware(),
        UniqueMiddleware(),
        LoggerMiddleware(),
    ]
