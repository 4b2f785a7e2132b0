"""The web UI's guards: who may see it (``WebAuth``), and which POSTs are the UI's own
(CSRF tokens), plus the headers every page carries.

``Guard`` is a plain ASGI middleware around the whole app:

* **auth** -- with ``WebAuth`` enabled, a request passes with HTTP basic auth
  (``Authorization: Basic``), the bearer token (``Authorization: Bearer``), or
  the cookie the token sets: a browser opens ``/?token=…`` once, gets an
  HttpOnly cookie holding the token's SHA-256 and is redirected to the same
  page without the token in its address. Anything else gets 401 and nothing
  from Redis. Every comparison is constant-time.
* **hosts** -- without auth only loopback host names are answered (DNS
  rebinding), and cross-site requests other than a link being followed are
  refused (an ``<img>`` or a script elsewhere cannot make the UI scan Redis);
* **CSRF** -- each browser gets a random HttpOnly ``SameSite=Lax`` cookie;
  a form's token is the HMAC of that cookie under the app's secret. A POST
  passes only with the right token, and not when the browser says it came from
  another site (``Origin`` not this host, ``Sec-Fetch-Site: cross-site``).
* **headers** -- a Content-Security-Policy allowing only the app's own scripts
  and styles (no inline script: a payload that slipped through escaping could
  not run), ``nosniff``, no framing, no referrer to other sites.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSRF_COOKIE", "LOOPBACK_HOSTS", "TOKEN_COOKIE", "Guard", "WebAuth", "csrf_token",
           "equal", "host_name", "route_path", "same_origin", "sign"]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""What ``Host`` may name when the UI has no auth (see ``Guard``)."""
CSRF_COOKIE = "exq_web_csrf"
TOKEN_COOKIE = "exq_web_token"
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                 b"img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)


@dataclass(frozen=True, slots=True)
class WebAuth:
    """Who may use the UI: a basic-auth user and password, a token, both, or neither
    (``enabled`` False: anyone who can reach the port, so loopback only)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both a user name and a password")
        if self.username is not None and (not self.username or ":" in self.username):
            raise ValueError("the basic-auth user name must be non-empty, without ':'")
        if self.password is not None and not self.password:
            raise ValueError("the basic-auth password must not be empty")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the token must be at least 16 characters")

    @classmethod
    def parse(cls, basic: str | None = None, token: str | None = None) -> WebAuth:
        """From ``--basic-auth USER:PASSWORD`` and ``--token`` (either may be None)."""
        if basic is None:
            return cls(token=token or None)
        user, sep, password = basic.partition(":")
        if not sep:
            raise ValueError("basic auth must be given as USER:PASSWORD")
        return cls(user, password, token or None)

    @property
    def kind(self) -> str:
        """How a request may prove who it is, for the start-up log."""
        ways = (["basic auth"] if self.username is not None else []) + (
            ["token"] if self.token is not None else [])
        return " or ".join(ways) or "no auth"

    @property
    def enabled(self) -> bool:
        """True when a request must prove who it is."""
        return self.username is not None or self.token is not None

    def allows(self, headers: Headers, cookies: Mapping[str, str]) -> bool:
        """True if the request carries valid credentials (or none are needed)."""
        if not self.enabled:
            return True
        kind, _, value = headers.get("authorization", "").partition(" ")
        if kind.lower() == "basic" and self.username is not None:
            return self._basic_ok(value.strip())
        if kind.lower() == "bearer" and self.token is not None:
            return equal(value.strip(), self.token)
        cookie = cookies.get(TOKEN_COOKIE)
        return self.token is not None and cookie is not None and equal(cookie,
                                                                        self.token_digest)

    @property
    def token_digest(self) -> str:
        """What the token cookie holds: the token's SHA-256, never the token."""
        return hashlib.sha256((self.token or "").encode("utf-8")).hexdigest()

    def _basic_ok(self, value: str) -> bool:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        # Both compared, always: no early exit telling which one was wrong.
        user_ok = equal(user, self.username or "")
        password_ok = equal(password, self.password or "")
        return user_ok and password_ok


