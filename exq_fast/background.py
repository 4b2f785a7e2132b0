"""Placeholder until the store branch lands (ErrorHook's one definition)."""

from __future__ import annotations

from collections.abc import Callable

ErrorHook = Callable[[str, BaseException], None]
"""Called with ``(operation, exception)`` when a Redis operation fails."""

RecoveredHook = Callable[[str, str, int], None]
"""Called with ``(queue, reason, count)`` when jobs of ``queue`` are moved back from a
backup list (reason ``startup``, ``subscribe``, ``heartbeat``) or buried as poison
(reason ``poison``)."""
