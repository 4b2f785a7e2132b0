"""Worker lookup: from a payload's ``class`` to the Python callable that runs it.

Security rule: a payload never causes an import, or reaches an object, outside
what was registered or allowed. The ``class`` of a job is data from Redis, which
any producer can write; it is never evaluated, unpickled or imported freely.
``os.system``, ``builtins.eval`` or ``subprocess.Popen`` named in a payload is an
unknown worker like any other unregistered name, and resolving it imports nothing.

A name is resolved, after ``normalize_class`` (``Elixir.`` stripped, ``::`` read
as ``.``, a ``/...`` suffix cut), in two places only:

1. the names registered with ``Registry.register`` or the ``@worker`` decorator;
2. when ``allowed_modules`` is given, the modules under those prefixes, at a
   module boundary (``myapp.jobs`` allows ``myapp.jobs.email`` but neither
   ``myapp.jobsevil`` nor ``myapp``). There the longest allowed module path of
   the name is imported and the rest is read with ``getattr``. Path segments
   below the prefix that start with ``_`` are refused (``__init__``,
   ``__main__``, ``__globals__``...), an attribute path goes through classes
   only (never through a module a job module happened to import), and the
   object found must be a Python function found directly on its module or a
   class with a callable ``perform``, defined (``__module__``) under an allowed
   prefix: ``from os import system`` in a job module does not make
   ``myapp.jobs.system`` a worker.

A class worker gets a new instance per job (``cls().perform(*args)``, as
Sidekiq); a function worker is called as is. Either may be ``async def``: the
worker server runs the coroutine it returns on the node's event loop. Resolved
callables are cached, so a hit costs one dict lookup; failed lookups are not
cached.

Each registered name carries a ``WorkerSpec``: the callable plus the worker's
options (its default queue, its timeout, whether failures keep a backtrace).
The ``@worker`` decorator that registers functions and classes is in
``exq_fast.define``.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import check_timeout
from .job import normalize_class

__all__ = ["DEFAULT_REGISTRY", "Perform", "Registry", "UnknownWorker", "WorkerSpec",
           "check_backtrace"]

Perform = Callable[..., Any]
"""What the runtime calls with the job's ``*args`` (a coroutine it returns is awaited)."""

RAW_CACHE_LIMIT = 4096
"""Raw ``class`` strings cached at most; ``/suffix`` variants are unbounded."""

_MISSING = object()


class UnknownWorker(LookupError):
    """The payload names no registered worker and no allowed module's callable."""

    def __init__(self, job_class: str, reason: str | None = None) -> None:
        message = f"unknown worker {job_class!r}"
        super().__init__(message if reason is None else f"{message} ({reason})")
        self.job_class = job_class
        self.reason = reason


def check_backtrace(value: object, option: str = "backtrace") -> bool | int:
    """Sidekiq's ``backtrace`` option: ``True`` (all lines), ``False``, or a line count."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"{option} must be True, False or a number of lines, got {value!r}")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """A worker as the runtime needs it: the callable and the worker's options."""

    name: str
    """The normalised class name jobs name it by."""
    perform: Perform
    target: object
    """What was registered (the function or the class)."""
    queue: str | None = None
    """The queue its jobs go to by default (``@worker(queue=)``); None = unspecified."""
    timeout: float | None = None
    """Seconds a job may run (None = the config's ``job_timeout``)."""
    backtrace: bool | int = False
    """Keep the failure's backtrace in the retry/dead entry: True, or that many lines."""
    is_async: bool = field(init=False, default=False)
    """Its perform is ``async def`` (its jobs start on the node's event loop side)."""

    def __post_init__(self) -> None:
        target = self.target
        perform = getattr(target, "perform", None) if isinstance(target, type) else target
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(perform))


def _class_performer(cls: type[Any]) -> Perform:
    def perform(*args: Any) -> Any:
        return cls().perform(*args)

    perform.__qualname__ = f"{cls.__qualname__}.perform"
    return perform


