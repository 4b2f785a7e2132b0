"""Key names: both prefix rules, backup and stat keys, byte for byte as Exq writes them."""

from __future__ import annotations

import calendar
import time

import pytest

from exq_fast.keys import Keys, day_suffix, second_suffix
from tests.conftest import fixture_json

AT = calendar.timegm((2016, 1, 7, 13, 30, 0)) + 0.75


def test_named_namespace_matches_wire_worked_example() -> None:
    keys = Keys("exq")
    assert keys.queues == "exq:queues"
    assert keys.queue("default") == "exq:queue:default"
    assert keys.backup("web1", "default") == "exq:queue:backup::web1::default"
    assert (keys.schedule, keys.retry, keys.dead) == ("exq:schedule", "exq:retry", "exq:dead")
    assert keys.stat("processed") == "exq:stat:processed"
    assert keys.stat_day("failed", AT) == "exq:stat:failed:2016-01-07"
    assert keys.stat_rt("processed", AT) == "exq:stat:processed_rt:2016-01-07 13:30:00Z"
    assert keys.processes == "exq:processes"
    assert keys.node("web1") == "exq:web1"
    assert keys.signals("web1") == "exq:web1-signals"
    assert keys.workers("web1") == "exq:web1:workers"
    assert keys.heartbeats == "exq:heartbeats"
    assert keys.unique("abc=") == "exq:unique:abc="


@pytest.mark.parametrize("namespace", ["", None])
def test_empty_namespace_uses_p_and_r_rules(namespace: str | None) -> None:
    keys = Keys(namespace)
    assert keys.queues == "queues"
    assert keys.queue("default") == "queue:default"
    assert keys.backup("web1", "default") == "queue:backup::web1::default"
    assert keys.stat("failed") == "stat:failed"
    assert keys.workers("web1") == "web1:workers"
    assert keys.unique("t") == "unique:t"
    # R(): Exq's quirk, a leading colon.
    assert keys.processes == ":processes"
    assert keys.node("web1") == ":web1"
    assert keys.signals("web1") == ":web1-signals"
    assert keys.heartbeats == ":heartbeats"
    # Sidekiq's registry is un-prefixed.
    assert keys.sidekiq_processes == "processes"
    assert keys.sidekiq_work("host:1:abc") == "host:1:abc:work"


def test_suffix_formats() -> None:
    assert day_suffix(AT) == "2016-01-07"
    assert second_suffix(AT) == "2016-01-07 13:30:00Z"


def test_stat_keys_have_the_names_exq_wrote() -> None:
    stats = fixture_json("exq-0.23.0/stats.json")
    keys = Keys(stats["namespace"])
    names = set(stats["stat_keys"])
    assert {keys.stat("processed"), keys.stat("failed")} <= names
    assert keys.stat_day("processed", stats["captured_at_unix"]) in names
    rt_names = [n for n in names if "_rt:" in n]
    assert len(rt_names) == 2
    for name in rt_names:
        kind = "processed" if "processed_rt" in name else "failed"
        at = calendar.timegm(time.strptime(name.split("_rt:")[1], "%Y-%m-%d %H:%M:%SZ"))
        assert keys.stat_rt(kind, at + 0.999) == name


def test_backup_key_matches_inflight_fixture() -> None:
    inflight = fixture_json("exq-0.23.0/inflight.json")
    keys = Keys("fx23i")
    assert keys.backup("vm", "fxq") in inflight["key_names"]
    assert keys.workers("vm") in inflight["key_names"]
    assert keys.node("vm") in inflight["key_names"]


def test_glob_patterns_escape_special_characters() -> None:
    keys = Keys("a*b")
    assert keys.all_keys_pattern() == "a\\*b:*"
    assert keys.backup_pattern("n?") == "a\\*b:queue:backup::n\\?::*"
    with pytest.raises(ValueError):
        Keys("").all_keys_pattern()
