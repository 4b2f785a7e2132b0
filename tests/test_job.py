"""The job codec: every real payload decodes; bad ones raise one typed error."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exq_fast import job as jobmod
from exq_fast.job import InvalidJob, decode, encode, normalize_class, to_seconds
from tests.conftest import FIXTURES, fixture_json, fixture_lines, fixture_members

LIST_FIXTURES = [
    "exq-0.13.2/enqueued.jsonl",
    "exq-0.13.2/requeued.jsonl",
    "exq-0.23.0/enqueued.jsonl",
    "exq-0.23.0/requeued.jsonl",
    "sidekiq-6.4.1/enqueued.jsonl",
]
ZSET_FIXTURES = sorted(
    str(p.relative_to(FIXTURES))
    for name in ("scheduled", "retry", "dead")
    for p in FIXTURES.glob(f"*/{name}.jsonl")
)


def all_fixture_payloads() -> list[bytes]:
    payloads = [line for path in LIST_FIXTURES for line in fixture_lines(path)]
    payloads += [member for path in ZSET_FIXTURES for member, _ in fixture_members(path)]
    for version in ("exq-0.13.2", "exq-0.23.0"):
        inflight = fixture_json(f"{version}/inflight.json")
        payloads += [m.encode() for m in inflight["backup_list"]["members_lrange_order"]]
    return payloads


def test_fixture_sets_are_all_found() -> None:
    assert len(ZSET_FIXTURES) == 9
    assert len(all_fixture_payloads()) > 60


@pytest.mark.parametrize("raw", all_fixture_payloads(), ids=lambda raw: raw[:40].decode())
def test_every_fixture_payload_decodes(raw: bytes) -> None:
    expected = json.loads(raw)
    job = decode(raw)
    assert job.raw == raw
    assert job.job_class == expected["class"]
    assert job.jid == expected["jid"]
    assert job.queue == expected["queue"]
    assert job.args == expected["args"]
    assert decode(raw).args == expected["args"]
    assert job.retry_count == (expected.get("retry_count") or 0)
    assert job.to_dict() == expected


def test_sidekiq_retry_values_and_ruby_class_names() -> None:
    jobs = [decode(line) for line in fixture_lines("sidekiq-6.4.1/enqueued.jsonl")]
    assert [j.retry for j in jobs[:5]] == [True, True, True, False, 5]
    assert jobs[5].job_class == "MyApp::HardWorker"
    assert jobs[5].worker_name == "MyApp.HardWorker"


def test_unique_fields_are_read() -> None:
    jobs = [decode(line) for line in fixture_lines("exq-0.23.0/enqueued.jsonl")]
    assert (jobs[9].unique_until, jobs[10].unique_until) == ("success", "start")
    assert jobs[9].unique_token == "98OCaDOqkjn0Ul8vFYvhelCFtkdYlUAdwoMYoCCFyXY="
    assert jobs[0].unique_until is None and jobs[0].unique_token is None


def test_escapes_and_raw_u2028_survive() -> None:
    raw = fixture_lines("exq-0.23.0/enqueued.jsonl")[2]
    args = decode(raw).args
    assert args[0] == "quote\" backslash\\ slash/ newline\n tab\t ctrl\x01 del\x7f ls\u2028 emoji😀"
    assert args[1:5] == [1.0, -7, 0.1, 1e20]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MyApp.Worker", "MyApp.Worker"),
        ("Elixir.MyApp.Worker", "MyApp.Worker"),
        ("MyApp::HardWorker", "MyApp.HardWorker"),
        ("MyWorker/perform", "MyWorker"),
        ("Elixir.A::B/custom", "A.B"),
    ],
)
def test_class_names_normalise_as_exq(name: str, expected: str) -> None:
    assert normalize_class(name) == expected


def test_sidekiq8_millisecond_timestamps_are_read_as_seconds() -> None:
    raw = (b'{"class":"W","args":[],"jid":"x",'
           b'"enqueued_at":1795868881639,"created_at":1795868881000}')
    job = decode(raw)
    assert job.enqueued_at == pytest.approx(1795868881.639)
    assert to_seconds(1795868881.5) == 1795868881.5
    assert to_seconds(True) is None
    reencoded = json.loads(job.reencode({"retry_count": 1}))
    assert reencoded["created_at"] == 1795868881.0
    assert isinstance(reencoded["enqueued_at"], float)


def test_reencode_keeps_unknown_sidekiq_fields_in_order() -> None:
    raw = fixture_lines("sidekiq-6.4.1/enqueued.jsonl")[7]
    original = json.loads(raw)
    out = decode(raw).reencode({"retry_count": 1, "error_message": "boom"})
    data = json.loads(out)
    assert data["tags"] == ["a"] and data["bid"] == "b-1" and data["custom"] == {"x": 1}
    assert list(data)[: len(original)] == list(original)
    assert data["retry_count"] == 1 and data["error_message"] == "boom"
    assert b" " not in out.replace(b"b-1", b"")[:20]  # compact


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"class":"W","args":[]', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1,2]", "not a JSON object (got array)"),
        (b'"text"', "not a JSON object (got string)"),
        (b"null", "not a JSON object (got null)"),
        (b'{"args":[]}', "no class"),
        (b'{"class":1,"args":[]}', "class is not a string"),
        (b'{"class":"","args":[]}', "class is not a string"),
        (b'{"class":"W"}', "no args"),
        (b'{"class":"W","args":{"a":1}}', "args is not a list"),
        (b'{"class":"W","args":"x"}', "args is not a list"),
        (b'{"class":"W","args":[NaN]}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
)
def test_malformed_payloads_raise_invalid_job(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidJob) as info:
        decode(raw)
    assert reason in info.value.reason
    assert info.value.raw == raw
    # The parser is usable afterwards.
    assert decode(b'{"class":"W","args":[1]}').args == [1]


def test_integers_beyond_64_bits_fall_back_to_the_stdlib_parser() -> None:
    raw = b'{"class":"W","args":[123456789012345678901234567890],"jid":"j"}'
    assert decode(raw).args == [123456789012345678901234567890]
    assert decode(raw).args == [123456789012345678901234567890]


def test_a_live_proxy_does_not_break_the_next_decode() -> None:
    held = jobmod._parser().parse(b'{"a":[1,2]}')  # a caller keeps a proxy alive
    assert decode(b'{"class":"W","args":[3]}').args == [3]
    del held


def test_decoding_in_many_threads() -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                raw = encode({"class": "W", "args": [n, i], "jid": f"{n}-{i}"})
                job = decode(raw)
                assert job.args == [n, i] and job.jid == f"{n}-{i}"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=6))
def test_args_round_trip(args: list[Any]) -> None:
    raw = encode({"args": args, "class": "W", "jid": "j", "queue": "q", "retry": 25})
    assert decode(raw).args == args
    assert decode(raw).args == args
    assert json.loads(decode(raw).reencode({})) == json.loads(raw)


@pytest.mark.parametrize("raw", [
    b'{"class":"W","args":[],"retry_count":1e400,"enqueued_at":1e400}',
    b'{"class":"W","args":[],"retry_count":-1e400,"enqueued_at":-1e400}',
    b'{"class":"W","args":[],"retry_count":1e308,"enqueued_at":' + b"9" * 400 + b"}",
])
def test_numbers_no_int_or_date_can_hold_read_as_junk(raw: bytes) -> None:
    job = decode(raw)
    assert job.retry_count in (0, int(1e308))
    assert job.enqueued_at is None
