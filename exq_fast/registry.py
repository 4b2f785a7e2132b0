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
Sidekiq); a function worker is called as is. Resolved callables are cached, so a
hit costs one dict lookup; failed lookups are not cached.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .job import normalize_class

__all__ = ["DEFAULT_REGISTRY", "Perform", "Registry", "UnknownWorker", "worker"]

Perform = Callable[..., Any]
"""What the runtime calls with the job's ``*args``."""

T = TypeVar("T", bound=Callable[..., Any])

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
        self._targets: dict[str, object] = {}
        self._performers: dict[str, Perform] = {}  # normalised name -> callable
        self._cache: dict[str, Perform] = {}  # raw class string -> callable
        self._lock = threading.Lock()
        for name, target in (workers or {}).items():
            self.register(name, target)

    def register(self, name: str, target: object) -> None:
        """Register ``target`` (a function, or a class with ``perform``) under ``name``.

        ``name`` is normalised as payloads are. Raises ``TypeError`` for any
        other target and ``ValueError`` when the name already has another target.
        """
        key = normalize_class(name)
        if not key:
            raise ValueError(f"empty worker name {name!r}")
        perform = _performer(target)
        with self._lock:
            current = self._targets.get(key, _MISSING)
            if current is target:
                return
            if current is not _MISSING:
                raise ValueError(f"worker {key!r} is already registered as {current!r}")
            self._targets[key] = target
            self._performers[key] = perform
            self._cache.clear()  # a raw name may have resolved through allowed_modules

    def resolve(self, job_class: str) -> Perform:
        """The callable running a job of ``job_class`` with ``*args``, or ``UnknownWorker``."""
        perform = self._cache.get(job_class)
        if perform is None:
            perform = self._resolve_uncached(job_class)
        return perform

    def names(self) -> list[str]:
        """The registered (normalised) names, sorted."""
        return sorted(self._targets)

    def __contains__(self, job_class: str) -> bool:
        """Whether ``job_class`` resolves (may import under ``allowed_modules``)."""
        try:
            self.resolve(job_class)
        except UnknownWorker:
            return False
        return True

    def _resolve_uncached(self, job_class: str) -> Perform:
        name = normalize_class(job_class)
        perform = self._performers.get(name)
        if perform is None:
            perform = self._performers[name] = self._find_in_modules(job_class, name)
        if len(self._cache) < RAW_CACHE_LIMIT:
            self._cache[job_class] = perform
        return perform

    def _find_in_modules(self, job_class: str, name: str) -> Perform:
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

    def _from_module(self, job_class: str, module: object, path: list[str]) -> Perform:
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
            return _class_performer(obj)
        if inspect.isfunction(obj) and len(path) == 1:
            return obj
        raise UnknownWorker(job_class, "not a function or a class with perform")

    def _defined_in_allowed(self, obj: object) -> bool:
        module = getattr(obj, "__module__", None)
        return isinstance(module, str) and any(_is_under(module, p) for p in self._allowed)


DEFAULT_REGISTRY = Registry()
"""The registry ``@worker`` uses when given none."""


def worker(name: str | None = None, *, registry: Registry | None = None) -> Callable[[T], T]:
    """Decorator registering a function, or a class with ``perform(self, *args)``.

    ``name`` defaults to ``module.qualname``; it is set as ``obj.exq_job_class``
    (as given) so that the object can be passed to ``Enqueuer.enqueue``. The
    object is registered in ``registry`` (default ``DEFAULT_REGISTRY``) and
    returned unchanged otherwise. Write ``@worker()``, not ``@worker``.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError("worker() takes a name string: write @worker(), not @worker")

    def decorate(obj: T) -> T:
        job_class = name if name is not None else f"{obj.__module__}.{obj.__qualname__}"
        target = registry if registry is not None else DEFAULT_REGISTRY
        target.register(job_class, obj)
        obj.exq_job_class = job_class  # type: ignore[attr-defined]
        return obj

    return decorate
