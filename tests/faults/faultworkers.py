"""Workers loaded by the fault suite's nodes: ``exq-fast run --workers faultworkers``.

Every execution is recorded in a Redis database of its own (``FAULT_RECORD_URL``,
db 1 of the scenario's private server unless the scenario says otherwise):
a ``start`` record before the work and an ``end`` record after it, each one
RPUSH of JSON ``{"eid", "tag", "pid", "node", "attempt", "event"}`` made
durable (retried until Redis acknowledges it) before the job goes on. The
Lua script that writes a record is idempotent per execution id, so a retry
after a lost reply never records an execution twice; ``attempt`` is the
execution's index for its tag (1 = first run).

``Fault.Record(tag, sleep_seconds, mode)``:

* ``ok``: record start, sleep, record end;
* ``fail``: the same, then raise (retry / dead per the job's ``retry``);
* ``exit``: record start, sleep, ``os._exit(1)``: a poison job that kills its
  process at every run;
* ``exit_after``: as ``ok``, and on the first attempt only, SIGKILL its own
  process 0.1 s after returning: after the job ended, before its ack can be
  flushed when ``EXQ_STATS_FLUSH_INTERVAL`` is large;
* ``slow_once``: as ``ok``, but only the first attempt sleeps (a job that a
  stop interrupts runs quickly the next time).

The class names of the Exq and Sidekiq fixture payloads (``Bench.NoopWorker``,
``MyApp.Worker``, ``NoopWorker``, ``MyApp::HardWorker``) are recorded the same
way with the job's jid as the tag.

The workers register themselves only when this file is imported as the
top-level module ``faultworkers`` (by ``exq-fast run``): the test process
imports it as ``tests.faults.faultworkers`` for the key names alone and must
not fill its own ``DEFAULT_REGISTRY``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from typing import Any

import redis

from exq_fast import current_job, worker

STARTS = "fault:starts"
"""List of start records (one per execution)."""
ENDS = "fault:ends"
"""List of end records (one per execution that reached the end of its work)."""
ATTEMPTS = "fault:attempts"
"""Hash tag -> executions started so far."""
SEEN = "fault:seen"
"""Set of ``<eid>:<event>`` already recorded (makes a retried record a no-op)."""

RECORD_TIMEOUT = 60.0
"""Seconds a record is retried while its Redis is down or restarting."""
KILL_DELAY = 0.1
"""Seconds between an ``exit_after`` job's return and the SIGKILL of its process."""

_RECORD = """
if redis.call('SADD', KEYS[1], ARGV[1] .. ':' .. ARGV[2]) == 1 then
  local record = cjson.decode(ARGV[3])
  if ARGV[2] == 'start' then
    record['attempt'] = redis.call('HINCRBY', KEYS[2], record['tag'], 1)
  end
  redis.call('RPUSH', KEYS[3], cjson.encode(record))
end
return tonumber(redis.call('HGET', KEYS[2], cjson.decode(ARGV[3])['tag']) or '0')
"""

_client: redis.Redis | None = None
_client_lock = threading.Lock()


def _recorder() -> redis.Redis:
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ["FAULT_RECORD_URL"], socket_timeout=2.0,
                                           socket_connect_timeout=2.0)
        return _client


def record(event: str, tag: str, eid: str, attempt: int = 0) -> int:
    """Write one record durably (retrying through outages); return the tag's attempt count."""
    data = json.dumps({"eid": eid, "tag": tag, "pid": os.getpid(),
                       "node": os.environ.get("FAULT_NODE", ""), "attempt": attempt,
                       "event": event, "t": time.time()})
    key = STARTS if event == "start" else ENDS
    deadline = time.monotonic() + RECORD_TIMEOUT
    while True:
        try:
            return int(_recorder().eval(_RECORD, 3, SEEN, ATTEMPTS, key, eid, event, data))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _kill_soon() -> None:
    def kill() -> None:
        time.sleep(KILL_DELAY)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill, name="fault-kill", daemon=True).start()


def fault_record(tag: str, sleep_seconds: float, mode: str) -> None:
    """``Fault.Record``: see the module docstring."""
    eid = uuid.uuid4().hex
    attempt = record("start", tag, eid)
    time.sleep(sleep_seconds if mode != "slow_once" or attempt == 1 else 0.0)
    if mode == "exit":
        os._exit(1)
    record("end", tag, eid, attempt)
    if mode == "fail":
        raise RuntimeError(f"Fault.Record {tag} fails on purpose (attempt {attempt})")
    if mode == "exit_after" and attempt == 1:
        _kill_soon()


def fixture_job(*args: Any) -> None:
    """The fixture classes: record one execution under the job's jid."""
    job = current_job()
    tag = str(job.jid if job is not None else "?")
    eid = uuid.uuid4().hex
    attempt = record("start", tag, eid)
    record("end", tag, eid, attempt)


FIXTURE_CLASSES = ("Bench.NoopWorker", "MyApp.Worker", "NoopWorker", "MyApp.HardWorker")


def register() -> None:
    """Register every worker of this module in the default registry."""
    worker("Fault.Record")(fault_record)
    for name in FIXTURE_CLASSES:
        # One function per name: a registry maps a name to one target, and the
        # decorator stamps the target with the name it was registered under.
        def run(*args: Any) -> None:
            fixture_job(*args)

        run.__qualname__ = f"fixture_job[{name}]"
        worker(name)(run)


if __name__ == "faultworkers":
    register()
