"""Pure-Python ``erlang:phash2/1`` for JSON-shaped terms, and Exq's unique-job token.

Exq (Elixir) names a unique-job lock after ``erlang:phash2/1`` of each job
argument, so a Python client has to reproduce that hash exactly.  The BEAM
computes it with ``make_hash2`` (erts/emulator/beam/utils.c, here as of
OTP 25): every term is folded into a 32-bit accumulator with Bob Jenkins'
1996 ``lookup2`` three-word mixing step, binaries go through ``lookup2``'s
12-bytes-a-round block hash, and ``phash2/1`` keeps the low 27 bits.  An atom
contributes the value the atom table stores for it, which is P. J.
Weinberger's ``hashpjw`` (the Dragon Book hash) over the atom's name, with
ERTS' tweak of folding a two-byte UTF-8 Latin-1 character into one byte.

Only the terms a JSON document decodes into under Elixir's Jason are handled:

==================  ==================================================
Python value        Erlang term
==================  ==================================================
``str``             binary holding the UTF-8 bytes
``int``             integer (any size, either sign)
``float``           float (``-0.0`` hashes as ``0.0``; must be finite)
``True``/``False``  atoms ``true`` / ``false``
``None``            atom ``nil``
``list``            proper list
``dict``            map (entries combined independently of their order)
==================  ==================================================

Traversal uses an explicit work stack, so deeply nested values do not recurse.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import NamedTuple

__all__ = ["phash2", "unique_token"]

_U32 = 0xFFFFFFFF
_PHASH2_MASK = (1 << 27) - 1

# The golden-ratio seed and the multiples of it (mod 2**32) that make_hash2
# uses to keep the kinds of term apart.
_GOLDEN = 0x9E3779B9
_C_NIL = 0x3C6EF372  # 2x
_C_ATOM = 0xDAA66D2B  # 3x
_C_BYTES = 0x78DDE6E4  # 4x: list elements in 0..255, packed four at a time
_C_NEG_WIDE = 0x2E2AC13A  # 10x: integers outside the 28-bit range, negative
_C_POS_WIDE = 0xCC623AF3  # 11x: the same, non-negative
_C_FLOAT = 0x6A99B4AC  # 12x
_C_BINARY = 0x08D12E65  # 13x
_C_MAP_SIZE = 0xE3779B90  # 16x
_C_MAP_PAIRS = 0xBE1E08BB  # 19x

_NIL_TYPE_CODE = 2  # the emulator's internal type number for []
_BARE_NIL_HASH = 3468870702  # [] with nothing hashed before it
_SMALL28_MIN = -(1 << 27)
_SMALL28_END = 1 << 27


class _ListRest(NamedTuple):
    """The not-yet-hashed tail ``items[start:]`` of a list."""

    items: list[object]
    start: int


class _MapEnd(NamedTuple):
    """Marks the end of a map's entries; holds the enclosing context to restore."""

    outer_hash: int
    outer_pairs: int


class _PairEnd:
    """Marks the end of one map entry (key then value)."""


_PAIR_END = _PairEnd()


# --- Jenkins lookup2 primitives ----------------------------------------------


def _mix3(a: int, b: int, c: int) -> tuple[int, int, int]:
    """Jenkins' lookup2 mix of three 32-bit words."""
    a = ((a - b - c) & _U32) ^ (c >> 13)
    b = ((b - c - a) & _U32) ^ ((a << 8) & _U32)
    c = ((c - a - b) & _U32) ^ (b >> 13)
    a = ((a - b - c) & _U32) ^ (c >> 12)
    b = ((b - c - a) & _U32) ^ ((a << 16) & _U32)
    c = ((c - a - b) & _U32) ^ (b >> 5)
    a = ((a - b - c) & _U32) ^ (c >> 3)
    b = ((b - c - a) & _U32) ^ ((a << 10) & _U32)
    c = ((c - a - b) & _U32) ^ (b >> 15)
    return a, b, c


def _mix2(acc: int, x: int, y: int, const: int) -> int:
    """Fold two 32-bit words, each offset by ``const``, into accumulator ``acc``."""
    return _mix3((const + x) & _U32, (const + y) & _U32, acc)[2]


