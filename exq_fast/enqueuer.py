"""``Enqueuer``: the client API, writing the exact bytes Exq's enqueuer writes.

A job enqueued here has Exq's six fields in alphabetical order (``args``,
``class``, ``enqueued_at``, ``jid``, ``queue``, ``retry``), plus the four unique
fields when ``unique_for`` is given; timestamps are float seconds. Scheduled
jobs carry the scheduled time as ``enqueued_at``, as Exq 0.14+ does.

Unique tokens: the caller's ``unique_token``, or else Exq's own token
(base64 of SHA-256 of ``queue:class:phash2(arg)...``), reproduced bit for bit
so that Python and Elixir producers share locks.

Two exq-fast options are written as fields of their own when given:
``timeout`` (seconds this job may run) and ``backtrace`` (Sidekiq's field:
keep the failure's backtrace in the retry/dead entry). Exq ignores both.

Times: a ``datetime`` with a time zone is that instant; a naive one is local
time, as ``datetime.timestamp()`` reads it (Python's convention); numbers are
Unix seconds. Delays are seconds or a ``timedelta``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import redis

from . import scripts
from ._phash2 import unique_token as exq_unique_token
from .config import Config, check_timeout
from .connection import connect
from .job import encode, new_jid, now_seconds, strip_elixir
from .keys import Keys
from .registry import check_backtrace
from .store.enqueue import Conflict, EnqueueResult, Push, PushCombiner, push_all

if TYPE_CHECKING:
    from typing_extensions import Unpack

_UNIQUE_UNTIL = ("success", "start", "expiry")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

__all__ = ["Conflict", "EnqueueOptions", "EnqueueResult", "Enqueuer", "WorkerRef"]


class EnqueueOptions(TypedDict, total=False):
    """The keyword options of every enqueue call."""

    jid: str
    """The job id (default: 24 random hex digits)."""
    max_retries: int
    """The payload's ``retry`` (default: the config's ``max_retries``)."""
    unique_for: float
    """Seconds a unique lock is held (Exq's uniqueness); see ``unique_until``."""
    unique_until: Literal["success", "start", "expiry"]
    """When the lock is released: ``"success"`` (default), ``"start"`` or ``"expiry"``."""
    unique_token: str
    """The lock's token (default: Exq's token of queue, class and args)."""
    timeout: float
    """Seconds this job may run before it fails with ``JobTimeout``."""
    backtrace: bool | int
    """Keep the failure's backtrace in the retry/dead entry (True, or that many lines)."""


class HasJobClass(Protocol):
    """A registered Python worker: it carries the class name it is enqueued as."""

    exq_job_class: str


WorkerRef = str | HasJobClass | type[Any]
"""A worker class: the name stored in the payload, or a Python worker registered with
``@worker`` (the function object it returned, or the class)."""


def job_class_name(worker: WorkerRef) -> str:
    """The ``class`` field for ``worker``, with a leading ``Elixir.`` stripped."""
    if isinstance(worker, str):
        name = worker
    else:
        name = getattr(worker, "exq_job_class", None)  # type: ignore[assignment]
        if not isinstance(name, str):
            raise TypeError(f"{worker!r} is neither a class name nor a registered worker")
    if not name:
        raise ValueError("the worker class name is empty")
    return strip_elixir(name)


def to_timestamp(when: datetime | float) -> float:
    """Float seconds for a datetime (naive = local time, as ``datetime.timestamp()``)
    or a Unix time, to the microsecond."""
    if isinstance(when, datetime):
        aware = when if when.tzinfo else when.astimezone()  # local time, Python's rule
        return (aware - _EPOCH) // timedelta(microseconds=1) / 1_000_000
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
        raise ValueError(f"not a time: {when!r}")
    return float(when)


def to_delay(delay: timedelta | float) -> float:
    """Seconds of a delay given as seconds or a ``timedelta``; never negative."""
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else to_timestamp(delay)
    if seconds < 0:
        raise ValueError(f"a delay must not be negative, got {delay!r}")
    return seconds


class Enqueuer:
    """Thread-safe producer of jobs; one connection pool per instance. Calls made at
    the same time from several threads share round trips (see ``PushCombiner``)."""

    def __init__(self, config: Config | None = None, *, client: redis.Redis | None = None) -> None:
        self.config = config or Config()
        self.keys = Keys(self.config.namespace)
        self.redis = client if client is not None else connect(self.config)
        # Concurrent enqueue calls (a web app's request threads) share round trips.
        self._combiner = PushCombiner(self.redis, self.keys)
        self._scripts_loaded = False

    def close(self) -> None:
        """Release the connection pool."""
        self.redis.close()

    def __enter__(self) -> Enqueuer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(self, queue: str, worker_class: WorkerRef, args: Sequence[Any] = (),
                **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """Enqueue a job to run now. Returns its jid, or a ``Conflict``.

        Options (``EnqueueOptions``): ``jid``, ``max_retries``, ``unique_for``
        (seconds), ``unique_until`` (``"success"``, ``"start"``, ``"expiry"``),
        ``unique_token``, ``timeout`` (seconds), ``backtrace``.
        """
        return self._push(self.build(queue, worker_class, args, None, **options))

    def enqueue_at(self, queue: str, when: datetime | float, worker_class: WorkerRef,
                   args: Sequence[Any] = (), **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """Enqueue a job to run at ``when``: a datetime (naive = local time) or Unix seconds."""
        return self._push(self.build(queue, worker_class, args, to_timestamp(when), **options))

    def enqueue_in(self, queue: str, delay: timedelta | float, worker_class: WorkerRef,
                   args: Sequence[Any] = (), **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """Enqueue a job to run after ``delay`` (seconds or a ``timedelta``)."""
        at = now_seconds() + to_delay(delay)
        return self._push(self.build(queue, worker_class, args, at, **options))

    def enqueue_all(self, jobs: Iterable[Sequence[Any]]) -> list[EnqueueResult]:
        """Enqueue many jobs in one round trip, in order.

        Each item is ``(queue, worker_class, args)`` or ``(queue, worker_class,
        args, options)``; ``options`` takes the ``enqueue`` options plus ``at``
        (datetime or Unix seconds) or ``in`` (seconds) for a scheduled job.
        A conflict on one job does not stop the others.
        """
        pushes = [self._build_item(item) for item in jobs]
        self._ensure_scripts()
        return push_all(self.redis, self.keys, pushes)

    def _build_item(self, item: Sequence[Any]) -> Push:
        if len(item) not in (3, 4):
            raise ValueError(f"expected (queue, worker_class, args[, options]), got {item!r}")
        options: dict[str, Any] = dict(item[3]) if len(item) == 4 else {}
        at, after = options.pop("at", None), options.pop("in", None)
        if at is not None and after is not None:
            raise ValueError("give 'at' or 'in', not both")
        score = to_timestamp(at) if at is not None else None
        if after is not None:
            score = now_seconds() + to_delay(after)
        return self.build(item[0], item[1], item[2], score, **options)

    def build(self, queue: str, worker_class: WorkerRef, args: Sequence[Any],
              at: float | None, **options: Unpack[EnqueueOptions]) -> Push:
        """The bytes and lock of a job, without writing anything."""
        return _JobBuilder(self.config, options).build(queue, worker_class, args, at)

    def _push(self, job: Push) -> EnqueueResult:
        self._ensure_scripts()
        return self._combiner.push(job)

    def _ensure_scripts(self) -> None:
        if not self._scripts_loaded:
            scripts.load_all(self.redis)
            self._scripts_loaded = True


class _JobBuilder:
    """Turns enqueue arguments into a validated ``Push``."""

    _OPTIONS = frozenset(EnqueueOptions.__annotations__)

    def __init__(self, config: Config, options: Mapping[str, Any]) -> None:
        unknown = set(options) - self._OPTIONS
        if unknown:
            raise TypeError(f"unknown enqueue option(s): {', '.join(sorted(unknown))}")
        self.config = config
        self.options = options

    def build(self, queue: str, worker: WorkerRef, args: Sequence[Any], at: float | None) -> Push:
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty string, got {queue!r}")
        if isinstance(args, str | bytes | Mapping) or not isinstance(args, Sequence):
            raise TypeError(f"args must be a list, got {type(args).__name__}")
        now = now_seconds()
        enqueued_at = now if at is None else at
        job: dict[str, Any] = {
            "args": list(args),
            "class": job_class_name(worker),
            "enqueued_at": enqueued_at,
            "jid": self._jid(),
            "queue": queue,
            "retry": self._retry(),
        }
        self._extras(job)
        token = self._unique(job, enqueued_at)
        payload = _encode_job(job)
        lock = None if token is None else (
            token, max(math.trunc((job["unlocks_at"] - now) * 1000), 0))
        return Push(queue, payload, job["jid"], at, lock)

    def _jid(self) -> str:
        jid = self.options.get("jid")
        if jid is None:
            return new_jid()
        if not isinstance(jid, str) or not jid:
            raise ValueError(f"jid must be a non-empty string, got {jid!r}")
        return jid

    def _retry(self) -> int:
        retry = self.options.get("max_retries")
        if retry is None:
            return self.config.max_retries
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {retry!r}")
        return retry

    def _extras(self, job: dict[str, Any]) -> None:
        """exq-fast's own fields, added only when given (docs/wire-format.md §3.1)."""
        if "backtrace" in self.options:
            job["backtrace"] = check_backtrace(self.options["backtrace"])
        timeout = check_timeout(self.options.get("timeout"))
        if timeout is not None:
            job["timeout"] = timeout

    def _unique(self, job: dict[str, Any], enqueued_at: float) -> str | None:
        unique_for = self.options.get("unique_for")
        if unique_for is None:
            return None
        if isinstance(unique_for, bool) or not isinstance(unique_for, int | float) \
                or not unique_for > 0:
            raise ValueError(f"unique_for must be a positive number of seconds, got {unique_for!r}")
        until = self.options.get("unique_until", "success")
        if until not in _UNIQUE_UNTIL:
            raise ValueError(f"unique_until must be one of {_UNIQUE_UNTIL}, got {until!r}")
        token = self.options.get("unique_token")
        if token is None:
            token = exq_unique_token(job["queue"], job["class"], job["args"])
        job.update(unique_for=unique_for, unique_token=token, unique_until=until,
                   unlocks_at=enqueued_at + unique_for)
        return str(token)


def _encode_job(job: dict[str, Any]) -> bytes:
    try:
        # Top-level keys in alphabetical order, as Exq writes them; the
        # caller's own argument maps keep their order.
        return encode(dict(sorted(job.items())))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"job args are not JSON-encodable: {exc}") from None
