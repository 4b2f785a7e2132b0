"""The Python API of issue 12: ``@worker``'s typed object, its enqueue methods,
times and delays, and ``Exq.run_forever()``.

What a user checks: the payload in Redis, that ``mypy --strict`` accepts (and
refuses) their code, and that a script calling ``run_forever()`` runs its jobs
and returns on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from exq_fast import Config, Enqueuer, Exq, JobFunction
from exq_fast.define import worker
from exq_fast.keys import Keys
from exq_fast.registry import Registry
from tests.conftest import wait_for

ConfigFactory = Callable[..., Config]


def queued(client: redis.Redis, keys: Keys, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in cast(list[bytes], client.lrange(keys.queue(queue), 0, -1))]


def scheduled(client: redis.Redis, keys: Keys) -> list[tuple[dict[str, Any], float]]:
    members = cast(list[tuple[bytes, float]], client.zrange(keys.schedule, 0, -1,
                                                           withscores=True))
    return [(json.loads(m), score) for m, score in members]


# -- the typed worker object ----------------------------------------------------------


def test_worker_returns_a_callable_job_function_with_enqueue_methods(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a worker declared with its queue and options
    reg = Registry()

    @worker("MyApp.Add", queue="math", max_retries=3, registry=reg)
    def add(a: int, b: int = 0) -> int:
        return a + b

    assert isinstance(add, JobFunction)
    assert add(1, 2) == 3  # still a plain function
    assert reg.lookup("MyApp.Add").queue == "math"
    # When its jobs are enqueued through its own methods
    jid = add.set(via=enqueuer).enqueue(1, b=2)
    add.set(via=enqueuer, queue="urgent", jid="fixed-jid").enqueue(5)
    in_five = add.set(via=enqueuer).enqueue_in(timedelta(minutes=5), 3, 4)
    at = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    add.set(via=enqueuer).enqueue_at(at, 7, 8)
    # Then the payloads carry the class, the queue, the positional args and the options
    [math_job] = queued(redis_client, keys, "math")
    assert (math_job["class"], math_job["args"], math_job["retry"], math_job["jid"]) == \
        ("MyApp.Add", [1, 2], 3, jid)
    [urgent] = queued(redis_client, keys, "urgent")
    assert (urgent["args"], urgent["jid"]) == ([5], "fixed-jid")
    by_args = {tuple(job["args"]): score for job, score in scheduled(redis_client, keys)}
    assert abs(by_args[(3, 4)] - (time.time() + 300)) < 5
    assert by_args[(7, 8)] == at.timestamp()
    assert isinstance(in_five, str)


def test_arguments_that_cannot_call_the_function_are_refused_at_enqueue(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    # A job that could only fail with TypeError (retried 25 times) is refused at once
    reg = Registry()

    @worker("Two.Args", registry=reg)
    def two(address: str, n: int) -> None: ...

    via = two.set(via=enqueuer)
    for args in (("a",), (), ("a", 1, 2)):
        with pytest.raises(TypeError):
            via.enqueue(*args)  # type: ignore[call-arg, arg-type]
    assert redis_client.llen(keys.queue("default")) == 0
    via.enqueue("a", 1)
    assert redis_client.llen(keys.queue("default")) == 1


def test_keyword_only_arguments_cannot_be_enqueued(enqueuer: Enqueuer) -> None:
    reg = Registry()

    @worker("K", registry=reg)
    def kw(a: int, *, flag: bool = False) -> None: ...

    with pytest.raises(TypeError, match="keyword-only"):
        kw.set(via=enqueuer).enqueue(1, flag=True)
    with pytest.raises(TypeError):  # arity is checked when keywords are bound
        kw.set(via=enqueuer).enqueue(1, 2, flag=True)  # type: ignore[call-arg]


def test_job_function_enqueue_writes_to_the_running_node(
    make_config: ConfigFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a started node and a worker of the default registry's kind
    reg = Registry()
    ran: list[int] = []

    @worker("Run.Me", registry=reg)
    def run_me(n: int) -> None:
        ran.append(n)

    with Exq(make_config(queues=["default"], poll_timeout=10), workers=reg):
        # When the job is enqueued without naming a connection
        run_me.enqueue(42)
        # Then it lands in this node's namespace and runs
        wait_for(lambda: ran == [42], what="the job ran")


MYPY_OK = '''
from datetime import timedelta
from exq_fast import Enqueuer, EnqueueResult, worker

@worker("T.Add")
def add(a: int, b: int) -> int:
    return a + b

@worker("T.Mail")
class Mailer:
    def perform(self, to: str) -> None: ...

def use(e: Enqueuer) -> None:
    r1: EnqueueResult = e.enqueue("q", add, [1, 2], timeout=3.5, max_retries=2)
    r2: EnqueueResult = add.enqueue(1, 2)
    r3: EnqueueResult = add.enqueue_in(timedelta(seconds=5), 1, b=2)
    r4: EnqueueResult = e.enqueue_in("q", timedelta(minutes=1), Mailer, ["a@b.c"])
    total: int = add(1, 2)
    add.set(queue="other", unique_for=60).enqueue(3, 4)
'''

MYPY_BAD = '''
from exq_fast import Enqueuer, worker

@worker("T.Add")
def add(a: int, b: int) -> int:
    return a + b

def use(e: Enqueuer) -> None:
    add.enqueue(1, "two")
    e.enqueue("q", add, [1], tiemout=3)
    add.set(retry=3)
'''


def test_mypy_strict_accepts_typed_use_and_refuses_mistakes(tmp_path: Path) -> None:
    # Given a user's module using the API, type-checked with mypy --strict
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(MYPY_OK)
    bad.write_text(MYPY_BAD)

    def mypy(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                               str(path)], check=False, capture_output=True, text=True,
                              cwd=tmp_path)

    ok = mypy(good)
    assert ok.returncode == 0, ok.stdout
    refused = mypy(bad)
    assert refused.returncode == 1
    # the wrong argument type, the misspelt option and the unknown option are each caught
    assert 'Argument 2 to "enqueue" of "JobFunction" has incompatible type "str"' \
        in refused.stdout, refused.stdout
    assert "tiemout" in refused.stdout
    assert '"retry"' in refused.stdout
    assert refused.stdout.count("error:") == 3, refused.stdout


# -- times and delays -------------------------------------------------------------------


def test_naive_datetimes_are_local_time_as_python_reads_them(
    redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a process in New York time, enqueueing at a naive datetime
    script = f'''
import time
from datetime import datetime, timedelta
from exq_fast import Config, Enqueuer
with Enqueuer(Config(redis_url={redis_url!r}, namespace={namespace!r})) as e:
    when = datetime.now() + timedelta(seconds=60)
    e.enqueue_at("q", when, "X")
    print(when.timestamp())
'''
    env = {**os.environ, "TZ": "America/New_York"}
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True).stdout
    # Then the job is due in 60 s, as datetime.timestamp() says, not 5 hours off
    [(_, score)] = scheduled(redis_client, keys)
    assert score == pytest.approx(float(out), abs=1e-6)
    assert abs(score - (time.time() + 60)) < 10


def test_enqueue_in_takes_a_timedelta_and_refuses_negative_delays(
    enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys
) -> None:
    enqueuer.enqueue_in("q", timedelta(minutes=5), "X")
    [(_, score)] = scheduled(redis_client, keys)
    assert abs(score - (time.time() + 300)) < 5
    with pytest.raises(ValueError, match="negative"):
        enqueuer.enqueue_in("q", timedelta(seconds=-1), "X")
    with pytest.raises(ValueError, match="negative"):
        enqueuer.enqueue_in("q", -5, "X")


# -- run_forever ---------------------------------------------------------------------------


RUN_FOREVER = '''
import os, sys
import redis
from exq_fast import Config, Exq, worker

r = redis.Redis.from_url(os.environ["REDIS_URL"])

@worker("Rf.Job")
def job(key):
    r.set(key, "ran")

exq = Exq(Config.from_env(queues=["default"]))
print("running", flush=True)
exq.run_forever()
print("returned", exq.stopped.is_set(), flush=True)
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_run_forever_runs_jobs_and_returns_after_a_graceful_stop(
    sig: signal.Signals, tmp_path: Path, redis_url: str, namespace: str,
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a script that only runs workers
    (tmp_path / "app.py").write_text(RUN_FOREVER)
    env = {**os.environ, "REDIS_URL": redis_url, "EXQ_NAMESPACE": namespace}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        # When a job is enqueued, it runs
        with Enqueuer(Config(redis_url=redis_url, namespace=namespace)) as enqueuer:
            enqueuer.enqueue("default", "Rf.Job", [keys.p("ran")])
        wait_for(lambda: redis_client.get(keys.p("ran")) == b"ran", what="the job ran")
        node_id = wait_for(lambda: redis_client.smembers(keys.processes), what="node record")
        assert node_id
    finally:
        # and when the signal comes, run_forever returns after a graceful stop
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "returned True" in out
    assert redis_client.smembers(keys.processes) == set()  # its records are removed


LONG_JOB = '''
import logging, os, time
import redis
from exq_fast import Config, Exq, worker

logging.basicConfig(level=logging.INFO)
r = redis.Redis.from_url(os.environ["REDIS_URL"])

@worker("Rf.Long")
def long(key):
    r.set(key + ":started", 1)
    if os.environ.get("ONE_CALL"):
        time.sleep(15)  # one blocking call: Python cannot interrupt it
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.02)
    r.set(key + ":ended", 1)

Exq(Config.from_env(queues=["default"])).run_forever()
print("returned", flush=True)
'''


def _long_job_app(tmp_path: Path, redis_url: str, namespace: str, shutdown_ms: int,
                  redis_client: redis.Redis, keys: Keys,
                  one_call: bool = False) -> subprocess.Popen[str]:
    (tmp_path / "app.py").write_text(LONG_JOB)
    env = {**os.environ, "REDIS_URL": redis_url, "EXQ_NAMESPACE": namespace,
           "EXQ_SHUTDOWN_TIMEOUT": str(shutdown_ms), "ONE_CALL": "1" if one_call else ""}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with Enqueuer(Config(redis_url=redis_url, namespace=namespace)) as enqueuer:
        enqueuer.enqueue("default", "Rf.Long", [keys.p("long")])
    wait_for(lambda: redis_client.get(keys.p("long:started")), what="the job started")
    return proc


@pytest.mark.parametrize("one_call", [False, True], ids=["python loop", "one blocking call"])
def test_run_forever_interrupts_a_job_that_outlives_the_shutdown_timeout(
    one_call: bool, tmp_path: Path, redis_url: str, namespace: str,
    redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a script running a long job (a loop of short sleeps, or one sleep(15) that
    # Python cannot interrupt), with a shutdown timeout of 0.5 s
    proc = _long_job_app(tmp_path, redis_url, namespace, 500, redis_client, keys, one_call)
    # When it is told to stop
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # Then run_forever returns soon, the job put back in its queue
    assert proc.stdout is not None
    lines = [proc.stdout.readline()]
    while lines[-1] and "returned" not in lines[-1]:
        lines.append(proc.stdout.readline())
    assert "returned" in lines[-1], "".join(lines)
    assert time.monotonic() - began < 8, "".join(lines)
    assert [json.loads(raw)["class"] for raw in
            cast(list[bytes], redis_client.lrange(keys.queue("default"), 0, -1))] == ["Rf.Long"]
    assert redis_client.zcard(keys.retry) == 0 and redis_client.zcard(keys.dead) == 0
    # and the process ends soon too -- it does not wait for the job's thread, even one
    # inside a C call Python cannot interrupt -- and the job does not run on to its
    # end here (it would run twice)
    rest, _ = proc.communicate(timeout=40)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert time.monotonic() - began < 10, out
    assert redis_client.get(keys.p("long:ended")) is None
    if not one_call:  # a job in a C call is never reached by the interrupt
        assert "NodeStopped" in out


def test_run_forever_stops_at_once_on_a_second_signal(
    tmp_path: Path, redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a script running a 30 s job, with a long shutdown timeout, told to stop
    proc = _long_job_app(tmp_path, redis_url, namespace, 60_000, redis_client, keys)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    wait_for(lambda: "stopping gracefully" in (proc.stdout.readline() or ""), timeout=10,
             what="the graceful stop began")
    # When a second signal comes
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    # Then the process exits at once with status 1, no traceback, the job back in its queue
    assert proc.returncode == 1, out
    assert time.monotonic() - began < 5
    assert "Traceback" not in out
    assert redis_client.llen(keys.queue("default")) == 1
    assert redis_client.get(keys.p("long:ended")) is None
