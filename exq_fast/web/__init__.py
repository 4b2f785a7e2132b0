"""exq-fast's web UI: see and operate the queues, busy nodes, retries, scheduled and
dead jobs in a browser (``pip install 'exq-fast[web]'``).

Run it on its own with ``exq-fast web`` (loopback, port 7433), or mount the ASGI
app in a service of yours, as Sidekiq::Web mounts in Rails::

    from starlette.applications import Starlette
    from starlette.routing import Mount
    from exq_fast.web import WebAuth, create_app

    app = Starlette(routes=[Mount("/exq", app=create_app(auth=WebAuth("ops", "s3cret")))])

It reads and writes only through ``admin.Api`` (docs/wire-format.md), so it works
on Exq, Sidekiq and exq-fast data alike, in any namespace. See ``security`` for
what guards it and ``app`` for the pages.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from ..admin import Api
from ..config import Config

try:
    from starlette.applications import Starlette
except ImportError as exc:  # pragma: no cover - exercised by a user without the extra
    raise ImportError("the web UI needs its extra: pip install 'exq-fast[web]'") from exc

from .app import WebUI
from .security import LOOPBACK_HOSTS, WebAuth, host_name

__all__ = ["WebAuth", "create_app"]


def create_app(config: Config | None = None, *, api: Api | None = None,
               auth: WebAuth | None = None, secret: bytes | None = None,
               allowed_hosts: Iterable[str] | None = None) -> Starlette:
    """The web UI as an ASGI app.

    ``config`` (default ``Config.from_env()``) names the Redis and namespace, or pass
    an ``api`` of your own. ``auth`` (default none) is required by ``exq-fast web``
    whenever it binds beyond loopback; mounted in your service, protect it yourself
    or pass one. ``secret`` keys the CSRF tokens (default: random per process; give
    the same bytes to every process behind one load balancer).

    ``allowed_hosts``: host names (no port) requests may be addressed to beside the
    loopback names (``localhost``, ``127.0.0.1``, ``::1``), also accepted as the
    ``Origin`` of a form (a proxy's public name). Default: with no auth, loopback
    names only, so a web page whose DNS name is rebound to 127.0.0.1 gets nothing;
    with auth, any host.
    """
    if api is None:
        api = Api(config)
    auth = auth or WebAuth()
    if allowed_hosts is not None:
        hosts: frozenset[str] | None = LOOPBACK_HOSTS | {
            host_name(h) for h in allowed_hosts}
    else:
        hosts = None if auth.enabled else LOOPBACK_HOSTS
    return WebUI(api, auth, secret or secrets.token_bytes(32), hosts).app
