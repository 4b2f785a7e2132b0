"""``TcpProxy``: a small threaded TCP proxy on 127.0.0.1 that can cut or slow a link.

    with TcpProxy("127.0.0.1", redis_port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        ...
        proxy.cut()            # close every connection; new ones are refused
        proxy.restore()        # accept and forward again (same port)
        proxy.delay(0.05)      # 50 ms before every chunk is forwarded, both ways
        proxy.swallow_replies()  # forward requests, drop every reply, until restore()

``cut(blackhole=True)`` accepts new connections but never forwards a byte on
them (a silent network) until ``restore()`` closes them. ``swallow_replies()``
forwards client->server bytes but drops server->client ones (the commands run,
their replies are lost), on open and new connections; ``restore()`` closes the
connections that lost a reply (their stream is out of step). The proxy stops by
itself after ``max_lifetime`` seconds, so a test that forgets it cannot leave
threads or ports behind; ``stop()`` is idempotent.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 65536
POLL = 0.1
"""Seconds a blocking socket call waits before the thread checks for stop."""


class _Link:
    """One proxied connection: the client socket, the upstream socket, two pumps."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._open_pumps = 2
        self._shut = False

    def shutdown(self) -> None:
        """Break both directions at once (the pumps see EOF/errors and exit)."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def pump_done(self) -> None:
        """Called by each pump as it exits; the last one closes both sockets."""
        self.shutdown()
        with self._lock:
            self._open_pumps -= 1
            last = self._open_pumps == 0
        if last:
            self.client.close()
            self.upstream.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream_host:upstream_port``. See the module doc."""

    def __init__(self, upstream_host: str, upstream_port: int, *,
                 max_lifetime: float = 300.0) -> None:
        if upstream_host not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault suite keeps all traffic on 127.0.0.1")
        self.upstream = ("127.0.0.1", upstream_port)
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._held: list[socket.socket] = []
        self._delay = 0.0
        self._cut = False
        self._blackhole = False
        self._swallow = False
        self._swallowed: set[_Link] = set()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept",
                                          daemon=True)
        self._acceptor.start()
        self._timer = threading.Timer(max_lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        listener.settimeout(POLL)
        return listener

    # -- controls ------------------------------------------------------------

    def cut(self, *, blackhole: bool = False) -> None:
        """Close every connection; refuse new ones (or, ``blackhole``, accept and ignore)."""
        with self._lock:
            self._cut = True
            self._blackhole = blackhole
            links = list(self._links)
            if not blackhole and self._listener is not None:
                self._listener.close()  # a real ECONNREFUSED for new connections
                self._listener = None
        for link in links:
            link.shutdown()

    def swallow_replies(self) -> None:
        """Forward client->server bytes, drop server->client ones, until ``restore()``."""
        with self._lock:
            self._swallow = True

    def restore(self) -> None:
        """Forward again on the same port; blackholed and reply-swallowed links are closed."""
        with self._lock:
            self._cut = False
            self._swallow = False
            held, self._held = self._held, []
            swallowed, self._swallowed = list(self._swallowed), set()
            if self._listener is None and not self._stopped.is_set():
                self._listener = self._listen(self.port)
        for sock in held:
            sock.close()
        for link in swallowed:
            link.shutdown()

    def delay(self, seconds: float) -> None:
        """Wait ``seconds`` before forwarding each chunk, in both directions (0 = off)."""
        self._delay = max(seconds, 0.0)

    @property
    def connections(self) -> int:
        """Connections being forwarded now."""
        with self._lock:
            return len(self._links)

    def stop(self) -> None:
        """Close everything and end every thread (idempotent; also run by the timer)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        with self._lock:
            listener, self._listener = self._listener, None
            links = list(self._links)
            held, self._held = self._held, []
        for link in links:
            link.shutdown()
        for sock in held:
            sock.close()
        if threading.current_thread() is not self._acceptor:
            self._acceptor.join(5)
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(5)
        if listener is not None:
            listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- threads -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(POLL / 2)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue  # timeout, or the listener was closed by cut()/stop()
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            if self._stopped.is_set():
                client.close()
                return
            if self._cut:
                if self._blackhole:
                    self._held.append(client)
                else:
                    client.close()
                return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
        except OSError:
            client.close()  # upstream down: the client sees the connection drop
            return
        for sock in (client, upstream):
            sock.settimeout(POLL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            self._links.add(link)
        for source, target in ((client, upstream), (upstream, client)):
            thread = threading.Thread(target=self._pump, args=(link, source, target),
                                      name="proxy-pump", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    data = source.recv(CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    return
                if self._swallow and source is link.upstream:
                    with self._lock:
                        if self._swallow:  # re-checked: restore() may have just run
                            self._swallowed.add(link)
                            continue
                if self._delay:
                    time.sleep(self._delay)
                target.sendall(data)
        except OSError:
            return  # reset, or shut down by cut()/stop()
        finally:
            with self._lock:
                self._links.discard(link)
            link.pump_done()
