"""``@worker``: define a worker, and enqueue its jobs with typed methods.

    @worker("MyApp.Add", queue="math", timeout=30)
    def add(a: int, b: int) -> int:
        return a + b

    add(1, 2)                                   # still a plain call: 3
    add.enqueue(1, 2)                           # a job on "math"
    add.enqueue_in(timedelta(minutes=5), 1, 2)  # or seconds
    add.enqueue_at(datetime(2030, 1, 1, tzinfo=UTC), 1, 2)
    add.set(queue="urgent", max_retries=3).enqueue(1, 2)
    exq.enqueue("math", add, [1, 2])            # the object stands for its class name

On a function, ``@worker`` returns a ``JobFunction``: callable as before, typed
with the function's own parameters, so ``mypy --strict`` checks the arguments
of ``add.enqueue(...)`` as it checks ``add(...)``. On a class (with
``perform(self, *args)``) it returns the class itself, marked with its job class
name, which every ``enqueue`` accepts.

Where ``add.enqueue`` writes: the connection given with ``set(via=...)`` (an
``Exq`` node or an ``Enqueuer``); else the ``Exq`` node this process started
last, while it runs; else an ``Enqueuer`` of ``Config.from_env()`` (``REDIS_URL``
and ``EXQ_*``), made at first use.

A job's arguments are positional (Exq and Sidekiq store a list): keyword
arguments given to ``enqueue`` are bound to the function's parameters and
written in their positional place; a keyword-only parameter cannot be enqueued.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from . import registry as _registry
from .config import Config
from .enqueuer import EnqueueOptions, Enqueuer, WorkerRef
from .registry import Registry
from .store.enqueue import EnqueueResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EnqueueTarget", "JobFunction", "set_default_target", "worker"]

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type[Any])

DEFAULT_QUEUE = "default"


class EnqueueTarget(Protocol):
    """Where jobs are written: an ``Exq`` node or an ``Enqueuer``."""

    def enqueue(self, queue: str, worker_class: WorkerRef, args: Sequence[Any] = (),
                **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """Enqueue now."""

    def enqueue_at(self, queue: str, when: datetime | float, worker_class: WorkerRef,
                   args: Sequence[Any] = (), **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """Enqueue at a time."""

    def enqueue_in(self, queue: str, delay: timedelta | float, worker_class: WorkerRef,
                   args: Sequence[Any] = (), **options: Unpack[EnqueueOptions]) -> EnqueueResult:
        """Enqueue after a delay."""


class _Defaults:
    """The process-wide target of ``JobFunction.enqueue`` without ``via``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.node: EnqueueTarget | None = None
        self.from_env: Enqueuer | None = None

    def target(self) -> EnqueueTarget:
        with self.lock:
            if self.node is not None:
                return self.node
            if self.from_env is None:
                self.from_env = Enqueuer(Config.from_env())
            return self.from_env


_DEFAULTS = _Defaults()


def set_default_target(target: EnqueueTarget | None, *, only_if: object = None) -> None:
    """Make ``target`` where ``JobFunction.enqueue`` writes without ``via`` (None: the
    ``Config.from_env()`` enqueuer). With ``only_if``, change it only while the
    current target is that object (a node that stops clears only itself)."""
    with _DEFAULTS.lock:
        if only_if is None or _DEFAULTS.node is only_if:
            _DEFAULTS.node = target


