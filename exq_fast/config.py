"""``Config``: every exq-fast option, with Exq's defaults.

A ``Config`` is frozen and validated when it is built: a bad value raises
``ConfigError`` naming the option and the value, so a process fails at start-up
rather than at the first job.

Sources and precedence: ``Config(...)`` takes keyword arguments over the
defaults and nothing else (what you write is what you get, whatever the
environment holds). ``Config.from_env(**overrides)`` reads ``REDIS_URL`` and
``EXQ_<OPTION>`` variables (``EXQ_NAMESPACE``, ``EXQ_QUEUES="default:10,mail:5"``,
``EXQ_CONCURRENCY``, ...) and then applies ``overrides``: explicit > env > default.
The CLI builds its config with ``from_env`` and its flags as overrides.

Times follow Exq's units: milliseconds, except ``dead_timeout_in_seconds`` and
``job_timeout`` (seconds, like ``@worker(timeout=...)`` and the enqueue option).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

UNLIMITED = None
"""Concurrency value meaning "no limit" (Exq's ``:infinity``)."""

_RESERVED_NODE_IDS = frozenset(
    {"queues", "schedule", "retry", "dead", "processes", "heartbeats", "stat", "queue", "unique",
     "nodes", "suspects", "poison"}
)
"""Ids whose node hash ``R(<id>)`` would be one of the namespace's fixed keys."""
_URL_SCHEMES = frozenset({"redis", "rediss", "unix"})
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""Sentinel URL schemes, and whether each uses TLS (to the sentinels and to Redis)."""
DEFAULT_SENTINEL_PORT = 26379
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
"""Redis Cluster URL schemes, and whether each uses TLS."""


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A Redis that Sentinel manages: where to ask, which service, and how to log in
    to the master it names (the sentinels' own credentials are ``Config`` options)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[user:pass@]host[:port][,host[:port]...]/service[/db]``
    (``rediss+sentinel://`` for TLS). ``ValueError`` says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        raise ValueError("scheme must be redis+sentinel:// or rediss+sentinel://")
    if "?" in rest or "#" in rest:
        raise ValueError("no query string or fragment in a sentinel URL")
    netloc, _, path = rest.partition("/")
    username, password, hosts = _credentials(netloc)
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("no service name: .../<service>[/<db>]")
    if db and not db.isdigit():
        raise ValueError(f"db must be a number, got {db!r}")
    return SentinelTarget(parse_hosts(hosts.split(",")), unquote(service),
                          int(db or 0), username, password, SENTINEL_SCHEMES[scheme])


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """A Redis Cluster: some of its nodes (the client discovers the rest) and how to
    log in to them."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_cluster_url(url: str) -> ClusterTarget:
    """``redis+cluster://[user:pass@]host:port[,host:port...]`` (``rediss+cluster://``
    for TLS). ``ValueError`` says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError("scheme must be redis+cluster:// or rediss+cluster://")
    if "?" in rest or "#" in rest or rest.partition("/")[2].strip("/") not in ("", "0"):
        raise ValueError("a cluster URL has no path (db 0 only), query or fragment")
    username, password, hosts = _credentials(rest.partition("/")[0])
    return ClusterTarget(parse_hosts(hosts.split(","), default_port=6379), username,
                         password, CLUSTER_SCHEMES[scheme])


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it has one: between the first
    ``{`` and the next ``}``, when not empty."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1:end] if end > start + 1 else None


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return username, password, hosts


def parse_hosts(items: Sequence[str],
                default_port: int = DEFAULT_SENTINEL_PORT) -> tuple[tuple[str, int], ...]:
    """``host[:port]`` strings (IPv6 in brackets) as (host, port): sentinels (port 26379
    by default) or cluster nodes (``default_port`` 6379)."""
    found = []
    for item in items:
        host, port = item.strip(), default_port
        if host.startswith("["):
            host, _, tail = host[1:].partition("]")
            if tail:
                port = _port(item, tail.removeprefix(":"))
        elif host.count(":") == 1:
            host, tail = host.split(":")
            port = _port(item, tail)
        if not host:
            raise ValueError(f"no host in {item!r}")
        found.append((host, port))
    if not found:
        raise ValueError("no host")
    return tuple(found)


def _port(item: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {item!r}")
    return int(text)


class ConfigError(ValueError):
    """An option has a value exq-fast cannot use; the message names both."""

    def __init__(self, option: str, value: object, why: str) -> None:
        super().__init__(f"invalid value for option {option!r}: {value!r} ({why})")
        self.option = option
        self.value = value
        self.why = why


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue to consume and its concurrency (``None`` = unlimited)."""

    name: str
    concurrency: int | None


QueueInput = str | tuple[str, int | str | None] | QueueSpec
"""One queue entry: ``"name"``, ``"name:10"``, ``("name", 10)`` or a ``QueueSpec``."""


def check_timeout(value: object, option: str = "timeout") -> float | None:
    """A job time limit in seconds: ``None`` (no limit) or a positive finite number
    (``ValueError`` otherwise); shared by ``job_timeout``, ``@worker`` and enqueue."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 < value < math.inf:
        raise ValueError(f"{option} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def parse_concurrency(option: str, value: object) -> int | None:
    """Parse a concurrency the way Exq does: an int, a numeric string, or infinity."""
    if value is None:
        return UNLIMITED
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("infinity", "infinite", "inf", "unlimited"):
            return UNLIMITED
        if not text.lstrip("-").isdigit():
            raise ConfigError(option, value, "expected a positive integer or 'infinity'")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(option, value, "expected a positive integer or 'infinity'")
    if value < 1:
        raise ConfigError(option, value, "concurrency must be at least 1")
    return value


def _queue_spec(entry: QueueInput, default: int | None) -> QueueSpec:
    if isinstance(entry, QueueSpec):
        return QueueSpec(_queue_name(entry.name), parse_concurrency("queues", entry.concurrency))
    if isinstance(entry, tuple):
        if len(entry) != 2:
            raise ConfigError("queues", entry, "expected (name, concurrency)")
        return QueueSpec(_queue_name(entry[0]), parse_concurrency("queues", entry[1]))
    if not isinstance(entry, str):
        raise ConfigError("queues", entry, "expected a queue name")
    name, sep, conc = entry.strip().rpartition(":")
    if not sep:
        return QueueSpec(_queue_name(conc), default)
    return QueueSpec(_queue_name(name), parse_concurrency("queues", conc))


def _checked_spec(entry: QueueInput, default: int | None) -> QueueSpec:
    try:
        return _queue_spec(entry, default)
    except ConfigError as exc:
        raise ConfigError("queues", entry, exc.why) from None


def _queue_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("queues", name, "a queue name must be a non-empty string")
    return name.strip()


def parse_queues(value: str | Sequence[QueueInput], default: int | None) -> tuple[QueueSpec, ...]:
    """Normalise a queue list or a ``"a:10,b"`` string into ``QueueSpec``s."""
    entries: Sequence[QueueInput] = value.split(",") if isinstance(value, str) else value
    specs = tuple(_checked_spec(e, default) for e in entries)
    if not specs:
        raise ConfigError("queues", value, "at least one queue is needed")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError("queues", value, "a queue is listed twice")
    return specs


def default_node_id() -> str:
    """An id no other process has: ``<hostname>:<pid>:<6 hex digits>`` (Sidekiq's form).

    Exq uses the bare hostname, which two processes on one host would share
    (and with it their backup lists). A restart gets a new id; the node it
    replaces is known dead at once on the same host (see ``nodes``), so its
    jobs are recovered at start-up all the same.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, kw_only=True)
class Config:
    """All options of an exq-fast process or client. See the module docstring."""

    # Redis connection. ``redis_url`` (redis://, rediss://, unix://, a Sentinel URL:
    # redis+sentinel://[user:pass@]host:port[,host:port...]/service[/db], or a Cluster
    # URL: redis+cluster://[user:pass@]host:port[,host:port...]) overrides the parts.
    redis_url: str | None = None
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    redis_username: str | None = None
    redis_password: str | None = None
    redis_tls: bool = False
    redis_tls_ca_certs: str | None = None
    redis_tls_verify: bool = True
    redis_timeout: int = 5000
    # Sentinel without a URL: the sentinels ("host:port", a list or a comma-separated
    # string) and the service; then redis_db, redis_username, redis_password and
    # redis_tls are the master's. The sentinels' own credentials, with either form:
    redis_sentinels: str | Sequence[str] = ()
    redis_sentinel_service: str | None = None
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    # Layout and queues.
    namespace: str = "exq"
    queues: str | Sequence[QueueInput] = ("default",)
    concurrency: int | None = 100
    node_id: str = field(default_factory=default_node_id)
    # Polling.
    poll_timeout: int = 100
    scheduler_enable: bool = True
    scheduler_poll_timeout: int = 200
    scheduler_page_size: int = 10
    # Retries and the dead set.
    max_retries: int = 25
    dead_max_jobs: int = 10000
    dead_timeout_in_seconds: int = 15552000
    backoff: Callable[..., float] | None = None
    # A job in flight on a node that died this many times (recovered from a
    # backup list each time) goes to the dead set: a poison job. 0 = never.
    max_recoveries: int = 3
    # Seconds a job may run before it fails with JobTimeout (None = no limit);
    # ``@worker(timeout=)`` and the enqueue option ``timeout`` take precedence.
    job_timeout: float | None = None
    # Shutdown and stats. Exq flushes stats every 1000 ms; exq-fast acks through
    # the stats batch, so it flushes within a few milliseconds of work.
    shutdown_timeout: int = 5000
    stats_flush_interval: int = 5
    stats_batch_size: int = 2000
    # Heartbeats and the dead-node monitor (opt-in in Exq, with 60000 ms): on, so
    # the jobs of a node that died elsewhere run again within about a minute.
    heartbeat_enable: bool = True
    heartbeat_interval: int = 5000
    missed_heartbeats_allowed: int = 5
    # Prometheus: /metrics on metrics_addr:metrics_port (None = no endpoint;
    # 0 = a free port); the cluster collector reads Redis-wide figures.
    metrics_enabled: bool = True
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_prefix: str = "exq_"
    metrics_cluster: bool = False
    # Middleware chain (instances of exq_fast.Middleware, in order); None = the
    # default chain (Snooze, Unique, Logger); () = none at all.
    middleware: Sequence[Any] | None = None

    queue_specs: tuple[QueueSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        concurrency = parse_concurrency("concurrency", self.concurrency)
        object.__setattr__(self, "concurrency", concurrency)
        object.__setattr__(self, "queue_specs", parse_queues(self.queues, concurrency))
        if self.middleware is not None:
            object.__setattr__(self, "middleware", parse_middleware(self.middleware))
        _validate(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build from ``REDIS_URL`` / ``EXQ_*`` variables, then ``overrides`` on top.

        An ``EXQ_*`` variable it does not know is logged as a WARNING on the
        ``exq_fast`` logger, with the closest known name (see ``warn_unknown_env``).
        """
        env = os.environ if environ is None else environ
        warn_unknown_env(env)
        values: dict[str, Any] = {}
        for name, parse in _ENV_PARSERS.items():
            raw = env.get("EXQ_" + name.upper())
            if raw is None and name == "redis_url":
                raw = env.get("REDIS_URL")
            if raw is not None and (raw != "" or name == "namespace"):
                values[name] = parse(name, raw)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def sentinel(self) -> SentinelTarget | None:
        """The Sentinel-managed Redis to connect to, or None. A ``redis_url`` wins over
        the ``redis_sentinels`` options, as it does over the host and port."""
        url = self.redis_url
        if url is not None:
            return parse_sentinel_url(url) if url.partition("://")[0] in SENTINEL_SCHEMES \
                else None
        if not self.redis_sentinels:
            return None
        return SentinelTarget(parse_hosts(_sentinel_list(self.redis_sentinels)),
                              self.redis_sentinel_service or "", self.redis_db,
                              self.redis_username, self.redis_password, self.redis_tls)

    @property
    def cluster(self) -> ClusterTarget | None:
        """The Redis Cluster to connect to, or None."""
        url = self.redis_url
        if url is not None and url.partition("://")[0] in CLUSTER_SCHEMES:
            return parse_cluster_url(url)
        return None

    @property
    def queue_names(self) -> list[str]:
        """The configured queue names, in order."""
        return [spec.name for spec in self.queue_specs]


_HOOKS = ("before_work", "after_processed_work", "after_failed_work")


def parse_middleware(chain: object) -> tuple[Any, ...]:
    """The chain as a tuple of middleware instances, or ``ConfigError``: a class where
    an instance is needed, or an object without the three hooks."""
    if isinstance(chain, (str, bytes)) or not isinstance(chain, (list, tuple)):
        raise ConfigError("middleware", chain, "expected a list or tuple of middleware")
    for item in chain:
        if isinstance(item, type):
            raise ConfigError("middleware", item,
                              f"a class: pass an instance, {item.__name__}()")
        if not all(callable(getattr(item, hook, None)) for hook in _HOOKS):
            raise ConfigError("middleware", item, "not a middleware: subclass "
                              "exq_fast.Middleware (before_work, after_*_work)")
    return tuple(chain)


def _validate(config: Config) -> None:
    for name, minimum in _MINIMUMS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, value, "expected an integer")
        if value < minimum:
            raise ConfigError(name, value, f"must be at least {minimum}")
    if config.redis_url is not None:
        _validate_url(config.redis_url)
    _validate_sentinel(config)
    _validate_cluster(config)
    if not config.node_id or config.node_id in _RESERVED_NODE_IDS or "::" in config.node_id:
        raise ConfigError("node_id", config.node_id, "empty, reserved or containing '::'")
    port = config.metrics_port
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 <= port <= 65535):
        raise ConfigError("metrics_port", port, "expected a port number 0-65535")
    if not config.metrics_prefix.replace("_", "a").isalnum():
        raise ConfigError("metrics_prefix", config.metrics_prefix, "letters, digits and _ only")
    try:
        check_timeout(config.job_timeout, "job_timeout")
    except ValueError:
        raise ConfigError("job_timeout", config.job_timeout,
                          "expected a positive number of seconds or None") from None
    if config.namespace.endswith(":"):
        raise ConfigError("namespace", config.namespace, "must not end with ':'")


def _validate_sentinel(config: Config) -> None:
    if config.redis_url is None and config.redis_sentinel_service is not None \
            and not config.redis_sentinels:
        raise ConfigError("redis_sentinels", config.redis_sentinels,
                          "redis_sentinel_service is set: name the sentinels too")
    if config.redis_sentinels and not config.redis_sentinel_service:
        raise ConfigError("redis_sentinel_service", config.redis_sentinel_service,
                          "redis_sentinels are set: name the service they watch")
    if config.redis_sentinels:  # checked even when a redis_url overrides them
        try:
            parse_hosts(_sentinel_list(config.redis_sentinels))
        except (ValueError, TypeError) as exc:
            raise ConfigError("redis_sentinels", config.redis_sentinels, str(exc)) from None


def _sentinel_list(items: object) -> list[str]:
    """``redis_sentinels`` as "host:port" strings: a comma-separated string or a list
    (of strings, or of (host, port) pairs)."""
    if isinstance(items, str):
        return items.split(",")
    if not isinstance(items, list | tuple):
        raise TypeError(f"expected 'host:port,...' or a list, got {type(items).__name__}")
    return [f"{item[0]}:{item[1]}" if isinstance(item, list | tuple) and len(item) == 2
            else item if isinstance(item, str) else _not_a_host(item) for item in items]


def _not_a_host(item: object) -> str:
    raise TypeError(f"not a sentinel 'host:port': {item!r}")


MASK = "***"
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)\S*@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(\bpassword=)[^&\s'\"]*", re.IGNORECASE)


def scrub(text: str) -> str:
    """``text`` with the password of every URL in it masked (for error messages)."""
    return _PASSWORD_PARAM.sub(rf"\g<1>{MASK}", _URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", text))


def _validate_cluster(config: Config) -> None:
    if config.cluster is not None and hash_tag(config.namespace + ":") is None:
        raise ConfigError("namespace", config.namespace, "a Redis Cluster needs a namespace "
                          "with a hash tag, e.g. '{exq}', so that all its keys share a slot")


def _validate_url(url: str) -> None:
    scheme = url.partition("://")[0]
    parse = parse_cluster_url if scheme in CLUSTER_SCHEMES else \
        parse_sentinel_url if scheme in SENTINEL_SCHEMES else None
    if parse is not None:
        try:
            parse(url)
        except ValueError as exc:
            raise ConfigError("redis_url", scrub(url), str(exc)) from None
        return
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError("redis_url", url, str(exc)) from None
    if parts.scheme not in _URL_SCHEMES:
        raise ConfigError("redis_url", url, "scheme must be redis://, rediss://, unix://, "
                          "redis+sentinel:// or redis+cluster://")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("redis_url", url, "no host")


_MINIMUMS: dict[str, int] = {
    "redis_port": 1,
    "redis_db": 0,
    "redis_timeout": 1,
    "poll_timeout": 0,
    "scheduler_poll_timeout": 1,
    "scheduler_page_size": 1,
    "max_retries": 0,
    "max_recoveries": 0,
    "dead_max_jobs": 0,
    "dead_timeout_in_seconds": 0,
    "shutdown_timeout": 0,
    "stats_flush_interval": 0,
    "stats_batch_size": 1,
    "heartbeat_interval": 1,
    "missed_heartbeats_allowed": 0,
}


def _env_int(option: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(option, raw, "expected an integer") from None


def _env_bool(option: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(option, raw, "expected true or false")


def _env_seconds(option: str, raw: str) -> float | None:
    text = raw.strip().lower()
    if text in ("none", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(option, raw, "expected a number of seconds, or none") from None


def _env_str(option: str, raw: str) -> str:
    return raw


ENV_READ_ELSEWHERE: frozenset[str] = frozenset({"EXQ_WEB_BASIC_AUTH", "EXQ_WEB_TOKEN"})
"""``EXQ_*`` variables exq-fast reads outside ``Config`` (the web UI's credentials, read
by ``exq-fast web``): never flagged as unknown. A variable the CLI, the tests or the
benchmarks come to read goes here."""

logger = logging.getLogger("exq_fast")
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_unknown_env(env: Mapping[str, str]) -> None:
    """Log a WARNING for each ``EXQ_*`` variable of ``env`` that ``from_env`` does not
    read, with the closest known name if one is close; once per name per process."""
    known = sorted("EXQ_" + name.upper() for name in _ENV_PARSERS)
    for name in sorted(env):
        if not name.startswith("EXQ_") or name in known or name in ENV_READ_ELSEWHERE:
            continue
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        logger.warning("unknown environment variable %s%s", name, hint)


_ENV_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "redis_url": _env_str,
    "redis_host": _env_str,
    "redis_port": _env_int,
    "redis_db": _env_int,
    "redis_username": _env_str,
    "redis_password": _env_str,
    "redis_tls": _env_bool,
    "redis_tls_ca_certs": _env_str,
    "redis_tls_verify": _env_bool,
    "redis_timeout": _env_int,
    "redis_sentinels": _env_str,
    "redis_sentinel_service": _env_str,
    "redis_sentinel_username": _env_str,
    "redis_sentinel_password": _env_str,
    "namespace": _env_str,
    "queues": _env_str,
    "concurrency": parse_concurrency,
    "node_id": _env_str,
    "poll_timeout": _env_int,
    "scheduler_enable": _env_bool,
    "scheduler_poll_timeout": _env_int,
    "scheduler_page_size": _env_int,
    "max_retries": _env_int,
    "max_recoveries": _env_int,
    "job_timeout": _env_seconds,
    "dead_max_jobs": _env_int,
    "dead_timeout_in_seconds": _env_int,
    "shutdown_timeout": _env_int,
    "stats_flush_interval": _env_int,
    "stats_batch_size": _env_int,
    "heartbeat_enable": _env_bool,
    "heartbeat_interval": _env_int,
    "missed_heartbeats_allowed": _env_int,
    "metrics_enabled": _env_bool,
    "metrics_port": _env_int,
    "metrics_addr": _env_str,
    "metrics_prefix": _env_str,
    "metrics_cluster": _env_bool,
}
