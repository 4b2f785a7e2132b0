#!/usr/bin/env python3
"""How much does decoding one job cost, and is exq_fast's decoder faster than plain JSON?

For small (~150 B), medium (~2 KB) and large (~64 KB) Exq-format payloads this
times, side by side in one run:

* ``decode(raw)``: exq_fast's decode, as the worker calls it: the whole document
  converted by simdjson in one call, then the header fields and ``args``;
* stdlib ``json.loads`` followed by reading the same header fields;
* ``orjson.loads`` likewise, when orjson is importable (the row is skipped otherwise).

Each figure is the best of several repeats of N decodes (``time.perf_counter_ns``,
after a warm-up, garbage collector paused while timing, as ``timeit`` does).
"ratio" is the time per job divided by the stdlib ``json`` time for the same
payload: below 1.00x is faster than stdlib ``json``.

Run from the project root::

    .venv/bin/python benchmarks/decode.py            # full run, a few seconds
    .venv/bin/python benchmarks/decode.py --quick    # short run, noisier figures
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exq_fast.job import decode, encode

try:
    import orjson
except ImportError:  # pragma: no cover - optional yardstick
    orjson = None

HEADER_FIELDS = ("class", "jid", "queue", "retry", "retry_count", "enqueued_at")


@dataclass(frozen=True)
class Size:
    """One payload size: its label, target length in bytes and decodes per repeat."""

    label: str
    target: int
    iterations: int


SIZES = (
    Size("small", 150, 20_000),
    Size("medium", 2_048, 5_000),
    Size("large", 65_536, 200),
)

Method = Callable[[bytes, int], None]


# --- payloads -------------------------------------------------------------------------


def _item(rng: random.Random, index: int) -> dict[str, Any]:
    """One line item of an order: nested dicts, lists, strings, ints and floats."""
    return {
        "sku": f"SKU-{rng.randrange(10**6):06d}",
        "name": rng.choice(["Widget", "Gadget", "Sprocket", "Gizmo"]) + f" #{index}",
        "qty": rng.randrange(1, 10),
        "price": round(rng.uniform(1, 500), 2),
        "tags": rng.sample(["new", "sale", "gift", "fragile", "bulk", "eu", "us"], 3),
        "dims": {"w": rng.randrange(1, 100), "h": rng.randrange(1, 100), "unit": "cm"},
    }


def _job(job_class: str, args: list[Any], rng: random.Random) -> bytes:
    """An Exq job's bytes: its six fields, in the order and format Exq writes them."""
    return encode({
        "args": args,
        "class": job_class,
        "enqueued_at": 1_732_800_000 + round(rng.random(), 6),
        "jid": "6f1c0c1e-3b5a-4c59-9b0e-2a7d2f0c9e11",
        "queue": "default",
        "retry": 25,
    })


def build_payload(target: int, seed: int = 7) -> bytes:
    """Exq job bytes of about ``target`` bytes (line items added until it is reached)."""
    rng = random.Random(seed)
    payload = _job("MyApp.Mailer", [48213, "welcome"], rng)
    if len(payload) >= target:
        return payload
    items: list[dict[str, Any]] = []
    customer = {"id": 77, "email": "ada@example.com", "vip": False, "locale": "fr-FR"}
    order = {"id": 48213, "currency": "EUR", "customer": customer, "items": items}
    while len(payload) < target:
        items.append(_item(rng, len(items)))
        payload = _job("MyApp.Workers.ProcessOrder", [1042, order], rng)
    return payload


# --- methods: each decodes ``raw`` n times and reads the header fields ---------------


def exq_decode(raw: bytes, n: int) -> None:
    """exq_fast ``decode(raw)``: header fields plus args as Python."""
    for _ in range(n):
        job = decode(raw)
        _ = (job.job_class, job.jid, job.queue, job.retry, job.retry_count, job.enqueued_at)
        _ = job.args  # read as a worker would


def _read_header(data: dict[str, Any]) -> None:
    for name in HEADER_FIELDS:
        data.get(name)


def stdlib_json(raw: bytes, n: int) -> None:
    """stdlib ``json.loads`` of the whole payload, then the header fields."""
    loads = json.loads
    for _ in range(n):
        _read_header(loads(raw))


def orjson_loads(raw: bytes, n: int) -> None:
    """``orjson.loads`` of the whole payload, then the header fields."""
    assert orjson is not None
    loads = orjson.loads
    for _ in range(n):
        _read_header(loads(raw))


def methods() -> list[tuple[str, Method]]:
    """The methods to compare, stdlib ``json`` first (the ratio's reference)."""
    found: list[tuple[str, Method]] = [
        ("json.loads (stdlib)", stdlib_json),
        ("exq decode", exq_decode),
    ]
    if orjson is not None:
        found.append(("orjson.loads", orjson_loads))
    return found


# --- timing ---------------------------------------------------------------------------


def best_ns_per_job(method: Method, raw: bytes, n: int, repeats: int) -> float:
    """Best time per job over ``repeats`` runs of ``n`` decodes, after a warm-up."""
    method(raw, max(n // 10, 1))
    best = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            method(raw, n)
            best = min(best, (time.perf_counter_ns() - start) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def check_methods_agree(raw: bytes) -> None:
    """Fail loudly (not on timing) if exq_fast reads different fields than json does."""
    data = json.loads(raw)
    job = decode(raw)
    assert (job.job_class, job.jid, job.queue) == (data["class"], data["jid"], data["queue"])
    assert job.args == data["args"]


# --- output ---------------------------------------------------------------------------


def print_header(repeats: int) -> None:
    """Versions and method notes, so a pasted table says what produced it."""
    orjson_version = orjson.__version__ if orjson is not None else "not installed (row skipped)"
    print(f"Python {platform.python_version()} ({platform.machine()}), "
          f"pysimdjson {importlib.metadata.version('pysimdjson')}, orjson {orjson_version}")
    print(f"best of {repeats} repeats; ratio = time per job / stdlib json (below 1.00x = faster)")
    print()
    print(f"{'size':<7} {'bytes':>6}  {'method':<22} {'µs/job':>9} {'jobs/s':>12} {'ratio':>7}")
    print("-" * 69)


def print_row(size: Size, nbytes: int, name: str, ns: float, reference_ns: float) -> None:
    """One table line."""
    print(f"{size.label:<7} {nbytes:>6}  {name:<22} {ns / 1000:>9.3f} "
          f"{1e9 / ns:>12,.0f} {ns / reference_ns:>6.2f}x")


def run_size(size: Size, scale: float, repeats: int) -> None:
    """Time every method on one payload size and print its rows."""
    raw = build_payload(size.target)
    check_methods_agree(raw)
    n = max(int(size.iterations * scale), 1)
    reference_ns = 0.0
    for name, method in methods():
        ns = best_ns_per_job(method, raw, n, repeats)
        reference_ns = reference_ns or ns  # the first method is stdlib json
        print_row(size, len(raw), name, ns, reference_ns)
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run: a tenth of the iterations, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per method and size (default 5, or 3 with --quick)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    options = parse_args(argv)
    scale = 0.1 if options.quick else 1.0
    repeats = options.repeats or (3 if options.quick else 5)
    started = time.perf_counter()
    print_header(repeats)
    for size in SIZES:
        run_size(size, scale, repeats)
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
