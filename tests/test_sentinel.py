"""Sentinel: the URL and options, and a real master, replica and three sentinels.

The failover test runs ``exq-fast run`` against the sentinels, kills the master
under load and checks that the node goes on with the promoted replica: every
job enqueued after the failover runs exactly once, and the loss and duplicates
of the jobs enqueued before it are printed (Redis replicates asynchronously:
see the README's Sentinel section).

The TLS test runs the same clients against a master, a replica and sentinels
that all listen on TLS only, through ``rediss+sentinel://`` with the private CA
given as ``redis_tls_ca_certs``; it skips (fails under CI) where no CA can be
made or redis-server has no TLS, like the TLS tests of test_security.py.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from exq_fast import Config, Enqueuer, Exq, Registry
from exq_fast.admin import Api
from exq_fast.config import ConfigError, SentinelTarget, parse_sentinel_url
from exq_fast.connection import connect
from exq_fast.embedded import delete_namespace
from exq_fast.keys import Keys
from tests.conftest import RunProcesses, wait_for
from tests.sentinel import SERVICE, SentinelSetup
from tests.test_security import TlsUnavailable, skip_or_fail


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    setup = SentinelSetup().start()
    yield setup
    setup.stop()


@pytest.fixture
def tls_sentinel_setup() -> Iterator[SentinelSetup]:
    try:
        setup = SentinelSetup(tls=True).start()
    except TlsUnavailable as exc:
        skip_or_fail(str(exc))
        raise  # unreachable: skip_or_fail raises
    yield setup
    setup.stop()


def test_a_sentinel_url_names_sentinels_service_db_and_the_masters_credentials() -> None:
    target = parse_sentinel_url("redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/main/3")
    assert target == SentinelTarget((("s1", 26380), ("s2", 26379), ("::1", 26381)), "main",
                                    3, "app", "p@ss", False)
    assert parse_sentinel_url("rediss+sentinel://s1/main").tls
    assert Config(redis_url="redis+sentinel://s1/main").sentinel == SentinelTarget(
        (("s1", 26379),), "main")
    env = Config.from_env({"EXQ_REDIS_SENTINELS": "s1:1,s2:2",
                           "EXQ_REDIS_SENTINEL_SERVICE": "main", "EXQ_REDIS_DB": "2",
                           "EXQ_REDIS_PASSWORD": "pw"})
    assert env.sentinel == SentinelTarget((("s1", 1), ("s2", 2)), "main", 2, None, "pw")
    assert Config().sentinel is None
    # (host, port) pairs are taken too; a redis_url wins over the options (as over host
    # and port), whose values are still checked
    assert Config(redis_sentinels=[("s1", 1)], redis_sentinel_service="m").sentinel == \
        SentinelTarget((("s1", 1),), "m")
    assert Config.from_env({"EXQ_REDIS_SENTINELS": "s1:1", "EXQ_REDIS_SENTINEL_SERVICE": "m"},
                           redis_url="redis://127.0.0.1:6379/0").sentinel is None
    with pytest.raises(ConfigError, match="bad port"):
        Config(redis_url="redis://h:1/0", redis_sentinels="s1:x", redis_sentinel_service="m")


@pytest.mark.parametrize(("options", "option", "why"), [
    ({"redis_url": "redis+sentinel://s1/"}, "redis_url", "no service name"),
    ({"redis_url": "redis+sentinel://u:secret@s1:99999/m"}, "redis_url", "bad port"),
    ({"redis_url": "redis+sentinel://s1/m/x"}, "redis_url", "db must be a number"),
    ({"redis_url": "redis+sentinel://s1/m?db=1"}, "redis_url", "no query string"),
    ({"redis_sentinels": "s1:1"}, "redis_sentinel_service", "name the service"),
    ({"redis_sentinel_service": "m"}, "redis_sentinels", "name the sentinels"),
    ({"redis_sentinels": "s1:x", "redis_sentinel_service": "m"}, "redis_sentinels",
     "bad port"),
])
def test_a_bad_sentinel_setting_fails_naming_the_option(options: dict[str, str], option: str,
                                                       why: str) -> None:
    with pytest.raises(ConfigError, match=why) as raised:
        Config(**options)
    assert raised.value.option == option
    assert "secret" not in str(raised.value)  # a password never shows


def test_every_client_follows_the_master_the_sentinels_name(
        sentinel_setup: SentinelSetup) -> None:
    config = Config(redis_url=sentinel_setup.url, namespace="s" + uuid.uuid4().hex[:10],
                    poll_timeout=10, scheduler_enable=False, node_id="sentinel-node")
    # No silent client retries through Sentinel either (issue 11's rule).
    client = connect(config)
    assert client.get_retry() is not None and client.get_retry()._retries == 0  # type: ignore[union-attr]
    client.close()
    run_twenty_jobs(sentinel_setup, config)


def test_every_client_reaches_the_master_over_tls_through_tls_sentinels(
        tls_sentinel_setup: SentinelSetup) -> None:
    # Given a master, a replica and three sentinels on TLS only (no plaintext port),
    # their certificates signed by a private CA
    setup = tls_sentinel_setup
    assert setup.tls is not None
    ca = str(setup.tls.ca)
    assert setup.url.startswith("rediss+sentinel://")
    # When the clients are given the rediss+sentinel:// URL and the CA
    config = Config(redis_url=setup.url, redis_tls_ca_certs=ca,
                    namespace="s" + uuid.uuid4().hex[:10], poll_timeout=10,
                    scheduler_enable=False, node_id="tls-sentinel-node")
    # Then an Enqueuer, the Api and a node reach the master the sentinels name
    run_twenty_jobs(setup, config)
    # And the same settings from the environment (as the CLI reads them) work too
    from_env = Config.from_env({"REDIS_URL": setup.url, "EXQ_REDIS_TLS_CA_CERTS": ca,
                                "EXQ_NAMESPACE": config.namespace})
    with Enqueuer(from_env) as enqueuer:
        enqueuer.enqueue("default", "S.Job", [20])
    with Api(from_env) as api:
        assert api.queues.queue("default").size() == 1
    # And the CA is checked: without it (the system's CAs) or with plain
    # redis+sentinel://, no sentinel answers and no master is found
    without_ca = Config(redis_url=setup.url, namespace=config.namespace)
    plain = Config(redis_url=setup.url.replace("rediss+", "redis+", 1),
                   redis_tls_ca_certs=ca, namespace=config.namespace)
    for bad, why in ((without_ca, "certificate verify failed"), (plain, "No master found")):
        with pytest.raises(redis.exceptions.ConnectionError, match=why), \
                Enqueuer(bad) as enqueuer:
            enqueuer.enqueue("default", "S.Job", [21])
    with setup.client(setup.master.port) as master:
        assert master.llen(Keys(config.namespace).queue("default")) == 1
        delete_namespace(master, config.namespace)


def run_twenty_jobs(setup: SentinelSetup, config: Config) -> None:
    """Through ``setup``'s sentinels: an Enqueuer writes 20 jobs to the master, the
    Api counts them, a node runs them all and its counter reaches the master."""
    namespace = config.namespace
    master = setup.client(setup.master.port)
    ran: list[int] = []
    try:
        with Enqueuer(config) as enqueuer:
            for n in range(20):
                enqueuer.enqueue("default", "S.Job", [n])
        assert master.llen(Keys(namespace).queue("default")) == 20  # written to the master
        with Api(config) as api:
            assert api.queues.queue("default").size() == 20
        node = Exq(config, workers=Registry({"S.Job": ran.append}))
        node.start()
        try:
            wait_for(lambda: node.acks.totals["processed"] == 20, 15,
                     "20 jobs through Sentinel")
        finally:
            node.stop()
        assert sorted(ran) == list(range(20))
        assert int(master.get(Keys(namespace).stat("processed")) or 0) == 20
    finally:
        master.close()


def test_the_masters_and_the_sentinels_passwords_are_each_used_where_they_belong() -> None:
    # Given a master and replica with a password, and sentinels with one of their own
    setup = SentinelSetup(password="master-pw", sentinel_password="sentinel-pw").start()
    namespace = "s" + uuid.uuid4().hex[:10]
    hosts = ",".join(f"127.0.0.1:{port}" for port in setup.sentinel_ports)
    url = f"redis+sentinel://:master-pw@{hosts}/{SERVICE}/0"
    try:
        # When a client names both (the master's in the URL, the sentinels' as an option)
        config = Config(redis_url=url, namespace=namespace,
                        redis_sentinel_password="sentinel-pw")
        with Enqueuer(config) as enqueuer:
            enqueuer.enqueue("default", "S.Job", [1])
        # Then it reaches the master through the sentinels
        with Api(config) as api:
            assert api.queues.queue("default").size() == 1
        # And a wrong or missing sentinel password finds no master (no password shown)
        for wrong in ("nope", None):
            bad = Config(redis_url=url, namespace=namespace, redis_sentinel_password=wrong)
            with pytest.raises(redis.exceptions.ConnectionError) as raised, \
                    Enqueuer(bad) as enqueuer:
                enqueuer.enqueue("default", "S.Job", [2])
            assert "master-pw" not in str(raised.value)
    finally:
        setup.stop()


RECORDER = '''\
import os

import redis

from exq_fast import worker

_RECORD = redis.Redis.from_url(os.environ["RECORD_URL"])
_KEY = os.environ["RECORD_KEY"]


@worker("Sentinel.Job")
def job(tag):
    _RECORD.rpush(_KEY, tag)
'''


@pytest.mark.slow
def test_a_node_goes_on_with_the_promoted_replica_after_the_master_dies(
        sentinel_setup: SentinelSetup, tmp_path: Path, redis_url: str,
        redis_client: redis.Redis) -> None:
    # Given a node running through the sentinels, recording each execution elsewhere
    namespace = "s" + uuid.uuid4().hex[:10]
    record_key = f"{namespace}:executions"
    processes = RunProcesses(tmp_path, "recorder", RECORDER)
    config = Config(redis_url=sentinel_setup.url, namespace=namespace)
    try:
        node = processes.start("--redis-url", sentinel_setup.url, "--namespace", namespace,
                               "--queue", "default:20", "--workers", "recorder",
                               env={"RECORD_URL": redis_url, "RECORD_KEY": record_key})
        wait_for(lambda: "consuming" in processes.stderr(), 20, "the node's start",
                 detail=processes.stderr)
        before = [f"b{n}" for n in range(3000)]
        with Enqueuer(config) as enqueuer:
            enqueuer.enqueue_all([("default", "Sentinel.Job", [tag]) for tag in before])
        # When the master is killed while the node works through them
        wait_for(lambda: redis_client.llen(record_key) >= 500, 20, "500 jobs run")
        sentinel_setup.kill_master()
        killed_at = redis_client.llen(record_key)
        sentinel_setup.wait_failover()
        # Then jobs enqueued after the failover (through the sentinels, once the new
        # master takes writes) all run exactly once on the promoted replica
        after = [f"a{n}" for n in range(500)]
        enqueue_after_failover(config, after)
        def executed() -> list[str]:
            return [tag.decode() for tag in redis_client.lrange(record_key, 0, -1)]
        wait_for(lambda: set(after) <= set(executed()), 60, "the jobs enqueued after the "
                 "failover", detail=processes.stderr)
        assert node.poll() is None, processes.stderr()
        runs = executed()
        assert sorted(tag for tag in runs if tag.startswith("a")) == sorted(after)
        # And the jobs enqueued before: none lost from the promoted replica's queue
        # (replication was in sync when they were enqueued); duplicates are the jobs
        # whose ack had not reached the replica when the master died
        new_master = redis.Redis(port=sentinel_setup.replica.port)
        keys = Keys(namespace)
        wait_for(lambda: new_master.llen(keys.queue("default")) == 0, 60, "the queue drained")
        lost = set(before) - set(runs)
        duplicates = len([t for t in runs if t.startswith("b")]) - len(set(before) & set(runs))
        print(f"[sentinel] killed after {killed_at} executions; lost {len(lost)}, "
              f"duplicated {duplicates} of {len(before)} enqueued before the failover")
        assert not lost
        new_master.close()
    finally:
        processes.close()
        redis_client.delete(record_key)
        client = connect(config)
        with contextlib.suppress(redis.exceptions.RedisError):
            delete_namespace(client, namespace)
        client.close()


def enqueue_after_failover(config: Config, tags: list[str]) -> None:
    """Enqueue through the sentinels, retrying while the switch is under way."""
    deadline = time.monotonic() + 30
    with Enqueuer(config) as enqueuer:
        while True:
            try:
                enqueuer.enqueue_all([("default", "Sentinel.Job", [tag]) for tag in tags])
                return
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
