"""``exq-fast web``: the UI served by uvicorn, loopback unless told otherwise."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Sequence

import uvicorn

from ..admin import Api
from ..config import Config
from . import create_app
from .security import WebAuth, host_name

__all__ = ["DEFAULT_BIND", "DEFAULT_PORT", "WebSetupError", "auth_from", "is_loopback",
           "serve"]

logger = logging.getLogger("exq_fast.web")
DEFAULT_PORT = 7433
DEFAULT_BIND = "127.0.0.1"


class WebSetupError(ValueError):
    """A web option exq-fast cannot use (the message names it, never a password)."""


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_from(basic: str | None, token: str | None) -> WebAuth:
    """``WebAuth`` from the flags, else ``EXQ_WEB_BASIC_AUTH`` / ``EXQ_WEB_TOKEN``;
    ``WebSetupError`` naming the option when one is malformed."""
    basic = basic if basic is not None else os.environ.get("EXQ_WEB_BASIC_AUTH") or None
    token = token if token is not None else os.environ.get("EXQ_WEB_TOKEN") or None
    try:
        return WebAuth.parse(basic, token)
    except ValueError as exc:
        raise WebSetupError(f"--basic-auth / --token (EXQ_WEB_BASIC_AUTH / EXQ_WEB_TOKEN): "
                          f"{exc}") from None


def _listen(bind: str, port: int) -> socket.socket:
    """The listening socket (so the log names the port even when ``--port 0`` picked
    one); ``WebSetupError`` when the address cannot be had."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        sock.close()
        raise WebSetupError(f"--bind {bind} --port {port}: cannot listen there "
                            f"({exc.strerror})") from None
    sock.listen(128)
    return sock


def serve(config: Config, *, bind: str = DEFAULT_BIND, port: int = DEFAULT_PORT,
          auth: WebAuth | None = None, allowed_hosts: Sequence[str] = ()) -> int:
    """Serve the UI until SIGINT / SIGTERM. Refused (``WebSetupError``) on an address
    beyond loopback without auth: anyone who reached it could delete every job.

    Requests must name a loopback host, the address bound or one of ``allowed_hosts``
    (``--allowed-host``: the name users type, or a proxy's public name) when no auth
    is set or when names are given; with auth and no names, any host."""
    auth = auth or WebAuth()
    if not is_loopback(bind) and not auth.enabled:
        raise WebSetupError(f"--bind {bind}: the web UI serves beyond loopback only with "
                          "--basic-auth USER:PASSWORD or --token (or EXQ_WEB_BASIC_AUTH / "
                          "EXQ_WEB_TOKEN)")
    if not 0 <= port <= 65535:
        raise WebSetupError(f"--port {port}: not a TCP port")
    with Api(config) as api, _listen(bind, port) as sock:
        api.redis.ping()  # an unreachable Redis fails here, in one line, not per page
        hosts = None
        if allowed_hosts or not auth.enabled:
            # The address bound (unless a wildcard) and the names given (--allowed-host);
            # create_app adds the loopback names.
            hosts = {host_name(bind), *allowed_hosts} - {"0.0.0.0", "::"}
        app = create_app(api=api, auth=auth, allowed_hosts=hosts)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               server_header=False))

        # TERM must stop the server whenever it comes, and end the command with 0.
        # uvicorn handles it only once its loop runs, and raises it again after its
        # stop (the default action would then kill us with -15). Our handler covers
        # both moments: before uvicorn's, it asks the server to exit (uvicorn checks
        # that right after start-up); after, it is harmless.
        def stop(_signum: int, _frame: object) -> None:
            server.should_exit = True

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            logger.info("exq-fast web UI on http://%s:%d/ (namespace %r)%s",
                        f"[{bind}]" if ":" in bind else bind, sock.getsockname()[1],
                        config.namespace, f", {auth.kind}" if auth.enabled
                        else ", no auth (loopback names only)")
            if auth.token is not None:
                logger.info("with a browser, open /?token=<the token> once (it sets a cookie)")
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0
