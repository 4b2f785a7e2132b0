"""Bad input at scale: a live node fed thousands of malformed payloads, and the codec fuzzed.

The corpus is generated deterministically (a seeded ``random.Random``) and
classified up front by ``exq_fast.job.decode`` itself: a payload it refuses
(``InvalidJob``) must reach the dead set wrapped as ``ExqFast.InvalidPayload``
with its bytes kept verbatim (or as ``payload_base64``); a payload it accepts
names an unregistered class and follows the retry rule as "unknown worker"
(``UnknownWorker``): the retry set when its ``retry`` field allows one, else
the dead set.
Valid jobs are interleaved and must each run exactly once. Every decodable
malformed payload carries a unique ``fuzz_id`` field (re-encoding keeps unknown
fields), which is how its dead entry is found again.

Some payloads decode but cannot be written back as JSON (a number that
overflowed to infinity, nesting just under simdjson's depth limit): the codec
refuses to re-encode them with ValueError / RecursionError, and the worker
then keeps their bytes verbatim in a dead wrapper. The corpus includes them;
the re-encoding property test leaves exactly them out.
"""

from __future__ import annotations

import base64
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from exq_fast import Config, Exq
from exq_fast.job import InvalidJob, Job, decode, normalize_class
from exq_fast.keys import Keys, StatKind
from exq_fast.outcome import INVALID_CLASS
from exq_fast.retry import is_dead
from tests.conftest import wait_for

QUEUE = "fuzz"
RECORD = "Fuzz.Record"
"""The one registered worker: it records its first argument (the job's tag)."""
UNKNOWN = "Fuzz.NotAWorker"
"""The class every decodable malformed payload names: never registered."""
SEED = 20240601
ConfigFactory = Callable[..., Config]

HUGE_STRING = 1_100_000
HUGE_LIST = 100_000
DEEP = 10_000
MIN_MALFORMED = 3000

BAD_VALUES: list[Any] = [
    0, -1, 1.5, -0.0, 1e300, 2**70, "", "str", "5", {}, {"a": [1]}, [], [1, "x"], None, True,
    False,
]
"""Wrong-typed values for each field: numbers, strings, objects, arrays, null, booleans."""

TYPED_FIELDS = ["class", "args", "jid", "retry", "queue", "enqueued_at", "retry_count",
                "unique_until", "unique_token"]

INVALID_UTF8 = [
    b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xc3\x28", b"\xa0\xa1",
    b"\xe2\x28\xa1", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"\xf0\x90\x28\xbc", b"\xed\xa0\x80",
    b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80",
]
"""Stray continuation bytes, overlong forms, encoded surrogates, code points past U+10FFFF."""

NON_FINITE = ["NaN", "Infinity", "-Infinity", "nan", "inf", "-inf", "+Infinity", "-NaN"]

WHITESPACE = [b"", b" ", b"\n", b"\t", b"\r\n", b" \t\r\n" * 200, b"\x0b", b"\x0c",
              b"\xc2\xa0", b"\xe2\x80\x8b", b"\xe3\x80\x80", b"\x00", b"\x00" * 64]

BOM_UTF8 = b"\xef\xbb\xbf"


# -- helpers ---------------------------------------------------------------------------



def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def classify(raw: bytes) -> Job | None:
    """``decode`` (eager and lazy): the Job, or None for InvalidJob. Anything else escapes."""
    try:
        lazy = decode(raw)
    except InvalidJob:
        lazy = None
    try:
        job = decode(raw)
    except InvalidJob:
        job = None
    assert (lazy is None) == (job is None), f"eager and lazy decode disagree on {raw[:80]!r}"
    return job


def bracket_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (a scan: no recursion limit)."""
    deepest = depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def has_non_finite(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


def unencodable(raw: bytes) -> bool:
    """Payloads that decode but have no JSON re-encoding: numbers that overflow
    to infinity, and nesting just under simdjson's depth limit."""
    if bracket_depth(raw) > 900:
        return True
    try:
        data = json.loads(raw, parse_constant=lambda name: None)
    except (ValueError, RecursionError):
        return False
    return has_non_finite(data)


def stat(client: redis.Redis, keys: Keys, kind: StatKind) -> int:
    value = client.get(keys.stat(kind))
    return int(value) if value is not None else 0


# -- the corpus ----------------------------------------------------------------------------


