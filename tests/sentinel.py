"""A real Sentinel setup on loopback ports: a master, a replica, three sentinels.

The sentinels are ``redis-sentinel`` (Debian's package) when it is on PATH, else
``redis-server --sentinel`` (the same program in sentinel mode), so the tests run
wherever ``redis-server`` does. Failover is quick: a master is judged down after
1 s without answers, by 2 of the 3 sentinels.

With ``tls=True`` every process listens on TLS only (``port 0``), with a server
certificate for 127.0.0.1 signed by a throwaway CA (``SentinelSetup.tls.ca``,
made by the TLS tests' helper); the replica replicates and the sentinels watch
the master and greet each other over TLS (``tls-replication yes``). No client
certificate is asked for (``tls-auth-clients no``). ``TlsUnavailable`` says
why a machine cannot run it (no openssl nor cryptography, a redis-server built
without TLS).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from exq_fast.embedded import RedisServer, free_port, server_binary
from tests.test_security import TlsFiles, make_tls_with_cryptography, make_tls_with_openssl

SERVICE = "exqmaster"
DOWN_AFTER_MS = 1000


class TlsUnavailable(RuntimeError):
    """This machine cannot run the TLS setup; the message says why."""


class SentinelSetup:
    """Start with ``start()``, stop everything with ``stop()``."""

    def __init__(self, password: str | None = None,
                 sentinel_password: str | None = None, tls: bool = False) -> None:
        """``password``: the master's and replica's; ``sentinel_password``: the
        sentinels' own (each then uses it with the others); ``tls``: every process
        on TLS only (raises ``TlsUnavailable`` when no CA can be made)."""
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        self.password = password
        self.sentinel_password = sentinel_password
        self.dir = Path(tempfile.mkdtemp(prefix="exq-fast-sentinel-"))
        self.tls: TlsFiles | None = None
        if tls:
            try:
                self.tls = _make_tls(self.dir)
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            self.master: RedisServer = TlsRedisServer(self.tls, auth)
            self.replica: RedisServer = TlsRedisServer(self.tls, auth)
        else:
            self.master = RedisServer(extra_args=auth)
            self.replica = RedisServer(extra_args=auth)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL naming the three sentinels and the service
        (``rediss+sentinel://`` with TLS)."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{SERVICE}/0"

    def client(self, port: int, password: str | None = None, timeout: float = 1.0,
               decode_responses: bool = False) -> redis.Redis:
        """A plain client of the process on ``port`` (over TLS, verified against
        the CA, in TLS mode)."""
        return _client(port, password, self.tls, timeout, decode_responses)

    def start(self) -> SentinelSetup:
        """Master, replica (in sync), sentinels (each aware of the others); on any
        failure, stop what was started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelSetup:
        self.master.start()
        self.replica.extra_args += ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        _wait(lambda: self._info(self.replica.port, "replication", self.password)
              .get("master_link_status") == "up", "the replica to sync")
        for port in self.sentinel_ports:
            self.sentinels.append(self._start_sentinel(port))
        _wait(self._ready, "the sentinels to see the master, the replica and each other")
        return self

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        conf = self.dir / f"sentinel-{port}.conf"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.dir}",
                 f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2",
                 f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {SERVICE} 4000",
                 f"sentinel parallel-syncs {SERVICE} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}",
                      f"sentinel sentinel-pass {self.sentinel_password}"]
        if self.tls:
            lines[0] = f"tls-port {port}"
            lines += ["port 0", *(" ".join(pair) for pair in _tls_settings(self.tls))]
        conf.write_text("\n".join(lines) + "\n")
        binary = shutil.which("redis-sentinel")
        args = [binary, str(conf)] if binary else [server_binary() or "redis-server", str(conf),
                                                   "--sentinel"]
        with (self.dir / f"sentinel-{port}.log").open("wb") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _ready(self) -> bool:
        for port in self.sentinel_ports:
            state = self._ask(port, lambda client: client.sentinel_master(SERVICE),
                              self.sentinel_password)
            if not state or state.get("num-slaves", 0) < 1 \
                    or state.get("num-other-sentinels", 0) < 2:
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            found = self._ask(
                port, lambda client: client.sentinel_get_master_addr_by_name(SERVICE),
                self.sentinel_password)
            if found:
                return int(found[1])
        return None

    def kill_master(self) -> None:
        """SIGKILL the master (a crash); the sentinels promote the replica."""
        self.master.kill()

    def wait_failover(self, timeout: float = 60.0) -> None:
        """Until the sentinels name the replica as master and it takes writes."""
        def promoted() -> bool:
            if self.master_port() != self.replica.port:
                return False
            return self._info(self.replica.port, "replication",
                              self.password).get("role") == "master"
        _wait(promoted, "the replica's promotion", timeout)

    def stop(self) -> None:
        """Stop every process and remove the files."""
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.replica.stop()
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


    def _ask(self, port: int, question: Callable[[redis.Redis], Any],
             password: str | None = None) -> Any:
        """``question(client)`` of the sentinel on ``port``; None when it does not
        answer."""
        client = self.client(port, password, decode_responses=True)
        try:
            return question(client)
        except (redis.exceptions.RedisError, OSError):
            return None
        finally:
            client.close()

    def _info(self, port: int, section: str,
              password: str | None = None) -> dict[str, object]:
        client = self.client(port, password, decode_responses=True)
        try:
            info: dict[str, object] = client.info(section)
            return info
        except (redis.exceptions.RedisError, OSError):
            return {}
        finally:
            client.close()


