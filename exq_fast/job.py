"""The job record: decoding with simdjson, compact encoding, tolerant reading.

A job stays the exact bytes it was fetched as (``Job.raw``): acks remove those
bytes, and a job is re-encoded only when it changes (retry, dead, snooze). A
re-encoded job keeps every field of the original, unknown ones included, and
writes timestamps as JSON floats of seconds.

Decoding uses one ``simdjson.Parser`` per thread and converts the whole
document to plain Python in one C call (``as_dict``), then reads the fields
the worker needs: for a job's few fields and args that is several times
cheaper than reading them one by one through simdjson's lazy proxies.
pysimdjson forbids re-using a parser while proxies (``Object``, ``Array``) of
its last document are alive, so the document is dropped before ``decode``
returns or raises (a raised exception must not keep a frame that holds a
proxy).

Readers accept Exq 0.13.2, Exq 0.23 and Sidekiq payloads: ``retry`` as an int or
a bool, missing ``retry_count``, integer-millisecond timestamps (Sidekiq 8),
``Elixir.`` prefixes and Ruby ``::`` class names.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import simdjson

MILLIS_THRESHOLD = 1e11
"""A timestamp above this is integer epoch milliseconds (Sidekiq 8), not seconds."""

TIMESTAMP_FIELDS = ("enqueued_at", "created_at", "failed_at", "retried_at", "unlocks_at")

_local = threading.local()


class InvalidJob(ValueError):
    """A payload that cannot be a job; ``reason`` says what is wrong with it."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def _parser() -> Any:
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def now_seconds() -> float:
    """The current Unix time as float seconds with microsecond precision (as Exq)."""
    return time.time_ns() // 1000 / 1_000_000


def new_jid() -> str:
    """A new job id: a lowercase UUID4 with dashes, as Exq writes."""
    return str(uuid.uuid4())


def to_seconds(value: object) -> float | None:
    """A payload timestamp as float seconds: accepts floats, ints and Sidekiq 8 millis
    (None for anything else, infinity and NaN included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = value / 1000 if value > MILLIS_THRESHOLD else float(value)
    except OverflowError:  # an int too large for a float
        return None
    return seconds if math.isfinite(seconds) else None


def normalize_timestamps(data: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the known timestamp fields of a payload dict as float seconds (in place)."""
    for name in TIMESTAMP_FIELDS:
        seconds = to_seconds(data.get(name))
        if seconds is not None:
            data[name] = seconds
    return data


def strip_elixir(name: str) -> str:
    """What Exq stores for a class given at enqueue: one leading ``Elixir.`` removed."""
    return name[7:] if name.startswith("Elixir.") else name


def normalize_class(name: str) -> str:
    """The name a worker is resolved by, as Exq resolves it (docs/wire-format.md §3.4)."""
    name = strip_elixir(name).replace("::", ".")
    slash = name.find("/")
    return name if slash < 0 else name[:slash]