@dataclass
class Corpus:
    """The generated payloads, classified by ``decode``."""

    rng: random.Random
    valid: dict[str, bytes] = field(default_factory=dict)
    """tag -> payload running the registered worker with the tag as first argument."""
    invalid: list[bytes] = field(default_factory=list)
    """Payloads ``decode`` refuses."""
    unknown: dict[int, bytes] = field(default_factory=dict)
    unencodable: list[bytes] = field(default_factory=list)
    """fuzz_id -> decodable payload naming no registered worker."""
    families: Counter[str] = field(default_factory=Counter)
    _next_id: int = 0

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def malformed(self, family: str, raw: bytes) -> None:
        """Add a payload meant to be refused, whether ``decode`` refuses it or not."""
        job = classify(raw)
        if job is None:
            self.invalid.append(raw)
        elif unencodable(raw):
            self.unencodable.append(raw)  # buried verbatim: no JSON form to re-encode
        else:
            assert normalize_class(job.job_class) != RECORD, f"{family} runs: {raw[:80]!r}"
            assert isinstance(job.args, list)
            fuzz_id = json.loads(raw).get("fuzz_id")
            if not isinstance(fuzz_id, int) or fuzz_id in self.unknown:
                return  # a random mutation that cannot be told apart: not kept
            self.unknown[fuzz_id] = raw
        self.families[family] += 1

    def valid_job(self, make: Callable[[str], bytes]) -> None:
        tag = f"v{len(self.valid)}-{self.rng.getrandbits(32):08x}"
        raw = make(tag)
        job = classify(raw)
        assert job is not None and normalize_class(job.job_class) == RECORD, raw[:80]
        assert job.args[0] == tag
        self.valid[tag] = raw

    @property
    def malformed_count(self) -> int:
        return len(self.invalid) + len(self.unknown) + len(self.unencodable)

    def retried(self, max_retries: int) -> set[int]:
        """The fuzz_ids of the unknown-class payloads the retry rule sends to the retry set."""
        return {fuzz_id for fuzz_id, raw in self.unknown.items()
                if not is_dead(decode(raw), max_retries)}

    def shuffled(self) -> list[bytes]:
        payloads = [*self.valid.values(), *self.invalid, *self.unknown.values(),
                    *self.unencodable]
        self.rng.shuffle(payloads)
        return payloads


def base_job(corpus: Corpus, **fields: Any) -> dict[str, Any]:
    """A complete job naming the unknown class, with a fresh ``fuzz_id``."""
    job: dict[str, Any] = {
        "class": UNKNOWN, "args": [1, "two", {"k": [None, True, 2.5]}], "jid": "j",
        "queue": QUEUE, "retry": 3, "retry_count": 0, "enqueued_at": 1700000000.123456,
        "fuzz_id": corpus.new_id(),
    }
    job.update(fields)
    return job


def add_truncations(corpus: Corpus) -> None:
    """Every cut length of a few valid-looking jobs (ASCII, multi-byte UTF-8, Sidekiq)."""
    shapes = [
        base_job(corpus),
        base_job(corpus, args=["h\u00e9llo \u2713 \u65e5\u672c \U0001f600", [1, [2, [3]]]]),
        base_job(corpus, jid="3f1c1d6e-8c3b-4c44-9e5d-2b1f0c7a9e11", created_at=1700000000.5,
                 unique_until="success", unique_token="tok", error_message=None),
        base_job(corpus, **{"class": "Elixir.Fuzz.NotAWorker", "args": [{"n": -1.5e-5}]}),
        {"class": RECORD, "args": ["would-run"], "jid": "t", "queue": QUEUE},
    ]
    for shape in shapes:
        full = dumps(shape)
        for cut in range(len(full)):
            corpus.malformed("truncated", full[:cut])


def add_wrong_types(corpus: Corpus) -> None:
    for name in TYPED_FIELDS:
        for value in BAD_VALUES:
            corpus.malformed("wrong type", dumps(base_job(corpus, **{name: value})))
        missing = base_job(corpus)
        missing.pop(name, None)
        corpus.malformed("missing field", dumps(missing))