def _le(chunk: bytes) -> int:
    """Little-endian value of up to four bytes."""
    return int.from_bytes(chunk, "little")


def _block_hash(data: bytes, seed: int) -> int:
    """Jenkins' lookup2 over ``data``, 12 bytes a round, with ``seed`` as initial value."""
    a = b = _GOLDEN
    c = seed
    whole = len(data) - len(data) % 12
    for off in range(0, whole, 12):
        a = (a + _le(data[off : off + 4])) & _U32
        b = (b + _le(data[off + 4 : off + 8])) & _U32
        c = (c + _le(data[off + 8 : off + 12])) & _U32
        a, b, c = _mix3(a, b, c)
    tail = data[whole:]
    # The total length takes the low byte of c, so tail bytes 8..10 go above it.
    c = (c + len(data) + (_le(tail[8:11]) << 8)) & _U32
    b = (b + _le(tail[4:8])) & _U32
    a = (a + _le(tail[0:4])) & _U32
    return _mix3(a, b, c)[2]


# --- leaf terms ----------------------------------------------------------------


def _atom_table_hash(name: str) -> int:
    """hashpjw over the atom's UTF-8 name, as the ERTS atom table computes it."""
    raw = name.encode("utf-8")
    h = 0
    i = 0
    while i < len(raw):
        v = raw[i]
        i += 1
        if i < len(raw) and (v & 0xFE) == 0xC2 and (raw[i] & 0xC0) == 0x80:
            v = ((v << 6) | (raw[i] & 0x3F)) & 0xFF
            i += 1
        h = ((h << 4) + v) & _U32
        top = h & 0xF0000000
        if top:
            h ^= top >> 24
            h ^= top
    return h


_ATOM_HASH = {
    True: _atom_table_hash("true"),
    False: _atom_table_hash("false"),
    None: _atom_table_hash("nil"),
}


def _hash_atom(acc: int, value: bool | None) -> int:
    """An atom: its table hash verbatim when nothing precedes it, else mixed in."""
    code = _ATOM_HASH[value]
    return code if acc == 0 else _mix2(acc, code, 0, _C_ATOM)


def _hash_nil(acc: int) -> int:
    """The empty list ``[]`` (also the terminator of every proper list)."""
    return _BARE_NIL_HASH if acc == 0 else _mix2(acc, _NIL_TYPE_CODE, 0, _C_NIL)


def _hash_int(acc: int, n: int) -> int:
    """An integer: 28-bit values as signed words, wider ones as 64-bit digits."""
    if _SMALL28_MIN <= n < _SMALL28_END:
        if n < 0:  # negatives are mixed twice: magnitude first, then two's complement
            acc = _mix2(acc, -n, 0, _GOLDEN)
        return _mix2(acc, n & _U32, 0, _GOLDEN)
    const = _C_NEG_WIDE if n < 0 else _C_POS_WIDE
    magnitude = abs(n)
    while True:  # least significant 64-bit digit first, low half before high half
        acc = _mix2(acc, magnitude & _U32, (magnitude >> 32) & _U32, const)
        magnitude >>= 64
        if not magnitude:
            return acc


def _hash_float(acc: int, x: float) -> int:
    """A float: the IEEE-754 bits, high word then low word; ``-0.0`` as ``0.0``."""
    if not math.isfinite(x):
        raise ValueError(f"Erlang has no float {x!r}")
    bits = struct.unpack("<Q", struct.pack("<d", x + 0.0))[0]
    return _mix2(acc, bits >> 32, bits & _U32, _C_FLOAT)


def _hash_binary(acc: int, text: str) -> int:
    """A binary (JSON string): lookup2 of its UTF-8 bytes, seeded with the context.

    The empty binary skips the block hash and yields the seed itself.
    """
    seed = (_C_BINARY + acc) & _U32
    return _block_hash(text.encode("utf-8"), seed) if text else seed


# --- compound terms ------------------------------------------------------------


