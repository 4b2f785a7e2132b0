"""Redis Cluster: a namespace with a hash tag keeps all its keys in one slot, and the
core of exq-fast runs against a real three-master cluster (``tests/cluster.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from exq_fast import Config, Conflict, Enqueuer, Exq, Registry, scripts
from exq_fast.admin import Api
from exq_fast.config import ClusterTarget, ConfigError, parse_cluster_url
from exq_fast.connection import connect
from exq_fast.embedded import delete_namespace, free_port
from exq_fast.keys import Keys
from exq_fast.metrics import ClusterCollector
from tests.cluster import ClusterSetup
from tests.conftest import RunProcesses, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSetup]:
    setup = ClusterSetup().start()
    yield setup
    setup.stop()


@pytest.fixture
def cluster_config(cluster: ClusterSetup) -> Iterator[Config]:
    config = Config(redis_url=cluster.url, namespace="{c" + uuid.uuid4().hex[:10] + "}",
                    poll_timeout=10, scheduler_poll_timeout=50, node_id="cluster-node")
    yield config
    client = connect(config)
    delete_namespace(client, config.namespace)
    client.close()


def test_a_cluster_url_names_nodes_and_credentials_and_wants_a_hash_tag() -> None:
    assert parse_cluster_url("redis+cluster://u:p@h1:7000,h2") == ClusterTarget(
        (("h1", 7000), ("h2", 6379)), "u", "p", False)
    assert parse_cluster_url("rediss+cluster://h1:7000/").tls
    with pytest.raises(ConfigError, match="hash tag") as raised:
        Config(redis_url="redis+cluster://h1:7000")  # namespace "exq": keys on every slot
    assert raised.value.option == "namespace"
    with pytest.raises(ConfigError, match="db 0 only"):
        Config(redis_url="redis+cluster://h1:7000/2", namespace="{exq}")
    assert Config(redis_url="redis+cluster://h1:7000", namespace="{exq}").cluster is not None


def test_enqueue_run_retry_dead_schedule_unique_and_stats_on_a_cluster(
        cluster_config: Config) -> None:
    keys = Keys(cluster_config.namespace)
    ran: list[str] = []

    def job(tag: str) -> None:
        ran.append(tag)
        if tag.startswith("fail"):
            raise RuntimeError(f"planned failure of {tag}")

    # Given jobs enqueued through the cluster client: now, later, in bulk, unique
    with Enqueuer(cluster_config) as enqueuer:
        for n in range(20):
            enqueuer.enqueue("default", "C.Job", [f"ok{n}"])
        enqueuer.enqueue("default", "C.Job", ["fail-retry"])
        enqueuer.enqueue("default", "C.Job", ["fail-dead"], max_retries=0)
        enqueuer.enqueue_in("default", 0.5, "C.Job", ["later"])
        enqueuer.enqueue_all([("other", "C.Job", ["bulk1"]), ("other", "C.Job", ["bulk2"])])
        first = enqueuer.enqueue("default", "C.Job", ["unique"], unique_for=60)
        again = enqueuer.enqueue("default", "C.Job", ["unique"], unique_for=60)
    assert isinstance(again, Conflict) and again.existing_jid == first
    # When a node consumes both queues (fetch, ack, stats batches, scheduler, pings)
    node = Exq(cluster_config.replace(queues=["default", "other"], heartbeat_interval=200),
               workers=Registry({"C.Job": job}))
    node.start()
    try:
        wait_for(lambda: len(ran) >= 26, 20, "every job ran once")
        wait_for(lambda: node.acks.totals == {"processed": 24, "failed": 2}, 10, "the counts")
    finally:
        node.stop()
    # Then each ran once, the failures are in the retry and dead sets, the counters
    # moved, nothing is left in flight, and the Api reads it all
    assert sorted(ran) == sorted([f"ok{n}" for n in range(20)]
                                 + ["fail-retry", "fail-dead", "later", "bulk1", "bulk2",
                                    "unique"])
    api = Api(cluster_config)
    assert api.retries.size() == 1 and api.dead.size() == 1
    assert api.stats.total("processed") == 24 and api.stats.total("failed") == 2
    assert api.queues.sizes() == {"default": 0, "other": 0}
    client = connect(cluster_config)
    figures = {family.name: family.samples[0].value
               for family in ClusterCollector(client, keys).collect() if family.samples}
    assert (figures["exq_retry_set_size"], figures["exq_dead_set_size"],
            figures["exq_processed_jobs"], figures["exq_failed_jobs"]) == (1, 1, 24, 2)
    assert not list(client.scan_iter(match=keys.backups_pattern()))
    # And every key of the namespace lives in one slot
    names = list(client.scan_iter(match=keys.all_keys_pattern()))
    slots = {client.keyslot(name) for name in names}  # type: ignore[attr-defined]
    assert len(names) > 5 and len(slots) == 1
    client.close()


SLOW = '''\
import time

from exq_fast import worker


@worker("C.Slow")
def slow(seconds):
    time.sleep(seconds)
'''


def test_a_killed_nodes_jobs_are_recovered_by_another_on_a_cluster(
        cluster_config: Config, tmp_path: Path) -> None:
    # Given a node (a process) running two long jobs through the cluster
    processes = RunProcesses(tmp_path, "slowjobs", SLOW)
    args = ("--redis-url", cluster_config.redis_url or "", "--namespace",
            cluster_config.namespace, "--queue", "default:5", "--workers", "slowjobs")
    try:
        first = processes.start(*args, "--node-id", "victim")
        with Enqueuer(cluster_config) as enqueuer:
            for _ in range(2):
                enqueuer.enqueue("default", "C.Slow", [30])
        api = Api(cluster_config)
        wait_for(lambda: api.stats.summary().busy == 2, 20, "two jobs running",
                 detail=processes.stderr)
        # When it is killed, and another node starts on the same host
        first.kill()
        first.wait(10)
        processes.start(*args, "--node-id", "rescuer")
        # Then the rescuer recovers the dead node's backup list and runs the jobs
        keys = Keys(cluster_config.namespace)
        client = connect(cluster_config)
        wait_for(lambda: client.llen(keys.backup("rescuer", "default")) == 2, 30,
                 "the jobs fetched again by the rescuer", detail=processes.stderr)
        assert not client.exists(keys.backup("victim", "default"))
        client.close()
    finally:
        processes.close()


def test_the_cli_reads_a_cluster(cluster_config: Config) -> None:
    with Enqueuer(cluster_config) as enqueuer:
        enqueuer.enqueue("default", "C.Job", ["x"])
        enqueuer.enqueue_in("default", 3600, "C.Job", ["later"])

    def cli(*verb: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "exq_fast", *verb, "--redis-url",
             cluster_config.redis_url or "", "--namespace", cluster_config.namespace],
            capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, (verb, done.stderr)
        return done.stdout

    assert "default" in cli("queues") and "1" in cli("queues")
    assert "C.Job" in cli("scheduled")
    for verb in (("stats",), ("retries",), ("dead",), ("processes",), ("backups",)):
        cli(*verb)
    assert "C.Job" in cli("jobs", "default")


_KEY_ARG = re.compile(r"redis\.p?call\((?:'[A-Z]+'|command),\s*([^,)]+)")


def test_every_script_names_every_key_it_touches_in_keys() -> None:
    # A cluster (or a proxy in front of one) routes a script by its KEYS: a key built
    # inside the script, or passed in ARGV, is one it cannot see
    for script in scripts.ALL:
        source = script.source
        assert ".." not in source, f"a script builds a string (a key?):\n{source}"
        for expression in _KEY_ARG.findall(source):
            name = expression.strip()
            if name.startswith("KEYS["):
                continue
            if name == "key" and "local function held_by(key" in source:
                continue  # held_by's parameter: called with KEYS entries only
            assignment = re.search(rf"\b{re.escape(name)}\b[^\n]*=[^\n]*KEYS\[", source)
            assert assignment, f"{name!r} is not taken from KEYS in:\n{source}"


def test_an_unreachable_cluster_or_sentinel_is_one_line_naming_where(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXQ_") and k != "REDIS_URL"}
    port = free_port()
    cases = [
        (["--redis-url", f"redis+cluster://127.0.0.1:{port}", "--namespace", "{x}"], {},
         f"redis+cluster://127.0.0.1:{port}", "--redis-url"),
        ([], {"EXQ_REDIS_SENTINELS": f"127.0.0.1:{port}", "EXQ_REDIS_SENTINEL_SERVICE": "m"},
         f"the master of 'm' (sentinels 127.0.0.1:{port})", "EXQ_REDIS_SENTINELS"),
    ]
    for flags, extra, where, hint in cases:
        done = subprocess.run([sys.executable, "-m", "exq_fast", "stats", *flags],
                              env={**env, **extra}, capture_output=True, text=True, timeout=30,
                              check=False, cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"error: cannot reach Redis at {where}: "), lines[0]
        assert hint in lines[0] and "<redis." not in lines[0]
