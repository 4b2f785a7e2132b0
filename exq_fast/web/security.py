"""The web UI's guards: who may see it (``WebAuth``), and which POSTs are the UI's own
(CSRF tokens), plus the headers every page carries.

``Guard`` is a plain ASGI middleware around the whole app:

* **auth** -- with ``WebAuth`` enabled, a request passes with HTTP basic auth
  (``Authorization: Basic``), the bearer token (``Authorization: Bearer``), or
  the cookie the token sets: a browser opens ``/?token=…`` once, gets an
  HttpOnly cookie holding the token's SHA-256 and is redirected to the same
  page without the token in its address. Anything else gets 401 and nothing
  from Redis. Every comparison is constant-time.
* **CSRF** -- each browser gets a random HttpOnly ``SameSite=Strict`` cookie;
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
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSRF_COOKIE", "TOKEN_COOKIE", "Guard", "WebAuth", "csrf_token", "same_origin"]

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
    password: str | None = None
    token: str | None = None

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
            return _equal(value.strip(), self.token)
        cookie = cookies.get(TOKEN_COOKIE)
        return self.token is not None and cookie is not None and _equal(cookie,
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
        user_ok = _equal(user, self.username or "")
        password_ok = _equal(password, self.password or "")
        return user_ok and password_ok


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def csrf_token(secret: bytes, seed: str) -> str:
    """The CSRF token of a browser's cookie ``seed``: HMAC-SHA256 under ``secret``."""
    return hmac.new(secret, seed.encode("utf-8"), hashlib.sha256).hexdigest()


def same_origin(headers: Headers) -> bool:
    """False when the browser says the request comes from another site."""
    if headers.get("sec-fetch-site", "same-origin") == "cross-site":
        return False
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == headers.get("host", "")


def _cookies(headers: Headers) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(name: str, value: str, path: str) -> bytes:
    return (f"{name}={value}; Path={path}; HttpOnly; SameSite=Strict").encode("latin-1")


class Guard:
    """The ASGI middleware of the module doc: auth, the CSRF cookie, security headers."""

    def __init__(self, app: ASGIApp, auth: WebAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        cookies = _cookies(headers)
        path = scope.get("root_path", "") or "/"
        if not self.auth.allows(headers, cookies):
            await self._refuse(scope, send, path)
            return
        seed = cookies.get(CSRF_COOKIE) or ""
        fresh = len(seed) < 32
        if fresh:
            seed = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_seed"] = seed

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if fresh:
                    extra.append((b"set-cookie", _cookie(CSRF_COOKIE, seed, path)))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refuse(self, scope: Scope, send: Send, path: str) -> None:
        """401, or for ``?token=<the token>`` the cookie and a redirect without it."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        given = dict(query).get("token")
        if given is not None and self.auth.token is not None and _equal(given, self.auth.token):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            target = scope.get("root_path", "") + _route_path(scope) + (f"?{rest}" if rest else "")
            await _respond(send, 303, b"", [
                (b"location", target.encode("latin-1")),
                (b"set-cookie", _cookie(TOKEN_COOKIE, self.auth.token_digest, path))])
            return
        challenge = ([(b"www-authenticate", b'Basic realm="exq-fast", charset="UTF-8"')]
                     if self.auth.username is not None else [])
        body = (b"401: this exq-fast web UI needs credentials: basic auth, an "
                b"'Authorization: Bearer <token>' header, or open it once with ?token=<token>.\n")
        await _respond(send, 401, body, [(b"content-type", b"text/plain; charset=utf-8"),
                                         *challenge])


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _respond(send: Send, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, *SECURITY_HEADERS,
                            (b"content-length", str(len(body)).encode("ascii"))]})
    await send({"type": "http.response.body", "body": body})