class TlsRedisServer(RedisServer):
    """A ``RedisServer`` on TLS only: ``port`` is its TLS port (``port 0``)."""

    def __init__(self, files: TlsFiles, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(extra_args=extra_args)
        self.files = files

    @property
    def url(self) -> str:
        """``rediss://127.0.0.1:<port>/0``."""
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING over TLS; a server that
        exits at once raises ``TlsUnavailable`` with its output."""
        os.makedirs(self.dir, exist_ok=True)
        output = Path(self.dir) / "output.log"
        args = [self.binary, "--port", "0", "--tls-port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir,
                *(item for name, value in _tls_settings(self.files)
                  for item in (f"--{name}", value)),
                *self.extra_args]
        with output.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                said = output.read_text(errors="replace").strip()[-300:]
                self.stop()
                raise TlsUnavailable(f"{self.binary} cannot serve TLS: {said}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on TLS port {self.port} did not start")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        client = _client(self.port, None, self.files, 0.2, False)
        try:
            return bool(client.ping())
        except redis.exceptions.AuthenticationError:
            return True  # it answers: it wants the password
        except (redis.exceptions.RedisError, OSError):
            return False
        finally:
            client.close()


def _make_tls(directory: Path) -> TlsFiles:
    """The TLS tests' throwaway CA and 127.0.0.1 certificate, in ``directory/tls``."""
    target = directory / "tls"
    target.mkdir()
    if shutil.which("openssl"):
        return make_tls_with_openssl(target)
    try:
        return make_tls_with_cryptography(target)
    except ImportError:
        raise TlsUnavailable("neither the openssl command nor the cryptography package "
                             "is available") from None


def _tls_settings(files: TlsFiles) -> list[tuple[str, str]]:
    """The TLS settings of every process of a TLS setup (config file names)."""
    return [("tls-cert-file", str(files.server_cert)), ("tls-key-file", str(files.server_key)),
            ("tls-ca-cert-file", str(files.ca)), ("tls-auth-clients", "no"),
            ("tls-replication", "yes")]


def _client(port: int, password: str | None, tls: TlsFiles | None, timeout: float,
            decode_responses: bool) -> redis.Redis:
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl": True, "ssl_ca_certs": str(tls.ca),
                   "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return redis.Redis(host="127.0.0.1", port=port, password=password,
                       socket_timeout=timeout, socket_connect_timeout=timeout,
                       decode_responses=decode_responses, **options)


def _wait(condition: object, what: str, timeout: float = 30.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)