class JobFunction(Generic[P, R]):
    """A function registered as a worker; see the module doc."""

    def __init__(self, fn: Callable[P, R], job_class: str, queue: str,
                 options: EnqueueOptions, via: EnqueueTarget | None = None) -> None:
        self.fn = fn
        self.exq_job_class = job_class
        """The class name its jobs carry."""
        self.queue = queue
        """The queue ``enqueue`` writes to."""
        self.options = options
        self.via = via
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function itself, here and now."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<JobFunction {self.exq_job_class} queue={self.queue!r}>"

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> EnqueueResult:
        """Enqueue a job of this worker to run now. Returns its jid or a ``Conflict``."""
        target = self._target()
        return target.enqueue(self.queue, self.exq_job_class, self._args(args, kwargs),
                              **self.options)

    def enqueue_in(self, delay: timedelta | float, /, *args: P.args,
                   **kwargs: P.kwargs) -> EnqueueResult:
        """Enqueue a job to run after ``delay`` (seconds or a ``timedelta``)."""
        target = self._target()
        return target.enqueue_in(self.queue, delay, self.exq_job_class,
                                 self._args(args, kwargs), **self.options)

    def enqueue_at(self, when: datetime | float, /, *args: P.args,
                   **kwargs: P.kwargs) -> EnqueueResult:
        """Enqueue a job to run at ``when`` (a datetime, naive = local time, or Unix seconds)."""
        target = self._target()
        return target.enqueue_at(self.queue, when, self.exq_job_class,
                                 self._args(args, kwargs), **self.options)

    def set(self, *, queue: str | None = None, via: EnqueueTarget | None = None,
            **options: Unpack[EnqueueOptions]) -> JobFunction[P, R]:
        """A copy that enqueues with other options (Sidekiq's ``set``); nothing is
        registered again."""
        merged: EnqueueOptions = {**self.options, **options}
        return JobFunction(self.fn, self.exq_job_class, queue or self.queue, merged,
                           via if via is not None else self.via)

    def _target(self) -> EnqueueTarget:
        return self.via if self.via is not None else _DEFAULTS.target()

    def _args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The job's positional args, checked against the function's signature (a
        job that cannot be called is refused here, not retried 25 times); keywords
        are bound to their parameters."""
        bound = _signature(self.fn).bind(*args, **kwargs)
        if bound.kwargs:
            raise TypeError(f"{self.exq_job_class}: keyword-only arguments cannot be enqueued "
                            f"(job args are a list): {', '.join(bound.kwargs)}")
        return list(bound.args)


@functools.lru_cache(maxsize=1024)
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


class _Decorator(Protocol):
    @overload
    def __call__(self, obj: C) -> C: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, obj: Callable[P, R]) -> JobFunction[P, R]: ...


def worker(name: str | None = None, *, queue: str | None = None,
           timeout: float | None = None, backtrace: bool | int = False,
           max_retries: int | None = None, registry: Registry | None = None) -> _Decorator:
    """Register a function, or a class with ``perform(self, *args)``, as a worker.

    ``name`` is the class name its jobs carry (default ``module.qualname``);
    Exq/Sidekiq producers enqueue it under that name. ``queue`` is where its
    ``enqueue`` methods write (default ``"default"``; a node runs the worker on
    any queue it consumes, and warns at start when a worker's own queue is not
    one of them). ``timeout``: seconds a job may run before it fails with
    ``JobTimeout`` (None: the node's ``job_timeout``). ``backtrace``: keep the
    failure's backtrace in the retry/dead entry (True, or that many lines, as
    Sidekiq's option). ``max_retries``: the ``retry`` of the jobs its methods
    enqueue. ``registry`` defaults to ``DEFAULT_REGISTRY``. Functions may be
    ``async def`` (a class's ``perform`` too). Write ``@worker()``, not ``@worker``.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError("worker() takes a name string: write @worker(), not @worker")
    options: EnqueueOptions = {}
    if max_retries is not None:
        options["max_retries"] = max_retries

    def decorate(obj: Any) -> Any:
        job_class = name if name is not None else f"{obj.__module__}.{obj.__qualname__}"
        target = registry if registry is not None else _registry.DEFAULT_REGISTRY
        target.register(job_class, obj, queue=queue, timeout=timeout, backtrace=backtrace)
        if isinstance(obj, type):
            setattr(obj, "exq_job_class", job_class)  # noqa: B010 (a class, typed as such)
            return obj
        return JobFunction(obj, job_class, queue or DEFAULT_QUEUE, options)

    return decorate