def _performer(target: object) -> Perform:
    """The callable for a registered target, or ``TypeError``."""
    if isinstance(target, type):
        if not callable(getattr(target, "perform", None)):
            raise TypeError(f"worker class {target.__qualname__} has no callable perform")
        return _class_performer(target)
    if not callable(target):
        raise TypeError(f"a worker is a function or a class with perform, not {target!r}")
    return target


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class Registry:
    """Maps job class names to callables; resolution is thread-safe."""

    def __init__(self, workers: Mapping[str, object] | None = None, *,
                 allowed_modules: Sequence[str] = ()) -> None:
        """Register ``workers`` (name -> target); ``allowed_modules`` are module prefixes."""
        if isinstance(allowed_modules, str):
            raise TypeError("allowed_modules is a sequence of module names, not a string")
        for prefix in allowed_modules:
            if not all(part.isidentifier() for part in prefix.split(".")):
                raise ValueError(f"not a module name: {prefix!r}")
        self._allowed = tuple(allowed_modules)
        self._specs: dict[str, WorkerSpec] = {}  # normalised name -> spec
        self._cache: dict[str, WorkerSpec] = {}  # raw class string -> spec
        self._lock = threading.Lock()
        self.has_async = False
        """Whether an ``async def`` worker is registered (then jobs are routed by it)."""
        for name, target in (workers or {}).items():
            self.register(name, target)

    def register(self, name: str, target: object, *, queue: str | None = None,
                 timeout: float | None = None, backtrace: bool | int = False) -> None:
        """Register ``target`` (a function, or a class with ``perform``) under ``name``.

        ``name`` is normalised as payloads are. ``queue`` is where the worker's
        jobs go by default, ``timeout`` its job time limit in seconds and
        ``backtrace`` Sidekiq's option (see ``WorkerSpec``). Raises ``TypeError``
        for any other target and ``ValueError`` for a bad option or when the name
        already has another target.
        """
        key = normalize_class(name)
        if not key:
            raise ValueError(f"empty worker name {name!r}")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise ValueError(f"queue must be a non-empty string, got {queue!r}")
        spec = WorkerSpec(key, _performer(target), target, queue, check_timeout(timeout),
                          check_backtrace(backtrace))
        with self._lock:
            current = self._specs.get(key)
            if current is not None and current.target is target:
                self._specs[key] = spec  # the same object registered again: new options
                self._cache.clear()
                self.has_async = self.has_async or spec.is_async
                return
            if current is not None:
                raise ValueError(f"worker {key!r} is already registered as {current.target!r}")
            self._specs[key] = spec
            self._cache.clear()  # a raw name may have resolved through allowed_modules
            self.has_async = self.has_async or spec.is_async

    def resolve(self, job_class: str) -> Perform:
        """The callable running a job of ``job_class`` with ``*args``, or ``UnknownWorker``."""
        return self.lookup(job_class).perform

    def lookup(self, job_class: str) -> WorkerSpec:
        """The ``WorkerSpec`` of a job of ``job_class``, or ``UnknownWorker``."""
        spec = self._cache.get(job_class)
        if spec is None:
            spec = self._resolve_uncached(job_class)
        return spec

    def is_async(self, job_class: str) -> bool:
        """Whether the worker of ``job_class`` is ``async def`` (False when none is)."""
        try:
            return self.lookup(job_class).is_async
        except UnknownWorker:
            return False

    def names(self) -> list[str]:
        """The registered (normalised) names, sorted."""
        return sorted(self._specs)

    def specs(self) -> list[WorkerSpec]:
        """The registered workers, sorted by name."""
        return [self._specs[name] for name in sorted(self._specs)]

    @property
    def allowed_modules(self) -> tuple[str, ...]:
        """The module prefixes whose callables are workers too."""
        return self._allowed

    def __contains__(self, job_class: str) -> bool:
        """Whether ``job_class`` resolves (may import under ``allowed_modules``)."""
        try:
            self.resolve(job_class)
        except UnknownWorker:
            return False
        return True

    def _resolve_uncached(self, job_class: str) -> WorkerSpec:
        name = normalize_class(job_class)
        spec = self._specs.get(name)
        if spec is None:
            target, perform = self._find_in_modules(job_class, name)
            spec = WorkerSpec(name, perform, target)
            # Cached under its raw name only: names() lists what was registered.
        if len(self._cache) < RAW_CACHE_LIMIT:
            self._cache[job_class] = spec
        return spec

    def _find_in_modules(self, job_class: str, name: str) -> tuple[object, Perform]:
        prefix = max((p for p in self._allowed if _is_under(name, p)), key=len, default=None)
        if prefix is None or name == prefix:
            raise UnknownWorker(job_class)
        rest = name[len(prefix) + 1:].split(".")
        if not all(part.isidentifier() and not part.startswith("_") for part in rest):
            raise UnknownWorker(job_class, "not a public dotted name")
        for cut in range(len(rest) - 1, -1, -1):
            module_name = ".".join([prefix, *rest[:cut]])
            module = self._import(job_class, module_name)
            if module is not None:
                return self._from_module(job_class, module, rest[cut:])
        raise UnknownWorker(job_class, f"no module {prefix!r}")

    @staticmethod
    def _import(job_class: str, module_name: str) -> object | None:
        """The module, ``None`` when it (or a parent) does not exist, or ``UnknownWorker``."""
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and _is_under(module_name, exc.name):
                return None
            raise UnknownWorker(job_class, f"cannot import {module_name}: {exc}") from exc
        except Exception as exc:
            reason = f"cannot import {module_name}: {type(exc).__name__}: {exc}"
            raise UnknownWorker(job_class, reason) from exc

    def _from_module(self, job_class: str, module: object,
                     path: list[str]) -> tuple[object, Perform]:
        obj = module
        for depth, attr in enumerate(path):
            if depth and not isinstance(obj, type):
                raise UnknownWorker(job_class, "attribute path goes through a non-class")
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                raise UnknownWorker(job_class, f"no attribute {attr!r}")
        if not self._defined_in_allowed(obj):
            raise UnknownWorker(job_class, "not defined in an allowed module")
        if isinstance(obj, type) and callable(getattr(obj, "perform", None)):
            return obj, _class_performer(obj)
        if inspect.isfunction(obj) and len(path) == 1:
            return obj, obj
        raise UnknownWorker(job_class, "not a function or a class with perform")

    def _defined_in_allowed(self, obj: object) -> bool:
        module = getattr(obj, "__module__", None)
        return isinstance(module, str) and any(_is_under(module, p) for p in self._allowed)


DEFAULT_REGISTRY = Registry()
"""The registry ``@worker`` uses when given none."""
