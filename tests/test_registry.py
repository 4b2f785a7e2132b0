"""The worker registry: names resolve as Exq resolves them, and payloads import nothing."""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exq_fast import registry as registry_module
from exq_fast.define import worker
from exq_fast.enqueuer import job_class_name
from exq_fast.registry import DEFAULT_REGISTRY, Registry, UnknownWorker

# --- helpers -----------------------------------------------------------------


def hard_worker(*args: Any) -> tuple[Any, ...]:
    return ("hard", *args)


class Counter:
    """A class worker whose state must never leak from one job to the next."""

    instances = 0

    def __init__(self) -> None:
        Counter.instances += 1
        self.seen: list[Any] = []

    def perform(self, *args: Any) -> int:
        self.seen.append(args)
        return len(self.seen)


JOBS_PY = """
    import os
    from json import dumps
    from os import system
    from subprocess import Popen

    NOT_CALLABLE = 42


    def send_email(to, subject):
        return f"sent {subject} to {to}"


    def _hidden():
        return "hidden"


    class Resize:
        def __init__(self):
            self.seen = []

        def perform(self, *args):
            self.seen.append(args)
            return len(self.seen)

        class Nested:
            def perform(self):
                return "nested"


    class NoPerform:
        pass
"""

PACKAGE = {
    "allowedpkg/__init__.py": "",
    "allowedpkg/jobs.py": JOBS_PY,
    "allowedpkg/reexport.py": "from allowedpkg.jobs import send_email\n",
    "allowedpkg/broken.py": "raise RuntimeError('boom at import')\n",
    "allowedpkg/needsmissing.py": "import exq_fast_no_such_module_xyz\n",
    "allowedpkg/__main__.py": "import sys\nsys.exq_fast_main_ran = True\n",
    "allowedpkgevil.py": "def run():\n    return 'evil'\n",
}
PACKAGE_MODULES = ("allowedpkg", "allowedpkgevil")


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``allowedpkg`` (with ``jobs``) and ``allowedpkgevil`` importable from ``tmp_path``."""
    for relpath, source in PACKAGE.items():
        path = tmp_path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGE_MODULES:
            del sys.modules[name]


def imported(prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in sys.modules)


def unimported_stdlib_module() -> str:
    for name in ("xml.dom.minidom", "wave", "tabnanny", "mailbox", "smtplib", "ftplib"):
        if name not in sys.modules:
            return name
    pytest.skip("every candidate stdlib module is already imported")


# --- registration and resolution ---------------------------------------------


def test_function_resolves_to_itself() -> None:
    reg = Registry()
    reg.register("MyApp.HardWorker", hard_worker)
    assert reg.resolve("MyApp.HardWorker") is hard_worker
    assert reg.resolve("MyApp.HardWorker")(1, "a") == ("hard", 1, "a")


@pytest.mark.parametrize("job_class", [
    "MyApp.HardWorker",
    "MyApp::HardWorker",
    "Elixir.MyApp.HardWorker",
    "MyApp.HardWorker/perform",
    "Elixir.MyApp::HardWorker/perform",
])
def test_exq_and_sidekiq_spellings_resolve_to_the_same_worker(job_class: str) -> None:
    reg = Registry({"MyApp.HardWorker": hard_worker})
    assert reg.resolve(job_class) is hard_worker
    assert job_class in reg


def test_registered_spelling_is_normalised_too() -> None:
    reg = Registry({"Elixir.MyApp::HardWorker": hard_worker})
    assert reg.names() == ["MyApp.HardWorker"]
    assert reg.resolve("MyApp.HardWorker") is hard_worker


def test_constructor_mapping_registers_every_worker() -> None:
    reg = Registry({"B.Worker": hard_worker, "A.Worker": Counter})
    assert reg.names() == ["A.Worker", "B.Worker"]
    assert reg.resolve("A.Worker")() == 1
    assert reg.resolve("B.Worker")(2) == ("hard", 2)


def test_class_gets_a_new_instance_per_job() -> None:
    reg = Registry({"Counter": Counter})
    perform = reg.resolve("Counter")
    before = Counter.instances
    assert [perform("x"), perform("y"), reg.resolve("Counter")("z")] == [1, 1, 1]
    assert Counter.instances == before + 3


def test_signature_mismatch_fails_at_call_time_not_at_resolve() -> None:
    def two_args(a: int, b: int) -> int:
        return a + b

    perform = Registry({"Two": two_args}).resolve("Two")
    with pytest.raises(TypeError):
        perform(1)


# --- errors ------------------------------------------------------------------


def test_unknown_worker_error() -> None:
    reg = Registry({"MyApp.HardWorker": hard_worker})
    with pytest.raises(UnknownWorker) as info:
        reg.resolve("MyApp.SoftWorker")
    assert isinstance(info.value, LookupError)
    assert info.value.job_class == "MyApp.SoftWorker"
    assert str(info.value) == "unknown worker 'MyApp.SoftWorker'"
    assert "MyApp.SoftWorker" not in reg
    assert "" not in reg


def test_duplicate_registration() -> None:
    reg = Registry({"MyApp.HardWorker": hard_worker})
    reg.register("MyApp.HardWorker", hard_worker)  # the same target again: a no-op
    reg.register("MyApp::HardWorker", hard_worker)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("MyApp.HardWorker", Counter)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("Elixir.MyApp::HardWorker", lambda: None)
    assert reg.resolve("MyApp.HardWorker") is hard_worker


class NoPerform:
    pass


class PerformNotCallable:
    perform = 3


@pytest.mark.parametrize("target", [42, "os.system", None, NoPerform, PerformNotCallable])
def test_non_worker_target_is_a_type_error(target: object) -> None:
    reg = Registry()
    with pytest.raises(TypeError):
        reg.register("Bad", target)
    assert reg.names() == []


def test_empty_name_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        Registry().register("/perform", hard_worker)


def test_bad_allowed_modules_are_refused() -> None:
    with pytest.raises(TypeError):
        Registry(allowed_modules="myapp.jobs")
    with pytest.raises(ValueError):
        Registry(allowed_modules=["myapp..jobs"])


# --- caching and threads -----------------------------------------------------


def test_resolution_is_cached() -> None:
    reg = Registry({"Counter": Counter})
    first = reg.resolve("Elixir.Counter")
    assert reg.resolve("Elixir.Counter") is first
    assert first() == reg.resolve("Elixir.Counter")() == 1


def test_registering_after_a_miss_works() -> None:
    reg = Registry()
    with pytest.raises(UnknownWorker):
        reg.resolve("Late::Worker")
    reg.register("Late.Worker", hard_worker)
    assert reg.resolve("Late::Worker") is hard_worker


def test_raw_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "RAW_CACHE_LIMIT", 3)
    reg = Registry({"W": hard_worker})
    for i in range(50):
        assert reg.resolve(f"W/junk{i}") is hard_worker
    assert len(reg._cache) <= 3


def test_concurrent_resolution() -> None:
    reg = Registry({"MyApp.HardWorker": hard_worker, "Counter": Counter})
    names = ["MyApp.HardWorker", "Elixir.MyApp::HardWorker", "Counter", "Counter/perform"]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        try:
            for _ in range(500):
                for name in names:
                    perform = reg.resolve(name)
                    assert perform(1) in (("hard", 1), 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- the decorator -----------------------------------------------------------


def test_decorator_on_a_function_with_a_name() -> None:
    reg = Registry()

    @worker("MyApp.Mailer", registry=reg)
    def mailer(to: str) -> str:
        return f"mail {to}"

    assert mailer.exq_job_class == "MyApp.Mailer"
    assert mailer("bob") == "mail bob"  # still callable as the function
    assert mailer.__name__ == "mailer"
    assert reg.resolve("Elixir.MyApp.Mailer") is mailer.fn
    assert job_class_name(mailer) == "MyApp.Mailer"


def test_decorator_on_a_class_with_a_name() -> None:
    reg = Registry()

    @worker("Elixir.MyApp.Resizer", registry=reg)
    class Resizer:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def perform(self, *args: Any) -> int:
            self.seen.append(args)
            return len(self.seen)

    assert Resizer.exq_job_class == "Elixir.MyApp.Resizer"  # type: ignore[attr-defined]
    assert isinstance(Resizer(), Resizer)
    assert reg.names() == ["MyApp.Resizer"]
    perform = reg.resolve("MyApp::Resizer")
    assert (perform(1), perform(2)) == (1, 1)
    assert job_class_name(Resizer) == "MyApp.Resizer"  # type: ignore[arg-type]


def test_decorator_default_name_and_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = Registry()
    monkeypatch.setattr(registry_module, "DEFAULT_REGISTRY", fresh)

    @worker()
    def job() -> str:
        return "done"

    @worker()
    class ClassJob:
        def perform(self) -> str:
            return "class done"

    job_name = f"{__name__}.test_decorator_default_name_and_default_registry.<locals>.job"
    assert job.exq_job_class == job_name
    assert ClassJob.exq_job_class == job_name.replace(".job", ".ClassJob")  # type: ignore[attr-defined]
    assert fresh.names() == sorted([job_name, job_name.replace(".job", ".ClassJob")])
    assert fresh.resolve(job_name)() == "done"
    assert fresh.resolve(ClassJob.exq_job_class)() == "class done"  # type: ignore[attr-defined]


def test_module_default_registry_exists() -> None:
    assert isinstance(DEFAULT_REGISTRY, Registry)


def test_decorator_refuses_bare_use_and_bad_targets() -> None:
    with pytest.raises(TypeError, match=r"@worker\(\)"):
        worker(hard_worker)  # type: ignore[arg-type]
    reg = Registry()
    with pytest.raises(TypeError):
        worker("X", registry=reg)(NoPerform)
    assert reg.names() == []
    assert not hasattr(NoPerform, "exq_job_class")


def test_decorator_duplicate_name() -> None:
    reg = Registry({"Taken": hard_worker})
    with pytest.raises(ValueError, match="already registered"):
        worker("Taken", registry=reg)(Counter)


# --- security ----------------------------------------------------------------

DANGEROUS = [
    "os.system",
    "builtins.eval",
    "subprocess.Popen",
    "posix.system",
    "Elixir.os.system",
    "os::system",
    "builtins.eval/perform",
    "importlib.import_module",
    "pickle.loads",
]


@pytest.mark.parametrize("job_class", DANGEROUS)
def test_dangerous_names_are_unknown(job_class: str) -> None:
    with pytest.raises(UnknownWorker):
        Registry({"MyApp.HardWorker": hard_worker}).resolve(job_class)


@pytest.mark.parametrize("job_class", DANGEROUS)
def test_dangerous_names_are_unknown_with_allowed_modules(pkg: Path, job_class: str) -> None:
    with pytest.raises(UnknownWorker):
        Registry(allowed_modules=["allowedpkg"]).resolve(job_class)


@pytest.mark.parametrize("allowed", [(), ("allowedpkg",), ("xml.dom.minidomx",)])
def test_unregistered_name_imports_nothing(allowed: tuple[str, ...]) -> None:
    module = unimported_stdlib_module()
    reg = Registry({"MyApp.HardWorker": hard_worker}, allowed_modules=allowed)
    for job_class in (f"{module}.parse", f"Elixir.{module.replace('.', '::')}::parse"):
        with pytest.raises(UnknownWorker):
            reg.resolve(job_class)
        assert job_class not in reg
    assert module not in sys.modules


# --- allowed_modules ---------------------------------------------------------


def test_allowed_module_function_and_class(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg.jobs"])
    assert reg.resolve("allowedpkg.jobs.send_email")("bob", "hi") == "sent hi to bob"
    perform = reg.resolve("Elixir.allowedpkg::jobs::Resize/perform")
    assert (perform("a"), perform("b")) == (1, 1)  # a new instance per job
    assert reg.resolve("allowedpkg.jobs.Resize.Nested")() == "nested"
    assert "allowedpkg.jobs.Resize" in reg
    assert reg.names() == []  # found, not registered


def test_allowed_prefix_covers_submodules(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg"])
    assert reg.resolve("allowedpkg.jobs.send_email")("a", "b") == "sent b to a"
    assert reg.resolve("allowedpkg.reexport.send_email")("a", "b") == "sent b to a"


def test_allowed_prefix_is_cut_at_a_module_boundary(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg"])
    with pytest.raises(UnknownWorker):
        reg.resolve("allowedpkgevil.run")
    assert "allowedpkgevil" not in sys.modules


def test_parent_of_allowed_prefix_is_not_allowed(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg.jobs"])
    for job_class in ("allowedpkg.reexport.send_email", "allowedpkg.something", "allowedpkg"):
        with pytest.raises(UnknownWorker):
            reg.resolve(job_class)
    assert not imported("allowedpkg")


@pytest.mark.parametrize("job_class", [
    "allowedpkg.jobs",  # a module
    "allowedpkg.jobs.os",  # a module imported by a job module
    "allowedpkg.jobs.os.system",  # through that module
    "allowedpkg.jobs.system",  # a builtin re-exported from os
    "allowedpkg.jobs.Popen",  # a class from subprocess
    "allowedpkg.jobs.dumps",  # a Python function from json
    "allowedpkg.jobs.NOT_CALLABLE",
    "allowedpkg.jobs.NoPerform",
    "allowedpkg.jobs.Resize.perform",  # a method, not a worker
    "allowedpkg.jobs.send_email.__globals__",
    "allowedpkg.jobs._hidden",
    "allowedpkg.jobs.Resize.__init__",
    "allowedpkg.jobs.missing",
    "allowedpkg.nosuchmodule.Worker",
    "allowedpkg.jobs..send_email",
    "allowedpkg.jobs.send-email",
])
def test_allowed_module_rejects_non_workers(pkg: Path, job_class: str) -> None:
    reg = Registry(allowed_modules=["allowedpkg"])
    with pytest.raises(UnknownWorker):
        reg.resolve(job_class)
    assert "allowedpkg.nosuchmodule" not in sys.modules


def test_private_modules_are_never_imported(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg"])
    for job_class in ("allowedpkg.__main__.x", "allowedpkg.__init__.x", "allowedpkg._x.y"):
        with pytest.raises(UnknownWorker):
            reg.resolve(job_class)
    assert "allowedpkg.__main__" not in sys.modules
    assert not hasattr(sys, "exq_fast_main_ran")


def test_import_errors_are_unknown_workers_with_the_reason(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg"])
    with pytest.raises(UnknownWorker, match="boom at import") as info:
        reg.resolve("allowedpkg.broken.Worker")
    assert info.value.job_class == "allowedpkg.broken.Worker"
    assert str(info.value).startswith("unknown worker 'allowedpkg.broken.Worker' (")
    with pytest.raises(UnknownWorker, match="exq_fast_no_such_module_xyz"):
        reg.resolve("allowedpkg.needsmissing.Worker")


def test_registered_names_win_over_allowed_modules(pkg: Path) -> None:
    reg = Registry({"allowedpkg.jobs.send_email": hard_worker}, allowed_modules=["allowedpkg"])
    assert reg.resolve("allowedpkg.jobs.send_email") is hard_worker


def test_registering_after_a_module_lookup_replaces_it(pkg: Path) -> None:
    reg = Registry(allowed_modules=["allowedpkg"])
    found = reg.resolve("allowedpkg.jobs.send_email")
    assert reg.resolve("allowedpkg.jobs.send_email") is found  # cached
    reg.register("allowedpkg.jobs.send_email", hard_worker)
    assert reg.resolve("allowedpkg.jobs.send_email") is hard_worker
