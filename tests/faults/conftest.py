"""Fixtures of the fault suite: a ``Fleet`` factory whose fleets are always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import DURABLE, Fleet, require_redis_server

MakeFleet = Callable[..., Fleet]


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[MakeFleet]:
    """``make_fleet(extra_args=(...), separate_recorder=False)``: a private world per call.

    Every node, proxy and redis-server of every fleet made is stopped at
    teardown, whether the test passed or not.
    """
    require_redis_server()
    fleets: list[Fleet] = []

    def make(**options: object) -> Fleet:
        directory = tmp_path / f"fleet{len(fleets)}"
        directory.mkdir()
        fleet = Fleet(directory, **options)  # type: ignore[arg-type]
        fleets.append(fleet)
        return fleet

    yield make
    errors: list[BaseException] = []
    for fleet in fleets:
        try:
            fleet.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def fleet(make_fleet: MakeFleet) -> Fleet:
    """A fleet on a plain private redis-server (no persistence)."""
    return make_fleet()


@pytest.fixture
def durable_fleet(make_fleet: MakeFleet) -> Fleet:
    """A fleet whose redis-server keeps every write on disk (AOF, fsync always)."""
    return make_fleet(extra_args=DURABLE)
