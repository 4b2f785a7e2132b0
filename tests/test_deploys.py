"""A rolling deploy, from the outside: an older node meets a job of a class only
the new release has.

Issue 12 found such a job buried in the dead set within milliseconds, with no
warning and no retry. Now it is retried with the normal backoff as
``UnknownWorker`` (as Sidekiq retries a ``NameError``), and the new release runs
the retry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import redis

from exq_fast.keys import Keys
from tests.conftest import wait_for

OLD = '''
from exq_fast import worker

@worker("Shop.Old")
def old():
    pass
'''

NEW = '''
import os
import redis
from exq_fast import worker

r = redis.Redis.from_url(os.environ["REDIS_URL"])

@worker("Shop.Old")
def old():
    pass

@worker("Shop.SendReceipt")
def send_receipt(key):
    r.set(key, "sent")
'''


def _run(cwd: Path, env: dict[str, str], module: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "exq_fast", "run", "--workers", module],
                            cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def test_a_job_unknown_to_an_old_node_is_retried_and_the_new_release_runs_it(
    tmp_path: Path, redis_url: str, namespace: str, redis_client: redis.Redis, keys: Keys
) -> None:
    # Given a node of the old release, which lacks Shop.SendReceipt
    (tmp_path / "old.py").write_text(OLD)
    (tmp_path / "new.py").write_text(NEW)
    env = {**os.environ, "REDIS_URL": redis_url, "EXQ_NAMESPACE": namespace}
    old = _run(tmp_path, env, "old.py")
    try:
        # When a producer of the new release enqueues a job of the new class
        done = keys.p("test:receipt")
        subprocess.run([sys.executable, "-m", "exq_fast", "enqueue", "default",
                        "Shop.SendReceipt", json.dumps([done])], env=env, check=True,
                       capture_output=True)
        # Then the old node does not bury it: it waits in the retry set
        wait_for(lambda: redis_client.zcard(keys.retry) == 1, what="a retry entry",
                 detail=lambda: f"dead set: {redis_client.zrange(keys.dead, 0, -1)}")
    finally:
        old_log = _stop(old)
    assert redis_client.zcard(keys.dead) == 0
    [(member, score)] = cast(list[tuple[bytes, float]],
                             redis_client.zrange(keys.retry, 0, -1, withscores=True))
    entry: dict[str, Any] = json.loads(member)
    assert entry["error_class"] == "UnknownWorker"
    assert entry["retry_count"] == 1
    assert score > time.time() + 10  # Sidekiq's backoff: at least 16 s away
    assert "Shop.SendReceipt" in old_log  # the failure is logged
    # When the new release is deployed and the retry comes due
    new = _run(tmp_path, env, "new.py")
    try:
        redis_client.zadd(keys.retry, {member: time.time()})
        # Then the new node runs it
        wait_for(lambda: redis_client.get(done) == b"sent", timeout=15, what="the receipt")
    finally:
        _stop(new)
    assert redis_client.zcard(keys.retry) == 0
    assert redis_client.zcard(keys.dead) == 0
