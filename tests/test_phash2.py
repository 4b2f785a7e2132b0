"""Tests for exq_fast._phash2: a port of erlang:phash2/1 (OTP 25) and Exq's unique token.

Two sources of expected values:

* vectors computed with OTP 25 for this project (the brief's list);
* the table in OTP's own ``erts/emulator/test/hash_SUITE.erl`` (phash2 test, plus
  ``otp_7127_test`` and ``hash_zero_test``).  That table holds full 32-bit
  ``erlang:phash2(T, 1 bsl 32)`` values, i.e. ``make_hash2`` before the 27-bit
  mask; only entries expressible as decoded JSON are used (a charlist such as
  ``"abc"`` is just the JSON array ``[97, 98, 99]``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exq_fast._phash2 import (
    _atom_table_hash,
    _make_hash2,
    phash2,
    unique_token,
)

MASK27 = (1 << 27) - 1

# --- vectors computed with OTP 25 --------------------------------------------

OTP25_PHASH2 = [
    ("a", 112802447),
    (1, 2614250),
    (1.5, 10380315),
    (True, 506293),
    (None, 29948),
    ([1, 2], 13006701),
    ({"k": "v"}, 37839229),
    (10, 32317145),
    ("unique", 12430448),
]


@pytest.mark.parametrize(("term", "expected"), OTP25_PHASH2)
def test_otp25_vectors(term: object, expected: int) -> None:
    assert phash2(term) == expected


@pytest.mark.parametrize(
    ("queue", "job_class", "args", "expected"),
    [
        ("default", "MyWorker", [], "5tR0PQczMcc8JGkBWv+BVP/dkZ022DIw11dZ9QtCfi8="),
        ("default", "MyWorker", ["a", 1], "8ilYLEp4dLjW2VB+16TWJgXHLqov5VzSjJ2cQh9QuXQ="),
        (
            "q1",
            "MyApp.Worker",
            [{"k": "v"}, [1, 2], 1.5, True, None],
            "rRfSoblHR9kQ/1bDgZUsqFbEGcSmugnlKW3T7egs+e4=",
        ),
        ("fxq", "Bench.NoopWorker", [10, "unique"], "98OCaDOqkjn0Ul8vFYvhelCFtkdYlUAdwoMYoCCFyXY="),
        (
            "fxq",
            "Bench.NoopWorker",
            [11, "unique_until_start"],
            "R93lFKtrhIMUDVd8r6tiyNCafW/12jrJUF4huzNeKuo=",
        ),
    ],
)
def test_unique_token_vectors(
    queue: str, job_class: str, args: list[object], expected: str
) -> None:
    assert unique_token(queue, job_class, args) == expected


def test_unique_token_preimage() -> None:
    want = hashlib.sha256(b"q1:MyApp.Worker:37839229:13006701:10380315:506293:29948").digest()
    got = unique_token("q1", "MyApp.Worker", [{"k": "v"}, [1, 2], 1.5, True, None])
    assert base64.b64decode(got, validate=True) == want


# --- OTP hash_SUITE table (full 32-bit make_hash2 values) ---------------------

_PRINTABLE = "".join(chr(c) for c in range(32, 128))
_NOT_A_HEAP_BIN = _PRINTABLE * 500  # list_to_binary(lists:duplicate(500, lists:seq(32,127)))
_BIG = 1606938044258990275541962092341162602522202993782792835301376  # 2**200

HASH_SUITE_FULL: list[tuple[Any, int]] = [
    ([], 3468870702),
    # small integers
    (0, 3175731469),
    (1, 539485162),
    (-1, 1117813597),
    (1 << 20, 1477815345),
    (-(1 << 20), 3076904293),
    # outside the 28-bit range, and true bignums (several 64-bit digits)
    (4294967296, 2108323275),
    (-4294967296, 2586067094),
    (981494972710656, 1622082818),
    (-981494972710656, 3367191372),
    (36893488147419103232, 2545846594),
    (-36893488147419103232, 1649047068),
    (_BIG, 2573322433),
    (-_BIG, 2288753377),
    # binaries: empty, short tails, exactly one 12-byte round plus tail, 48 000 bytes
    ("", 147926629),
    ("\x00", 2914887855),
    ("\x00" * 4, 2014511533),
    ("abc", 1306188027),
    ("12345678901234567890", 3021061640),
    (_NOT_A_HEAP_BIN, 2644086993),
    (_NOT_A_HEAP_BIN[16:], 3575839236),
    # floats
    (0.0, 423528920),
    (3.14, 3731709215),
    (-3.14, 1827518724),
    # lists: element context, byte packing, non-byte element in the middle
    ([0.0], 167906877),
    ([""], 440873397),
    ([[]], 499070068),
    ([97, 98, 99], 519996486),
    ([97, 98, 99, 1009], 290369864),
    ([97, 98, 99, 1009, 100, 101], 4134369195),
    ([ord(c) for c in "1234567890123456"], 963649519),
]


@pytest.mark.parametrize(("term", "full"), HASH_SUITE_FULL, ids=lambda v: repr(v)[:30])
def test_hash_suite_full_value(term: object, full: int) -> None:
    assert _make_hash2(term) == full
    assert phash2(term) == full & MASK27


def test_hash_suite_otp_7127() -> None:
    assert phash2("Scott9") == 38990304


def test_negative_zero_hashes_as_zero() -> None:
    assert phash2(-0.0) == phash2(0.0)
    assert phash2([-0.0]) == phash2([0.0])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("abc", 26499),
        ("abd", 26500),
        ("åäö", 62518),  # two-byte UTF-8 Latin-1 characters folded to one byte
        ("".join(map(chr, range(5792, 5873))), 241561024),
        ("".join(map(chr, range(12441, 12475))), 246053818),
        ("😃", 1026307),
        ("true", 506293),
        ("nil", 29948),
    ],
)
def test_atom_table_hash(name: str, expected: int) -> None:
    assert _atom_table_hash(name) == expected


# --- semantics -----------------------------------------------------------------


def test_bool_is_an_atom_not_an_integer() -> None:
    assert phash2(True) != phash2(1)
    assert phash2(False) != phash2(0)
    assert phash2(False) == _atom_table_hash("false")
    assert phash2([True]) != phash2([1])


def test_map_order_independent() -> None:
    assert phash2({"a": 1, "b": 2}) == phash2({"b": 2, "a": 1})
    nested_1 = {"x": {"a": [1, {"p": None, "q": True}], "b": 2.5}, "y": "z"}
    nested_2 = {"y": "z", "x": {"b": 2.5, "a": [1, {"q": True, "p": None}]}}
    assert phash2(nested_1) == phash2(nested_2)


def test_map_is_not_a_list_of_pairs() -> None:
    assert phash2({}) != phash2([])
    assert phash2({"a": 1}) != phash2(["a", 1])
    assert phash2({"a": "b"}) != phash2({"b": "a"})


def test_empty_map_inside_map_keeps_enclosing_pairs() -> None:
    # An empty map must not reset the XOR of the enclosing map's finished entries.
    assert phash2({"a": 1, "b": {}}) == phash2({"b": {}, "a": 1})


def test_deep_nesting_does_not_recurse() -> None:
    deep: object = 1
    for _ in range(5 * sys.getrecursionlimit()):
        deep = [{"k": deep}]
    assert 0 <= phash2(deep) <= MASK27


@pytest.mark.parametrize("bad", [(1, 2), {1, 2}, b"bytes", object()])
def test_rejects_non_json_types(bad: object) -> None:
    with pytest.raises(TypeError):
        phash2(bad)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_rejects_non_finite_floats(bad: float) -> None:
    with pytest.raises(ValueError):
        phash2(bad)


# --- properties ------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(1 << 200), max_value=1 << 200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)


@given(json_values)
def test_result_in_27_bit_range(term: object) -> None:
    value = phash2(term)
    assert 0 <= value <= MASK27
    assert value == _make_hash2(term) & MASK27
    assert phash2(term) == value  # deterministic


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=8))
def test_map_insertion_order_irrelevant(mapping: dict[str, object]) -> None:
    reversed_mapping = dict(reversed(list(mapping.items())))
    assert phash2(mapping) == phash2(reversed_mapping)


@given(st.text(max_size=40), st.text(max_size=40), st.lists(json_values, max_size=4))
def test_unique_token_shape(queue: str, job_class: str, args: list[object]) -> None:
    token = unique_token(queue, job_class, args)
    assert len(token) == 44 and token.endswith("=")
    assert len(base64.b64decode(token, validate=True)) == 32
