"""Config: Exq's defaults, env parsing, precedence, and errors naming the option."""

from __future__ import annotations

import os
import socket

import pytest

from exq_fast.config import Config, ConfigError, QueueSpec


def test_defaults_are_exqs() -> None:
    config = Config()
    assert config.namespace == "exq"
    assert config.concurrency == 100
    assert config.queue_specs == (QueueSpec("default", 100),)
    assert (config.poll_timeout, config.scheduler_poll_timeout) == (100, 200)
    assert config.scheduler_page_size == 10
    assert config.max_retries == 25
    assert (config.dead_max_jobs, config.dead_timeout_in_seconds) == (10000, 180 * 24 * 3600)
    assert config.shutdown_timeout == 5000
    assert config.stats_batch_size == 2000
    # Not Exq's: the dead-node monitor is on, so a dead node's jobs run again within a
    # minute, and the node id is unique per process (Exq's hostname is shared by every
    # process of a host, and with it the backup lists)
    assert (config.heartbeat_enable, config.heartbeat_interval) == (True, 5000)
    assert config.missed_heartbeats_allowed == 5
    host, pid, token = config.node_id.rsplit(":", 2)
    assert (host, int(pid), len(token)) == (socket.gethostname(), os.getpid(), 6)
    assert Config().node_id != config.node_id
    assert config.redis_url is None and config.redis_port == 6379


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.namespace = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("queues", "expected"),
    [
        ("default:10,mail:5", (QueueSpec("default", 10), QueueSpec("mail", 5))),
        ("a, b:infinity", (QueueSpec("a", 7), QueueSpec("b", None))),
        (["a", ("b", 3), ("c", "Infinite")], (QueueSpec("a", 7), QueueSpec("b", 3),
                                              QueueSpec("c", None))),
        ([QueueSpec("x", 2)], (QueueSpec("x", 2),)),
    ],
)
def test_queue_specs(queues: object, expected: tuple[QueueSpec, ...]) -> None:
    assert Config(queues=queues, concurrency=7).queue_specs == expected  # type: ignore[arg-type]


def test_unlimited_global_concurrency_applies_to_plain_names() -> None:
    config = Config(queues=["a"], concurrency=None)
    assert config.queue_specs == (QueueSpec("a", None),)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"concurrency": -1}, "concurrency"),
        ({"concurrency": 0}, "concurrency"),
        ({"queues": "a:x"}, "queues"),
        ({"queues": "a:-3"}, "queues"),
        ({"queues": ""}, "queues"),
        ({"queues": []}, "queues"),
        ({"queues": "a,a"}, "queues"),
        ({"redis_url": "http://localhost"}, "redis_url"),
        ({"redis_url": "redis://localhost:notaport"}, "redis_url"),
        ({"redis_url": "redis://"}, "redis_url"),
        ({"poll_timeout": -5}, "poll_timeout"),
        ({"max_retries": "3"}, "max_retries"),
        ({"stats_batch_size": 0}, "stats_batch_size"),
        ({"node_id": "queues"}, "node_id"),
        ({"node_id": "a::b"}, "node_id"),
        ({"namespace": "exq:"}, "namespace"),
    ],
)
def test_bad_values_fail_naming_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)  # type: ignore[arg-type]
    assert info.value.option == option
    assert option in str(info.value)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_from_env_reads_variables() -> None:
    env = {
        "REDIS_URL": "redis://10.0.0.1:6380/2",
        "EXQ_NAMESPACE": "app",
        "EXQ_QUEUES": "default:10,mail:5",
        "EXQ_CONCURRENCY": "infinity",
        "EXQ_MAX_RETRIES": "3",
        "EXQ_HEARTBEAT_ENABLE": "true",
        "EXQ_NODE_ID": "web-1",
    }
    config = Config.from_env(env)
    assert config.redis_url == "redis://10.0.0.1:6380/2"
    assert config.namespace == "app"
    assert config.queue_specs == (QueueSpec("default", 10), QueueSpec("mail", 5))
    assert config.concurrency is None
    assert config.max_retries == 3
    assert config.heartbeat_enable is True
    assert config.node_id == "web-1"


def test_precedence_explicit_over_env_over_default() -> None:
    env = {"EXQ_NAMESPACE": "from-env", "EXQ_POLL_TIMEOUT": "250"}
    config = Config.from_env(env, namespace="explicit")
    assert config.namespace == "explicit"
    assert config.poll_timeout == 250
    assert config.scheduler_poll_timeout == 200
    assert Config.from_env({}).namespace == "exq"


def test_env_empty_namespace_is_kept() -> None:
    assert Config.from_env({"EXQ_NAMESPACE": ""}).namespace == ""


def test_exq_redis_url_wins_over_redis_url() -> None:
    env = {"REDIS_URL": "redis://a:1/0", "EXQ_REDIS_URL": "redis://b:2/0"}
    assert Config.from_env(env).redis_url == "redis://b:2/0"


@pytest.mark.parametrize(
    ("env", "option"),
    [
        ({"EXQ_CONCURRENCY": "-2"}, "concurrency"),
        ({"EXQ_POLL_TIMEOUT": "fast"}, "poll_timeout"),
        ({"EXQ_HEARTBEAT_ENABLE": "maybe"}, "heartbeat_enable"),
        ({"EXQ_QUEUES": "a:b:c"}, "queues"),
        ({"REDIS_URL": "localhost:6379"}, "redis_url"),
    ],
)
def test_bad_env_values_fail_naming_the_option(env: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        Config.from_env(env)


def test_replace_validates() -> None:
    config = Config()
    assert config.replace(namespace="x").namespace == "x"
    with pytest.raises(ConfigError):
        config.replace(concurrency=-1)


class _Hook:
    """Anything with the three hooks is a middleware (duck-typed, as in Exq)."""

    def before_work(self, pipeline: object) -> None: ...

    def after_processed_work(self, pipeline: object) -> None: ...

    def after_failed_work(self, pipeline: object) -> None: ...


@pytest.mark.parametrize(("chain", "why"), [
    ((_Hook,), "a class: pass an instance, _Hook()"),
    ((object(),), "not a middleware"),
    ("x", "expected a list or tuple"),
    (_Hook(), "expected a list or tuple"),
])
def test_a_bad_middleware_chain_fails_at_construction(chain: object, why: str) -> None:
    # When the chain holds a class, a non-middleware, or is no list at all
    with pytest.raises(ConfigError) as caught:
        Config(middleware=chain)  # type: ignore[arg-type]
    # Then the start never happens: the error names the option and says why
    assert caught.value.option == "middleware"
    assert why in str(caught.value)


def test_a_middleware_list_is_kept_as_a_tuple_and_empty_means_none() -> None:
    hook = _Hook()
    assert Config(middleware=[hook]).middleware == (hook,)
    assert Config(middleware=()).middleware == ()
    assert Config().middleware is None