def _byte_at(items: list[object], i: int) -> int | None:
    """``items[i]`` if it is an integer in 0..255 (packed four to a word), else None."""
    value = items[i]
    if type(value) is int and 0 <= value <= 255:
        return value
    return None


def _hash_list_from(acc: int, items: list[object], start: int, stack: list[object]) -> int:
    """Hash ``items[start:]`` up to its first non-byte element, which is queued with the rest.

    Consecutive byte-sized integers are packed big-endian into 32-bit words.
    When the list runs out instead, its ``[]`` terminator is hashed.
    """
    i = start
    packed = count = 0
    while i < len(items) and (byte := _byte_at(items, i)) is not None:
        packed = (packed << 8) | byte
        i += 1
        count += 1
        if count == 4:
            acc = _mix2(acc, packed, 0, _C_BYTES)
            packed = count = 0
    if count:
        acc = _mix2(acc, packed, 0, _C_BYTES)
    if i == len(items):
        return _hash_nil(acc)
    stack.append(_ListRest(items, i + 1))
    stack.append(items[i])
    return acc


def _open_map(
    acc: int, pairs: int, mapping: dict[object, object], stack: list[object]
) -> tuple[int, int]:
    """Hash a map's size; queue its entries, each to be hashed from a zero context.

    Returns the new ``(acc, pairs)``: both zero once entries are queued (the
    enclosing values wait on the stack), unchanged context for an empty map.
    """
    acc = _mix2(acc, len(mapping), 0, _C_MAP_SIZE)
    if not mapping:
        return acc, pairs
    stack.append(_MapEnd(acc, pairs))
    for key, value in mapping.items():
        stack.extend((_PAIR_END, value, key))
    return 0, 0


def _hash_leaf(acc: int, term: object) -> int:
    """Hash a term that has no sub-terms."""
    if term is None or isinstance(term, bool):
        return _hash_atom(acc, term)
    if isinstance(term, int):
        return _hash_int(acc, term)
    if isinstance(term, float):
        return _hash_float(acc, term)
    if isinstance(term, str):
        return _hash_binary(acc, term)
    raise TypeError(f"phash2 cannot hash {type(term).__name__} (not a JSON value)")


def _make_hash2(term: object) -> int:
    """The full 32-bit ``make_hash2`` value of ``term``."""
    acc = pairs = 0  # running hash; XOR of the finished entries of the innermost map
    stack: list[object] = [term]
    while stack:
        item = stack.pop()
        if item is _PAIR_END:
            pairs ^= acc
            acc = 0
        elif isinstance(item, _MapEnd):
            acc = _mix2(item.outer_hash, pairs, 0, _C_MAP_PAIRS)
            pairs = item.outer_pairs
        elif isinstance(item, _ListRest):
            acc = _hash_list_from(acc, item.items, item.start, stack)
        elif isinstance(item, list):
            acc = _hash_list_from(acc, item, 0, stack)
        elif isinstance(item, dict):
            acc, pairs = _open_map(acc, pairs, item, stack)
        else:
            acc = _hash_leaf(acc, item)
    return acc


# --- public API ------------------------------------------------------------------


def phash2(term: object) -> int:
    """Return ``erlang:phash2(Term)`` (OTP 25) for a decoded-JSON Python value.

    ``term`` may be a ``str``, ``int``, ``float``, ``bool``, ``None``, ``list``
    or ``dict`` with ``str`` keys, nested freely; it is hashed as the Erlang
    term Jason would decode the same JSON into (see the module docstring).
    The result lies in ``0 .. 2**27 - 1``.  Raises ``TypeError`` for any other
    type and ``ValueError`` for a non-finite float.
    """
    return _make_hash2(term) & _PHASH2_MASK


def unique_token(queue: str, job_class: str, args: list[object]) -> str:
    """Return Exq's unique-job token for a job.

    The token is the standard-alphabet, padded base64 of the SHA-256 of the
    UTF-8 string ``queue:job_class`` followed by ``:<phash2(arg)>`` for every
    argument in order.
    """
    parts = [queue, job_class, *(str(phash2(arg)) for arg in args)]
    digest = hashlib.sha256(":".join(parts).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")
