"""Logging of the ``exq-fast`` command: ``--log-level`` and ``--log-format``.

``setup_logging(level, log_format)`` sends log records to stderr, as text
(``2024-05-01 12:00:00,123 INFO exq_fast: ...``) or as JSON, one object per
line. The level applies to the ``exq_fast`` loggers only (``exq_fast.job``
included): every other library (redis-py, urllib3, asyncio, ...) stays at
WARNING, so ``--log-level debug`` shows exq-fast's per-job lines without the
noise of the libraries under it.

A library does not configure logging: only the command calls ``setup_logging``.
Only the standard library is imported here.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "setup_logging"]

LEVELS = ("debug", "info", "warning", "error")
"""The values of ``--log-level``."""
FORMATS = ("text", "json")
"""The values of ``--log-format``."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OTHER_LIBRARIES_LEVEL = logging.WARNING
"""The level of every logger outside ``exq_fast`` (the root logger's)."""

_STANDARD_ATTRS = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message", "asctime",
     "taskName"})
"""A record's own attributes; any other one came from ``extra=``."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``; ``exc`` (the formatted traceback) when the record has exc_info;
    ``stack`` with stack_info; then the record's ``extra`` fields (values JSON
    cannot hold are written as their ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out.setdefault(key, value)  # an extra never hides a standard field
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (so a replaced stderr, such as a
    test's capture, is followed rather than kept after it is closed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_installed: list[logging.Handler] = []
"""The handler of the last ``setup_logging`` call (replaced by the next one)."""


def setup_logging(level: str = "info", log_format: str = "text") -> logging.Handler:
    """Log to stderr in ``log_format`` (``text`` or ``json``), with the ``exq_fast``
    loggers at ``level`` (``debug``, ``info``, ``warning`` or ``error``) and every
    other logger at WARNING. Calling it again replaces the previous set-up.
    Returns the handler, on the root logger."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
    _installed[:] = [handler]
    root.addHandler(handler)
    root.setLevel(OTHER_LIBRARIES_LEVEL)
    logging.getLogger("exq_fast").setLevel(level.upper())
    return handler
