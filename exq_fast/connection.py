"""Redis connections built from a ``Config``: URL or parts, password, ACL user, TLS,
or a Sentinel-managed master.

Through Sentinel, every connection asks the sentinels for the current master when
it connects (redis-py's ``SentinelConnectionPool``). After a failover the old
master's connections fail (closed, or ``READONLY`` once it is a replica, which
redis-py turns into a connection error); the failed call reaches exq-fast's own
retry logic (the fetch backoff and reconciliation, the ack writer's idempotent
batches) and the next connection goes to the promoted replica. No command is
re-sent by the client library (see ``connection_kwargs``).
"""

from __future__ import annotations

import ssl
from typing import Any, cast

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import ClusterTarget, Config, SentinelTarget


def no_retry() -> Retry:
    """The retry policy of every client exq-fast builds: none (see ``connection_kwargs``)."""
    return Retry(NoBackoff(), 0)


def connection_kwargs(config: Config) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` shared by every client exq-fast makes."""
    timeout = config.redis_timeout / 1000
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # A failed health-check PING raises before the command is written: the
        # command is never sent, so it is never sent twice.
        "health_check_interval": 30,
        # redis-py must never re-send a command after a timeout or a dropped
        # connection: Redis may already have run the first copy. The fetch
        # script is not idempotent; a re-sent fetch moves a second batch while
        # the jobs of the first, whose reply is never read, are stranded in the
        # backup list until the node restarts (issue 11). redis-py gives a client
        # built from host and port 10 retries by default (and one from a URL with
        # ?retry_on_timeout 1), so the policy is explicit on every path. Retrying
        # is exq-fast's decision: the fetcher's fetch backoff and reconciliation,
        # the ack writer's idempotent batches. No retry_on_error/retry_on_timeout.
        "retry": no_retry(),
    }
    if config.redis_username is not None:
        kwargs["username"] = config.redis_username
    if config.redis_password is not None:
        kwargs["password"] = config.redis_password
    if config.redis_tls or (config.redis_url or "").startswith("rediss://"):
        kwargs.update(_tls_kwargs(config))
    return kwargs


def _tls_kwargs(config: Config) -> dict[str, Any]:
    verify = config.redis_tls_verify
    kwargs: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE}
    if not config.redis_tls_verify:
        kwargs["ssl_check_hostname"] = False
    if config.redis_tls_ca_certs:
        kwargs["ssl_ca_certs"] = config.redis_tls_ca_certs
    return kwargs


def connect(config: Config, *, max_connections: int | None = None) -> redis.Redis:
    """A client with its own connection pool (thread-safe), not yet connected."""
    kwargs = connection_kwargs(config)
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    target = config.sentinel
    if target is not None:
        return _sentinel_master(config, target, kwargs)
    cluster = config.cluster
    if cluster is not None:
        return _cluster(config, cluster, kwargs)
    if config.redis_url:
        url = config.redis_url
        if config.redis_tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://"):]
        client = redis.Redis.from_url(url, **kwargs)
        # A URL's query string wins over keyword arguments in redis-py (?retry=...):
        # set the policy again on the pool, for every connection it makes.
        client.set_retry(no_retry())
        return client
    if config.redis_tls:
        kwargs["ssl"] = True
    return redis.Redis(
        host=config.redis_host, port=config.redis_port, db=config.redis_db, **kwargs
    )


def _login(config: Config, target: SentinelTarget | ClusterTarget,
           kwargs: dict[str, Any]) -> bool:
    """Set the Redis credentials and TLS of ``kwargs`` from ``target`` (its URL, or the
    redis_* options a ``SentinelTarget`` was built from); True when TLS is on
    (a ``rediss+`` scheme, or ``redis_tls`` with either form)."""
    for name in ("username", "password"):
        kwargs.pop(name, None)
        if getattr(target, name) is not None:
            kwargs[name] = getattr(target, name)
    tls = target.tls or config.redis_tls
    if tls:
        kwargs.update(_tls_kwargs(config), ssl=True)
    return tls


def _sentinel_master(config: Config, target: SentinelTarget,
                     kwargs: dict[str, Any]) -> redis.Redis:
    """A client of the master that ``target``'s sentinels name, following failovers."""
    timeout = config.redis_timeout / 1000
    to_sentinels: dict[str, Any] = {"socket_timeout": timeout,
                                    "socket_connect_timeout": timeout, "retry": no_retry()}
    if config.redis_sentinel_username is not None:
        to_sentinels["username"] = config.redis_sentinel_username
    if config.redis_sentinel_password is not None:
        to_sentinels["password"] = config.redis_sentinel_password
    if _login(config, target, kwargs):
        to_sentinels.update(_tls_kwargs(config), ssl=True)
    sentinel = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=to_sentinels)
    client: redis.Redis = sentinel.master_for(target.service, db=target.db, **kwargs)
    return client


def _cluster(config: Config, target: ClusterTarget, kwargs: dict[str, Any]) -> redis.Redis:
    """A Redis Cluster client: each command goes to the node serving its slot (a
    namespace's keys share one slot, see ``Config``'s check), following MOVED and
    ASK redirections (a redirected command was not run, so following it is no
    retry); the ``no_retry`` policy applies to everything else."""
    _login(config, target, kwargs)
    kwargs.pop("health_check_interval", None)
    nodes = [redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
             for host, port in target.nodes]
    client = redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
    # The rest of exq-fast is typed against redis.Redis; RedisCluster offers the same
    # commands, pipelines (one slot for a transaction) and scripts (routed by KEYS).
    return cast(redis.Redis, client)


def text(value: bytes | str) -> str:
    """A Redis reply as text (the client returns bytes; undecodable bytes replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
