"""WorkerPool: threads started on demand and reused, calls dropped at shutdown."""

from __future__ import annotations

import threading

import pytest

from exq_fast.pool import WorkerPool
from tests.conftest import threads_named, wait_for


def test_threads_are_reused_and_started_only_when_none_is_idle() -> None:
    # Given a pool, when 50 calls run one after the other
    pool = WorkerPool("t-pool")
    done: list[str] = []
    for _ in range(50):
        finished = threading.Event()
        pool.submit(lambda e=finished: (done.append(threading.current_thread().name), e.set()))
        assert finished.wait(5)
        wait_for(lambda: pool._idle == 1, what="the thread idle again")
    # Then one thread ran them all, a daemon named after the pool
    assert set(done) == {"t-pool_0"} and len(threads_named("t-pool_")) == 1
    # When 8 calls block at once, 8 threads run them
    gate, started = threading.Event(), threading.Semaphore(0)

    def blocked() -> None:
        started.release()
        gate.wait(10)

    for _ in range(8):
        pool.submit(blocked)
    for _ in range(8):
        assert started.acquire(timeout=5)
    assert len(threads_named("t-pool_")) == 8
    gate.set()
    pool.shutdown()


def test_a_call_that_raises_does_not_end_its_thread(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool("t-raise")
    pool.submit(lambda: 1 / 0)
    ran = threading.Event()
    wait_for(lambda: pool._idle == 1, what="the thread idle again")
    pool.submit(ran.set)
    assert ran.wait(5) and len(threads_named("t-raise_")) == 1
    assert any("raised" in r.getMessage() for r in caplog.records)
    pool.shutdown()


def test_shutdown_drops_the_calls_not_started_and_refuses_new_ones() -> None:
    # Given a pool whose one thread is busy, with 3 calls waiting behind it
    pool = WorkerPool("t-stop")
    gate, running = threading.Event(), threading.Event()
    pool.submit(lambda: (running.set(), gate.wait(10)))
    assert running.wait(5)
    ran: list[int] = []
    with pool._lock:  # make the 3 calls queue behind the busy thread (no new thread)
        pool._idle = 3
    for n in range(3):
        pool.submit(ran.append, n)
    # When it is shut down: the 3 are dropped, the running one finishes, the thread ends
    assert pool.shutdown() == 3
    with pytest.raises(RuntimeError):
        pool.submit(ran.append, 9)
    gate.set()
    wait_for(lambda: not any(t.name.startswith("t-stop") for t in threading.enumerate()),
             what="the pool's thread ended")
    assert ran == []
