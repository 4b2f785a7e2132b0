"""Test helpers of the web UI: the app served by a real uvicorn on a loopback port in
a thread (``WebServer``), and a small HTTP client that keeps cookies and reads the
CSRF token off each page (``Client``), as a browser would."""

from __future__ import annotations

import base64
import http.client
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlencode

import uvicorn
from starlette.types import ASGIApp

from tests.conftest import wait_for

_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


class WebServer:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, app: ASGIApp) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="test-web", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the web server to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextmanager
def serving(app: ASGIApp) -> Iterator[WebServer]:
    server = WebServer(app).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str
    set_cookies: list[str] = field(default_factory=list)


class Client:
    """HTTP/1.1 to one server, with a cookie jar and the last page's CSRF token."""

    def __init__(self, port: int, *, basic: tuple[str, str] | None = None,
                 bearer: str | None = None) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}
        self.csrf = ""
        self.auth: dict[str, str] = {}
        if basic is not None:
            value = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            self.auth["Authorization"] = f"Basic {value}"
        if bearer is not None:
            self.auth["Authorization"] = f"Bearer {bearer}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {**self.auth, **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
            set_cookies = response.headers.get_all("set-cookie") or []
            for raw in set_cookies:
                jar: SimpleCookie = SimpleCookie()
                jar.load(raw)
                self.cookies.update({k: m.value for k, m in jar.items()})
            reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                          text, set_cookies)
        finally:
            conn.close()
        if (found := _CSRF.search(text)) is not None:
            self.csrf = found.group(1)
        return reply

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, fields: Sequence[tuple[str, str]], *, csrf: bool = True,
             headers: Mapping[str, str] | None = None) -> Reply:
        items = [*fields, *([("csrf", self.csrf)] if csrf else [])]
        return self.request("POST", path, urlencode(items).encode(), {
            "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
