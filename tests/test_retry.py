"""Exq's retry rules: the dead rule, Sidekiq backoff, dead-set trimming."""

from __future__ import annotations

import json

import pytest
import redis

from exq_fast.job import decode, encode
from exq_fast.keys import Keys
from exq_fast.retry import (
    REENCODED_FIELDS,
    dead_commands,
    dead_payload,
    is_dead,
    retry_commands,
    sidekiq_backoff,
)
from tests.conftest import fixture_lines


def job(retry: object, retry_count: object = None) -> bytes:
    data = {"class": "W", "args": [], "jid": "j", "queue": "q", "retry": retry}
    if retry_count is not None:
        data["retry_count"] = retry_count
    return encode(data)


@pytest.mark.parametrize(
    ("retry", "retry_count", "dead"),
    [
        (3, None, False), (3, 2, False), (3, 3, True), (1, 0, False), (1, 1, True),
        (True, 24, False), (True, 25, True), (False, None, True), (0, None, True),
        (-1, None, True), (None, None, True), ("5", None, True),
    ],
)
def test_dead_rule(retry: object, retry_count: object, dead: bool) -> None:
    assert is_dead(decode(job(retry, retry_count)), max_retries=25) is dead


def test_sidekiq_backoff_range() -> None:
    first = [sidekiq_backoff(decode(job(25))) for _ in range(500)]
    assert min(first) >= 16 and max(first) <= 76
    assert all(isinstance(d, float) for d in first)
    fifth = [sidekiq_backoff(decode(job(25, 4))) for _ in range(200)]
    assert min(fifth) >= 5**4 + 15 and max(fifth) <= 5**4 + 15 + 30 * 6


def test_retry_entry_has_exqs_fields_and_keeps_unknown_ones() -> None:
    raw = fixture_lines("sidekiq-6.4.1/enqueued.jsonl")[7]
    [(_, key, score, payload)] = retry_commands(Keys("exq"), decode(raw), "ValueError", "bad",
                                                delay=20.0, now=1000.0)
    data = json.loads(payload)
    assert key == "exq:retry" and float(score) == 1020.0
    assert set(REENCODED_FIELDS) <= set(data)
    assert data["retry_count"] == 1 and data["error_class"] == "ValueError"
    assert data["failed_at"] == data["retried_at"] == 1000.0
    assert data["tags"] == ["a"] and data["bid"] == "b-1" and data["custom"] == {"x": 1}
    again = json.loads(retry_commands(Keys("exq"), decode(payload), "ValueError", "bad",
                                      delay=1.0, now=2000.0)[0][3])
    assert again["retry_count"] == 2
    assert again["failed_at"] == 1000.0 and again["retried_at"] == 2000.0


def test_retry_fixture_entries_keep_their_key_set() -> None:
    exq = json.loads(json.loads(fixture_lines("exq-0.23.0/retry.jsonl")[0])["member"])
    data = json.loads(retry_commands(Keys("x"), decode(encode(
        {k: exq[k] for k in ("args", "class", "enqueued_at", "jid", "queue", "retry")}
    )), "RuntimeError", "boom", 10.0)[0][3])
    assert set(data) == set(exq)


def test_dead_entry_keeps_retry_count() -> None:
    data = json.loads(dead_payload(decode(job(0)), "RuntimeError", "boom", now=5.0))
    assert data["retry_count"] == 0 and data["error_class"] == "RuntimeError"


@pytest.mark.parametrize(("max_jobs", "kept"), [(3, 3), (0, 0), (100, 5)])
def test_dead_set_trimmed_by_size(redis_client: redis.Redis, keys: Keys, max_jobs: int,
                                  kept: int) -> None:
    for i in range(5):
        pipe = redis_client.pipeline()
        for command in dead_commands(keys, b"job%d" % i, max_jobs, 3600, now=1000.0 + i):
            pipe.execute_command(*command)
        pipe.execute()
    members = redis_client.zrange(keys.dead, 0, -1)
    assert len(members) == kept
    assert members == [b"job%d" % i for i in range(5 - kept, 5)]  # the newest are kept


def test_dead_set_trimmed_by_age(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.zadd(keys.dead, {b"old": 100.0, b"young": 950.0})
    pipe = redis_client.pipeline()
    for command in dead_commands(keys, b"new", 10000, 100, now=1000.0):
        pipe.execute_command(*command)
    pipe.execute()
    assert redis_client.zrange(keys.dead, 0, -1) == [b"young", b"new"]