def add_huge(corpus: Corpus) -> None:
    text = dumps(base_job(corpus, args=["x" * HUGE_STRING]))
    corpus.malformed("huge", text)
    corpus.malformed("huge", dumps(base_job(corpus, args=list(range(HUGE_LIST)))))
    corpus.malformed("huge", dumps(base_job(corpus, args=[{"k": "v" * 20}] * (HUGE_LIST // 10))))
    corpus.malformed("huge", dumps(base_job(corpus, **{"class": "C" * HUGE_STRING})))
    corpus.malformed("huge", text[: len(text) // 2])
    corpus.malformed("huge", text[: len(text) // 2] + b"\xff" + text[len(text) // 2:])
    corpus.malformed("huge", dumps(base_job(corpus, args="a" * HUGE_STRING)))


def add_invalid_utf8(corpus: Corpus) -> None:
    for bad in INVALID_UTF8:
        text = bad.hex()
        templates = [
            b'{"class":"Fuzz.' + bad + b'","args":[],"fuzz_id":1}',
            b'{"class":"' + UNKNOWN.encode() + b'","args":["' + bad + b'"]}',
            b'{"class":"' + UNKNOWN.encode() + b'","args":[],"' + bad + b'":1}',
            b'{"class":"' + UNKNOWN.encode() + b'","args":[]' + bad + b"}",
            bad + dumps(base_job(corpus)),
            dumps(base_job(corpus)) + bad,
            bad * 7,
            text.encode() + bad,
        ]
        for raw in templates:
            corpus.malformed("invalid utf-8", raw)
    for size in (1, 2, 3, 7, 64, 1000, 70_000):
        for _ in range(3):
            corpus.malformed("random bytes", corpus.rng.randbytes(size))


def add_deep(corpus: Corpus) -> None:
    cls = UNKNOWN.encode()
    for depth in (2000, 5000, DEEP):
        corpus.malformed("deep", b"[" * depth + b"]" * depth)
        corpus.malformed("deep", b'{"a":' * depth + b"1" + b"}" * depth)
        corpus.malformed("deep", b'{"class":"' + cls + b'","args":' + b"[" * depth
                         + b"]" * depth + b"}")
        corpus.malformed("deep", b'{"class":"' + cls + b'","args":[' + b'{"a":' * depth
                         + b"1" + b"}" * depth + b"]}")
        corpus.malformed("deep", b'{"class":' + b"[" * depth + b"]" * depth + b',"args":[]}')
        corpus.malformed("deep", b"[" * depth)
        corpus.malformed("deep", b"]" * depth + b"[" * depth)


def add_non_finite(corpus: Corpus) -> None:
    for literal in NON_FINITE:
        word = literal.encode()
        cls = UNKNOWN.encode()
        corpus.malformed("nan/inf", word)
        corpus.malformed("nan/inf", b'{"class":"' + cls + b'","args":[' + word + b"]}")
        for name in (b"retry", b"enqueued_at", b"retry_count", b"jid"):
            corpus.malformed("nan/inf", b'{"class":"' + cls + b'","args":[],"' + name + b'":'
                             + word + b"}")


def add_boms(corpus: Corpus) -> None:
    def text() -> str:
        return json.dumps(base_job(corpus, args=["\u00e9"]))

    variants = [
        BOM_UTF8 + dumps(base_job(corpus)),
        BOM_UTF8 * 2 + dumps(base_job(corpus)),
        dumps(base_job(corpus)) + BOM_UTF8,
        b'{"class":' + BOM_UTF8 + b'"' + UNKNOWN.encode() + b'","args":[]}',
        BOM_UTF8,
        b"\xfe\xff",
        b"\xff\xfe",
        BOM_UTF8 + b"  " + dumps(base_job(corpus)),
    ]
    for raw in variants:
        corpus.malformed("bom", raw)
    # UTF-16/32, with and without a BOM: not UTF-8, so refused.
    for codec in ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]:
        corpus.malformed("utf-16/32", text().encode(codec))
    for bom, codec in [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")]:
        corpus.malformed("utf-16/32", bom + text().encode(codec))
        corpus.malformed("utf-16/32", bom + dumps(base_job(corpus)))


def add_whitespace_and_syntax(corpus: Corpus) -> None:
    cls = UNKNOWN.encode()
    for raw in WHITESPACE:
        corpus.malformed("empty/whitespace", raw)
        corpus.malformed("empty/whitespace", raw + dumps(base_job(corpus)) + raw)
    for raw in [b"null", b"true", b"false", b"0", b"-1.5e3", b'"str"', b"[]", b"{}", b'""',
                b'[{"class":"' + cls + b'","args":[]}]', b'"{\\"class\\":\\"X\\"}"']:
        corpus.malformed("not an object", raw)
    for raw in [
        b'{"class":"' + cls + b'","args":[],}',
        b"{'class':'" + cls + b"','args':[]}",
        b'{class:"' + cls + b'",args:[]}',
        b'{"class":"' + cls + b'","args":[]} // comment',
        b'/* c */{"class":"' + cls + b'","args":[]}',
        b'{"class":"' + cls + b'","args":[]}{"class":"' + cls + b'","args":[]}',
        b'{"class":"' + cls + b'","args":[]}x',
        b'{"class":"' + cls + b'\x01","args":[]}',
        b'{"class":"' + cls + b'","args":["\\x41"]}',
        b'{"class":"' + cls + b'","args":["\\u12"]}',
        b'{"class":"' + cls + b'","args":[01]}',
        b'{"class":"' + cls + b'","args":[1.]}',
        b'{"class":"' + cls + b'","args":[.5]}',
        b'{"class":"' + cls + b'","args":[0x10]}',
        b'{"class":"' + cls + b'","args":[undefined]}',
        b'{"class":"' + cls + b'","args":[' + b"9" * 5000 + b"]}",
        b'{"class" "' + cls + b'","args":[]}',
        b'{"class":"' + cls + b'";"args":[]}',
    ]:
        corpus.malformed("syntax", raw)
    # Odd but decodable: escapes, lone surrogates, NULs, big integers, tiny floats.
    for arg in [b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b'"a\x00b"',
                b"18446744073709551616", b"-1208925819614629174706176", b"1e-400", b"-0"]:
        corpus.malformed("odd escapes", b'{"class":"' + cls + b'","args":[' + arg
                         + b'],"fuzz_id":' + str(corpus.new_id()).encode() + b"}")


def add_duplicate_keys(corpus: Corpus) -> None:
    cls = json.dumps(UNKNOWN)
    for pair in [
        f'"class":{cls},"class":"Other.Unknown","args":[]',
        f'"class":{cls},"args":[1],"args":[2]',
        f'"class":{cls},"args":[1],"args":5',
        f'"class":{cls},"args":5,"args":[1]',
        f'"class":{cls},"class":5,"args":[]',
        f'"class":5,"class":{cls},"args":[]',
        f'"class":{cls},"args":[],"jid":"a","jid":"b","retry":1,"retry":"x"',
        f'"class":{cls},"args":[],"retry":true,"retry":false,"queue":1,"queue":"q"',
    ]:
        corpus.malformed("duplicate keys", ("{" + pair + f',"fuzz_id":{corpus.new_id()}}}')
                         .encode())


def add_mutations(corpus: Corpus, count: int) -> None:
    """Random single edits of valid-looking jobs: flips, inserts, deletions, splices."""
    rng = corpus.rng
    alphabet = b'{}[]":,\\ 0123456789.eE+-tfnuxa\x00\xff\xc3'
    for _ in range(count):
        raw = bytearray(dumps(base_job(corpus, args=[rng.random(), "s" * rng.randrange(20)])))
        pos = rng.randrange(len(raw))
        edit = rng.randrange(4)
        if edit == 0:
            raw[pos] = rng.choice(alphabet)
        elif edit == 1:
            raw.insert(pos, rng.choice(alphabet))
        elif edit == 2:
            del raw[pos:pos + rng.randrange(1, 8)]
        else:
            start = rng.randrange(len(raw))
            raw[pos:pos] = raw[start:start + rng.randrange(1, 16)]
        corpus.malformed("mutation", bytes(raw))


def add_valid(corpus: Corpus, count: int) -> None:
    def plain(tag: str) -> bytes:
        return dumps({"class": RECORD, "args": [tag], "jid": tag, "queue": QUEUE,
                      "retry": 0, "enqueued_at": time.time()})

    variants: list[Callable[[str], bytes]] = [
        plain,
        lambda tag: dumps({"class": "Elixir." + RECORD, "args": [tag, {"n": [1, None]}]}),
        lambda tag: dumps({"class": "Fuzz::Record", "args": [tag], "retry": "odd",
                           "enqueued_at": 1700000000123, "extra": {"kept": True}}),
        lambda tag: BOM_UTF8 + dumps({"class": RECORD, "args": [tag], "jid": 5, "queue": [],
                                      "retry_count": "x", "enqueued_at": "yesterday"}),
        lambda tag: b' \n{"class" : "Fuzz.Record/perform" , "args" : ["' + tag.encode()
        + b'", 1e-3, 123456789012345678901234567890 ] }\t',
    ]
    for index in range(count):
        corpus.valid_job(variants[index % len(variants)])
    corpus.valid_job(lambda tag: dumps({"class": RECORD, "args": [tag, "y" * HUGE_STRING]}))
    corpus.valid_job(lambda tag: dumps({"class": RECORD, "args": [tag, *range(HUGE_LIST)]}))


def build_corpus() -> Corpus:
    corpus = Corpus(random.Random(SEED))
    add_truncations(corpus)
    add_wrong_types(corpus)
    add_huge(corpus)
    add_invalid_utf8(corpus)
    add_deep(corpus)
    add_non_finite(corpus)
    add_boms(corpus)
    add_whitespace_and_syntax(corpus)
    add_duplicate_keys(corpus)
    add_mutations(corpus, max(0, MIN_MALFORMED + 300 - corpus.malformed_count))
    add_valid(corpus, 400)
    return corpus


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus()


# -- the node under a flood of bad input ---------------------------------------------------


class TagLog:
    """A thread-safe record of the tags the valid jobs ran with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tags: Counter[str] = Counter()

    def perform(self, tag: str, *rest: Any) -> None:
        with self._lock:
            self.tags[tag] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.tags.values())


def push_all(client: redis.Redis, key: str, payloads: list[bytes], chunk: int = 250) -> None:
    for start in range(0, len(payloads), chunk):
        client.lpush(key, *payloads[start:start + chunk])


def dead_entries(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    members = cast(list[bytes], client.zrange(keys.dead, 0, -1))
    return [json.loads(member) for member in members]


def wrapped_bytes(entry: dict[str, Any]) -> bytes:
    """The original payload kept by an ``ExqFast.InvalidPayload`` dead entry."""
    if "payload_base64" in entry:
        assert entry["args"] == []
        return base64.b64decode(entry["payload_base64"])
    [text] = entry["args"]
    assert isinstance(text, str)
    return text.encode("utf-8")


def test_the_corpus_covers_every_family(corpus: Corpus) -> None:
    # Given the generated corpus
    # Then it is large, each family is present, and both outcomes of decode occur
    assert corpus.malformed_count >= MIN_MALFORMED
    for family in ["truncated", "wrong type", "missing field", "huge", "invalid utf-8",
                   "random bytes", "deep", "nan/inf", "bom", "empty/whitespace",
                   "not an object", "syntax", "odd escapes", "duplicate keys", "mutation",
                   "utf-16/32"]:
        assert corpus.families[family] > 0, family
    assert len(corpus.unknown) > 100 and len(corpus.invalid) > 2000
    assert any(not raw.strip() for raw in corpus.invalid)
    assert any(len(raw) > HUGE_STRING for raw in corpus.unknown.values())
    assert len(corpus.valid) > 400


def test_a_node_survives_thousands_of_malformed_payloads(
    corpus: Corpus, make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node with one registered worker, 20 slots and a 10 ms poll
    log = TagLog()
    config = make_config(queues=[(QUEUE, 20)], concurrency=20, poll_timeout=10,
                         scheduler_enable=False)
    payloads = corpus.shuffled()
    retried = corpus.retried(config.max_retries)
    assert 0 < len(retried) < len(corpus.unknown)  # both fates occur
    expected_failed = corpus.malformed_count
    expected_dead = expected_failed - len(retried)
    with Exq(config, workers={RECORD: log.perform}) as exq:
        # When the malformed payloads, interleaved with valid jobs, are pushed while it runs
        push_all(redis_client, keys.queue(QUEUE), payloads)
        # Then every payload is consumed: valid ones run, malformed ones fail
        wait_for(lambda: log.total() >= len(corpus.valid)
                 and redis_client.zcard(keys.dead) >= expected_dead
                 and stat(redis_client, keys, "failed") >= expected_failed
                 and redis_client.llen(keys.queue(QUEUE)) == 0
                 and redis_client.llen(keys.backup(config.node_id, QUEUE)) == 0,
                 timeout=40, what="every payload to be run or buried")
        # and the node is still running and still serving jobs
        assert not exq.stopped.is_set()
        assert exq.fetcher._thread is not None and exq.fetcher._thread.is_alive()
        exq.enqueue(QUEUE, RECORD, ["after-the-flood"])
        wait_for(lambda: log.tags["after-the-flood"] == 1, timeout=10, what="a later job")
        wait_for(lambda: stat(redis_client, keys, "processed") == len(corpus.valid) + 1,
                 timeout=10, what="the processed counter")
    # and every valid job ran exactly once
    assert set(log.tags) == {*corpus.valid, "after-the-flood"}
    assert [tag for tag, n in log.tags.items() if n != 1] == []
    # and the dead set holds exactly the malformed payloads the retry rule does not
    # retry, each with a reason
    dead = dead_entries(redis_client, keys)
    assert len(dead) == expected_dead
    assert stat(redis_client, keys, "failed") == expected_failed
    assert all(entry.get("error_message") for entry in dead)
    wrapped = [entry for entry in dead if entry.get("class") == INVALID_CLASS]
    assert Counter(wrapped_bytes(entry) for entry in wrapped) == Counter(
        corpus.invalid + corpus.unencodable)
    refused = [entry for entry in wrapped if entry["error_class"] == "InvalidJob"]
    assert len(refused) == len(corpus.invalid)
    assert all("could not be re-encoded" in entry["error_message"]
               for entry in wrapped if entry["error_class"] != "InvalidJob")
    unknown = [entry for entry in dead if entry.get("class") != INVALID_CLASS]
    in_retry = [json.loads(m) for m in cast(list[bytes], redis_client.zrange(keys.retry, 0, -1))]
    assert sorted(entry["fuzz_id"] for entry in unknown) == \
        sorted(set(corpus.unknown) - retried)
    assert sorted(entry["fuzz_id"] for entry in in_retry) == sorted(retried)
    assert all("unknown worker" in entry["error_message"] for entry in unknown + in_retry)
    assert all(entry["error_class"] == "UnknownWorker" for entry in unknown + in_retry)
    # and nothing is left in flight
    assert redis_client.llen(keys.backup(config.node_id, QUEUE)) == 0
    assert redis_client.llen(keys.queue(QUEUE)) == 0
    assert exq.acks.totals == {"processed": len(corpus.valid) + 1, "failed": expected_failed}


# -- the codec under hypothesis --------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
)
job_documents = st.fixed_dictionaries(
    {},
    optional={
        "class": st.sampled_from([UNKNOWN, "Elixir.A", "A::B", "a/b", ""]) | json_values,
        "args": st.lists(json_values, max_size=4) | json_values,
        "jid": json_values, "retry": json_values, "queue": json_values,
        "enqueued_at": json_values, "retry_count": json_values,
        "unique_until": json_values, "unique_token": json_values,
        "extra": json_values,
    },
)


@st.composite
def jsonish_payloads(draw: st.DrawFn) -> bytes:
    """JSON job-like documents (or any JSON value), then maybe broken at the byte level."""
    doc = draw(job_documents | json_values)
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8")
    edit = draw(st.sampled_from(["none", "truncate", "insert", "bom", "wrap", "constant"]))
    if edit == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif edit == "insert":
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.binary(min_size=1, max_size=3)) + raw[pos:]
    elif edit == "bom":
        raw = BOM_UTF8 + raw
    elif edit == "wrap":
        raw = draw(st.sampled_from([b" ", b"\n", b"[", b"{", b"\x00"])) + raw
    elif edit == "constant":
        raw = raw.replace(b"null", draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"])))
    return raw


def check_decode_contract(raw: bytes) -> None:
    """``decode`` raises only InvalidJob, else gives list args and a UTF-8 JSON re-encoding."""
    job = classify(raw)
    if job is None:
        return
    assert isinstance(job.job_class, str) and job.job_class
    assert isinstance(job.args, list)
    assert isinstance(decode(raw).args, list)
    assume(not unencodable(raw))  # no JSON form: the worker buries these verbatim
    out = job.reencode({})
    text = out.decode("utf-8")
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text!r}"))
    assert isinstance(data, dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decode_of_any_bytes_raises_only_invalid_job(raw: bytes) -> None:
    # Given arbitrary bytes; When decoded; Then InvalidJob or a well-formed Job
    check_decode_contract(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jsonish_payloads())
def test_decode_of_jsonish_payloads_raises_only_invalid_job(raw: bytes) -> None:
    # Given a job-like JSON document, possibly broken; When decoded
    # Then InvalidJob, or a Job whose args is a list and whose re-encoding is UTF-8 JSON
    check_decode_contract(raw)


def test_decode_contract_holds_on_the_whole_corpus(corpus: Corpus) -> None:
    # Given every generated payload; When each is decoded and re-encoded
    # Then only InvalidJob is raised and every re-encoding is valid UTF-8 JSON
    for raw in [*corpus.invalid, *corpus.unknown.values(), *corpus.valid.values()]:
        job = classify(raw)
        if job is not None:
            assert isinstance(json.loads(job.reencode({}).decode("utf-8")), dict)


# -- payloads at the edges of the codec ------------------------------------------------------

OVERFLOW = b'{"class":"Fuzz.NotAWorker","args":[1e400],"jid":"overflow"}'
NEAR_DEPTH_LIMIT = (b'{"class":"Fuzz.NotAWorker","args":[' + b"[" * 1000 + b"]" * 1000
                    + b'],"jid":"deep"}')


@pytest.mark.parametrize("raw", [OVERFLOW, NEAR_DEPTH_LIMIT], ids=["1e400", "depth-1000"])
def test_a_payload_without_a_json_form_is_refused_by_reencode(raw: bytes) -> None:
    # Given a payload decode accepts but JSON cannot express once decoded
    job = decode(raw)
    # When it is re-encoded (as for its retry or dead entry)
    # Then the codec says so with a ValueError/RecursionError (the worker then
    # buries the bytes verbatim: see the next test), never with bad JSON
    with pytest.raises((ValueError, RecursionError)):
        job.reencode({})


@pytest.mark.parametrize("raw", [OVERFLOW, NEAR_DEPTH_LIMIT], ids=["1e400", "depth-1000"])
def test_unencodable_payload_still_reaches_the_dead_set(
    raw: bytes, make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a running node with no worker for the payload's class
    config = make_config(queues=[QUEUE], poll_timeout=10, scheduler_enable=False)
    with Exq(config, workers={}):
        # When the payload is pushed
        redis_client.lpush(keys.queue(QUEUE), raw)
        wait_for(lambda: stat(redis_client, keys, "failed") == 1, timeout=10,
                 what="the job to fail")
        # Then it is in the dead set and out of the backup list
        assert redis_client.zcard(keys.dead) == 1
        assert redis_client.llen(keys.backup(config.node_id, QUEUE)) == 0


def test_decode_of_a_str_with_a_lone_surrogate_raises_invalid_job() -> None:
    # Given a str payload holding a lone surrogate; When decoded; Then InvalidJob
    with pytest.raises(InvalidJob):
        decode('{"class":"W","args":["\ud800"]}')


def test_duplicate_keys_name_one_worker_everywhere() -> None:
    # Given a payload naming two classes and two argument lists
    raw = b'{"class":"Harmless","class":"Other","args":[1],"args":[2]}'
    # When it is decoded eagerly, lazily and re-encoded
    eager, lazy = decode(raw), decode(raw)
    again = json.loads(eager.reencode({}))
    # Then they agree on the worker and the arguments (as json.loads: last wins)
    assert (eager.job_class, eager.args) == (again["class"], again["args"])
    assert eager.args == lazy.args == json.loads(raw)["args"]


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32-le"])
def test_decode_refuses_payloads_that_are_not_utf8(codec: str) -> None:
    # Given a job for a registered-looking class, encoded as UTF-16 or UTF-32
    raw = json.dumps({"class": "MyApp.Worker", "args": [1]}).encode(codec)
    with pytest.raises(ValueError):  # not UTF-8, or UTF-8 that is not JSON (NULs)
        json.loads(raw.decode("utf-8"))
    # When decoded; Then it is refused
    with pytest.raises(InvalidJob):
        decode(raw)


def test_unencodable_inputs_are_recognised_by_the_filter() -> None:
    # Given payloads without a JSON form; Then the property filter recognises them
    assert unencodable(OVERFLOW) and unencodable(NEAR_DEPTH_LIMIT)
    assert not unencodable(b'{"class":"W","args":[1e300,[[[]]]]}')