def encode(obj: object, *, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON, as Exq and Sidekiq write it (non-ASCII left raw)."""
    text = json.dumps(
        obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=sort_keys
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a "\ud800" escape in a payload, an undecodable file
        # name in an error message) has no UTF-8 form: escape everything, which
        # keeps it as the same JSON escape and the bytes valid UTF-8.
        return json.dumps(obj, separators=(",", ":"), allow_nan=False,
                          sort_keys=sort_keys).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes) -> Any:
    """Decode a whole JSON document to plain Python (simdjson, stdlib fallback)."""
    try:
        doc = _parse(raw)
    except UnicodeDecodeError:
        raise
    except ValueError:
        # simdjson refuses a few valid documents (integers beyond 64 bits):
        # the stdlib parser decides whether the payload is really invalid.
        return json.loads(raw, parse_constant=_reject_constant)
    if isinstance(doc, simdjson.Object):
        return doc.as_dict()
    if isinstance(doc, simdjson.Array):
        return doc.as_list()
    return doc


def loads_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` decoded when it is a JSON object, else None (not UTF-8, not JSON,
    nested too deeply, or another kind of value): for readers that only peek at a
    field of a member and must not fail on junk."""
    try:
        doc = loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return doc if isinstance(doc, dict) else None


def _parse(raw: bytes) -> Any:
    try:
        return (getattr(_local, "parser", None) or _parser()).parse(raw)
    except RuntimeError as exc:
        if "re-use a parser" not in str(exc):
            raise ValueError(str(exc)) from None  # e.g. BIGINT_ERROR: a document error
    # The thread's parser still has live proxies (a caller kept one): use a
    # fresh parser rather than fail the job.
    _local.parser = simdjson.Parser()
    try:
        return _local.parser.parse(raw)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


class Job:
    """One decoded job. ``raw`` holds the exact bytes it was read as."""

    __slots__ = (
        "args",
        "backtrace",
        "cancelled",
        "enqueued_at",
        "jid",
        "job_class",
        "queue",
        "raw",
        "retry",
        "retry_count",
        "timeout",
        "unique_token",
        "unique_until",
    )

    raw: bytes
    job_class: str
    jid: str | None
    queue: str | None
    retry: int | bool | None
    retry_count: int
    enqueued_at: float | None
    unique_until: str | None
    unique_token: str | None
    timeout: float | None
    """The payload's ``timeout``: seconds this job may run (exq-fast's field)."""
    backtrace: bool | int | None
    """The payload's ``backtrace`` (Sidekiq's field): keep the failure's backtrace."""
    cancelled: bool
    """Set when this job should stop -- a cancel signal named it, or its timeout
    passed: a cooperative job checks it and stops."""
    args: list[Any]
    """The positional arguments, as plain Python."""

    @property
    def worker_name(self) -> str:
        """The class name normalised for worker lookup (``Elixir.``, ``::``, ``/`` handled)."""
        return normalize_class(self.job_class)

    def to_dict(self) -> dict[str, Any]:
        """Every field of the payload, as plain Python, in the original order."""
        data = loads(self.raw)
        assert isinstance(data, dict)
        return data

    def reencode(self, changes: Mapping[str, Any],
                 edit: Callable[[dict[str, Any]], None] | None = None) -> bytes:
        """The payload with ``edit`` (given every field, to change in place) then
        ``changes`` applied, every other field kept.

        Known timestamps are rewritten as float seconds (Sidekiq 8 millis included).
        """
        data = normalize_timestamps(self.to_dict())
        if edit is not None:
            edit(data)
        data.update(changes)
        return encode(data)

    def __repr__(self) -> str:
        return f"<Job {self.job_class} jid={self.jid} queue={self.queue}>"


def decode(raw: bytes | str) -> Job:
    """Decode a payload: the whole document in one simdjson call, then its fields.

    Raises ``InvalidJob`` (never anything else) for bytes that are not UTF-8,
    not JSON, not an object, have no string ``class`` or no list ``args``.
    """
    try:
        data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    except UnicodeEncodeError:  # a str holding a lone surrogate
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else b""
        raise InvalidJob("payload is not valid UTF-8", data) from None
    result = _extract(data)
    if isinstance(result, str):
        raise InvalidJob(result, data)
    return result


def _extract(raw: bytes) -> Job | str:
    # One C call converts the document (as_dict keeps the last of duplicate
    # keys, as every JSON reader does): reading fields through simdjson's lazy
    # proxies instead costs more than converting a job's few fields and args.
    try:
        doc = _parse(raw)
    except UnicodeDecodeError:
        return "payload is not valid UTF-8"
    except ValueError:  # or a valid document simdjson refuses (a 65-bit integer)
        return _extract_fallback(raw)
    if not isinstance(doc, simdjson.Object):
        return f"payload is not a JSON object (got {_kind(doc)})"
    data = doc.as_dict()
    del doc  # release the parser before anything else can happen
    return _fields(raw, data)


def _extract_fallback(raw: bytes) -> Job | str:
    try:
        # Decode as UTF-8 first: json.loads(bytes) would accept UTF-16/32 too.
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return "payload is not valid UTF-8"
    except RecursionError:
        return "payload is not valid JSON: nested too deeply"
    except ValueError as error:
        # The stdlib's words say where (simdjson's are internal codes, T_ATOM_ERROR).
        return f"payload is not valid JSON: {error}"
    if not isinstance(data, dict):
        return f"payload is not a JSON object (got {_kind(data)})"
    return _fields(raw, data)


def _kind(value: object) -> str:
    if isinstance(value, simdjson.Array | list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return type(value).__name__


def _fields(raw: bytes, data: dict[str, Any]) -> Job | str:
    get = data.get
    job_class = get("class")
    if not isinstance(job_class, str) or not job_class:
        return "payload has no class" if job_class is None else "payload class is not a string"
    args = get("args")
    if type(args) is not list:
        return "payload has no args" if args is None else "payload args is not a list"
    job = Job()
    job.raw = raw
    job.job_class = job_class
    job.args = args
    jid = get("jid")
    job.jid = jid if type(jid) is str else None
    queue = get("queue")
    job.queue = queue if type(queue) is str else None
    retry = get("retry")
    job.retry = retry if isinstance(retry, int) else None
    count = get("retry_count")
    job.retry_count = 0 if count is None else _int_or_zero(count)
    enqueued_at = get("enqueued_at")
    job.enqueued_at = None if enqueued_at is None else to_seconds(enqueued_at)
    until = get("unique_until")
    job.unique_until = until if type(until) is str else None
    token = get("unique_token")
    job.unique_token = token if type(token) is str else None
    timeout = get("timeout")
    job.timeout = None if timeout is None else _positive_or_none(timeout)
    backtrace = get("backtrace")
    job.backtrace = None if backtrace is None else _backtrace(backtrace)
    job.cancelled = False
    return job


def _backtrace(value: object) -> bool | int | None:
    return value if isinstance(value, bool | int) and value >= 0 else None


def _positive_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) else None


def _int_or_zero(value: object) -> int:
    # A float that no int can hold (1e400 reads as infinity, NaN from a Python
    # writer) counts as junk, as a string would: 0, never OverflowError.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value) if isinstance(value, int) or math.isfinite(value) else 0
