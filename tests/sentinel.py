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

import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from exq_fast.embedded import RedisServer, free_port, server_binary
from tests.conftest import wait_for
from tests.test_security import (
    TlsFiles,
    TlsRedisServer,
    make_tls,
    tls_settings,
)

SERVICE = "exqmaster"
DOWN_AFTER_MS = 1000


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
                (self.dir / "tls").mkdir()
                self.tls = make_tls(self.dir / "tls")
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
        wait_for(lambda: self._info(self.replica.port, "replication", self.password)
                 .get("master_link_status") == "up", 30, "the replica to sync", 0.1)
        for port in self.sentinel_ports:
            self.sentinels.append(self._start_sentinel(port))
        wait_for(self._ready, 30, "the sentinels to see the master, the replica and each other",
                 0.1)
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
            lines += ["port 0", *(" ".join(pair) for pair in tls_settings(self.tls))]
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
        wait_for(promoted, timeout, "the replica's promotion", 0.1)

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


def _client(port: int, password: str | None, tls: TlsFiles | None, timeout: float,
            decode_responses: bool) -> redis.Redis:
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl": True, "ssl_ca_certs": str(tls.ca),
                   "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return redis.Redis(host="127.0.0.1", port=port, password=password,
                       socket_timeout=timeout, socket_connect_timeout=timeout,
                       decode_responses=decode_responses, **options)