def equal(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (or tokens) as text."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def sign(secret: bytes, seed: str, text: str) -> str:
    """A MAC of ``text`` for the browser whose cookie is ``seed`` (the notice an
    action redirects with): a link made elsewhere, or for another browser, cannot
    put words in the UI's mouth. Keyed apart from the CSRF tokens."""
    message = b"notice\0" + seed.encode("ascii") + b"\0" + text.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def csrf_token(secret: bytes, seed: str) -> str:
    """The CSRF token of a browser's cookie ``seed``: HMAC-SHA256 under ``secret``."""
    return hmac.new(secret, b"csrf\0" + seed.encode("ascii"), hashlib.sha256).hexdigest()


_SEED = re.compile(r"[A-Za-z0-9_-]{43}")
"""What ``secrets.token_urlsafe(32)`` makes: the only CSRF cookie accepted."""


def same_origin(headers: Headers, allowed_hosts: frozenset[str] = frozenset(),
                scheme: str = "http") -> bool:
    """False when the browser says the request comes from another site: its
    ``Origin`` is neither this ``Host`` nor one of ``allowed_hosts`` (the public
    names of a proxy in front), or ``Sec-Fetch-Site`` says cross-site."""
    if headers.get("sec-fetch-site", "same-origin") == "cross-site":
        return False
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-origin request (they all send Origin)
    if origin == "null":
        return False
    parts = urlsplit(origin)
    netloc = parts.netloc
    if netloc == headers.get("host", "") and parts.scheme == scheme:
        return True
    # A proxy's public name (Host rewritten behind it); never a loopback name on
    # another port, which is another app of this host.
    return host_name(netloc) in allowed_hosts - LOOPBACK_HOSTS


def _cookies(headers: Headers) -> dict[str, str]:
    # Starlette's lenient parser: another app's odd cookie on the same host (a JSON
    # value, a space) must not make ours unreadable, as http.cookies would.
    return cookie_parser(headers.get("cookie", ""))


def _cookie(name: str, value: str, path: str, secure: bool) -> bytes:
    # Lax, not Strict: a link from elsewhere (a chat, an alert) must open the UI
    # logged in and keep the tab's CSRF cookie; POSTs are guarded by the token.
    # Secure when the page came over HTTPS (behind a TLS proxy that says so).
    flags = "; Secure" if secure else ""
    return f"{name}={value}; Path={path}; HttpOnly; SameSite=Lax{flags}".encode("latin-1")


def host_name(netloc: str) -> str:
    """The host of ``host[:port]`` / ``[v6]:port``, lower case, without the port."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        return host if rest == "" or rest.startswith(":") else netloc
    host = netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc
    return host[:-1] if host.endswith(".") else host


class Guard:
    """The ASGI middleware of the module doc: auth, the CSRF cookie, security headers,
    and two checks before anything else:

    * ``Host`` must be one of ``allowed_hosts`` (when given): without auth the UI
      answers only to loopback names, so a site that rebinds its DNS name to
      127.0.0.1 gets nothing (its pages would otherwise be same-origin with ours);
    * a cross-site request that is not a top-level navigation (an ``<img>``, a
      ``fetch`` from another site) is refused before it reaches Redis.
    """

    def __init__(self, app: ASGIApp, auth: WebAuth,
                 allowed_hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.auth = auth
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None and host_name(
                headers.get("host", "")) not in self.allowed_hosts:
            await _respond(send, 421, b"421: this exq-fast web UI does not answer to that "
                           b"host name (see allowed_hosts / --allowed-host).\n", [_TEXT])
            return
        if not _own_request(headers):
            await _respond(send, 403, b"403: request from another site refused.\n", [_TEXT])
            return
        cookies = _cookies(headers)
        path = scope.get("root_path", "") or "/"
        secure = scope.get("scheme") == "https"
        if not self.auth.allows(headers, cookies):
            await self._refuse(scope, send, path, secure)
            return
        seed = cookies.get(CSRF_COOKIE) or ""
        fresh = _SEED.fullmatch(seed) is None
        if fresh:
            seed = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_seed"] = seed

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if fresh:
                    extra.append((b"set-cookie", _cookie(CSRF_COOKIE, seed, path, secure)))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refuse(self, scope: Scope, send: Send, path: str, secure: bool) -> None:
        """401, or for ``?token=<the token>`` the cookie and a redirect without it."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        given = dict(query).get("token")
        if given is not None and self.auth.token is not None and equal(given, self.auth.token):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            # Only a path of this app, quoted: never //elsewhere, nor raw bytes.
            here = "/" + quote(scope.get("root_path", "") + route_path(scope)).lstrip("/")
            target = here + (f"?{rest}" if rest else "")
            await _respond(send, 303, b"", [
                (b"location", target.encode("latin-1")),
                (b"set-cookie", _cookie(TOKEN_COOKIE, self.auth.token_digest, path, secure))])
            return
        challenge = ([(b"www-authenticate", b'Basic realm="exq-fast", charset="UTF-8"')]
                     if self.auth.username is not None else [])
        ways = ([b"basic auth"] if self.auth.username is not None else []) + (
            [b"an 'Authorization: Bearer <token>' header, or open it once with ?token=<token>"]
            if self.auth.token is not None else [])
        body = b"401: this exq-fast web UI needs credentials: " + b"; or ".join(ways) + b".\n"
        await _respond(send, 401, body, [_TEXT, *challenge])


_TEXT = (b"content-type", b"text/plain; charset=utf-8")


def _own_request(headers: Headers) -> bool:
    """False for what another site's page makes a browser request (an image, a frame,
    a ``fetch``): only the UI's own pages and a link followed to a page get through.
    ``Sec-Fetch-*`` absent (not a browser, or an old one): allowed."""
    site = headers.get("sec-fetch-site")
    if site in (None, "same-origin", "none"):
        return True
    return (headers.get("sec-fetch-mode") == "navigate"
            and headers.get("sec-fetch-dest", "document") == "document")


def route_path(scope: Scope) -> str:
    """The request's path within the app (without the prefix it is mounted under)."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _respond(send: Send, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, *SECURITY_HEADERS,
                            (b"content-length", str(len(body)).encode("ascii"))]})
    await send({"type": "http.response.body", "body": body})
