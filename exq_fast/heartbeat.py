"""Node registration (``NodePinger``) and Exq's dead-node monitor (``Heartbeat``).

``NodePinger`` makes this process visible to Exq's Api / exq_ui and to the
Sidekiq Web UI (docs/wire-format.md §8.1-§8.3) and delivers the signals they
send (§8.4). ``Heartbeat`` is Exq's opt-in ``heartbeat_enable`` feature
(docs/wire-format.md §8.6): it beats into the heartbeats zset and
re-enqueues the backups of nodes that stopped beating. Both run as
``BackgroundLoop`` threads (see ``background``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from . import nodes, scripts
from ._version import __version__
from .admin.processes import prune_dead_nodes
from .background import BackgroundLoop, ErrorHook, RecoveredHook, Step
from .config import Config
from .connection import text
from .inflight import InFlight
from .keys import Keys
from .store import recovery

logger = logging.getLogger("exq_fast")

PING_INTERVAL = nodes.PING_INTERVAL
"""Seconds between two node pings (Exq's and Sidekiq 6's beat)."""
NODE_TTL = 60
"""EXPIRE of the node hash and of the Sidekiq work hash, in seconds."""
SIGNALS_PER_PING = 100
"""Most signals read from one signal list per ping (Exq's LRANGE 0 99)."""
PRUNE_EVERY = 10
"""Pings between two prunes of the process registry (ping 0, 10, 20, ...)."""
HEARTBEAT_RETRY_CAP = 5.0
"""After a failed heartbeat tick, retry after min(interval, this) seconds."""
FORGET_ATTEMPTS = 5
"""Tries to drop a dead node's heartbeat when other nodes' beats keep racing us."""

class NodeState(Protocol):
    """What the pinger needs to know about the running node (the app implements it)."""

    def busy(self) -> int:
        """Jobs running now."""
        ...

    def subscriptions(self) -> list[str]:
        """The queues currently consumed; empty means quiet."""
        ...

    def total_concurrency(self) -> int:
        """Sum of the finite queue limits plus 1000 per unlimited queue."""
        ...

    def stuck(self) -> int:
        """Jobs running that ignored their timeout (see ``timeouts``)."""
        ...

    def running_jobs(self) -> list[InFlight]:
        """The jobs running now."""
        ...

    def on_signal(self, signal: str) -> None:
        """Handle ``"TSTP"``, ``"TERM"``, ``"CANCEL:<json>"``; others: the app decides."""
        ...


def rss_kb() -> int:
    """This process's resident set size in kB (``VmRSS``), or 0 where unreadable."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # not Linux, or an odd format: Sidekiq shows 0, which is honest
    return 0


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class NodePinger(BackgroundLoop):
    """Registers this node every ``interval`` seconds (first ping at once) and
    delivers the signals sent to it; prunes dead nodes every 10th ping.

    Writes the Exq form (``R(processes)``, ``R(node)`` hash) and the Sidekiq
    form (``P(processes)``, ``P(node)``, ``P(node):work``); they are the same
    keys unless the namespace is empty, in which case both are written.
    ``stop()`` leaves the registration to expire (60 s); at a graceful
    shutdown call ``remove()`` after ``stop()``.
    """

    thread_name = "exq-node-pinger"

    def __init__(self, client: redis.Redis, keys: Keys, config: Config, state: NodeState,
                 on_error: ErrorHook | None = None, *, interval: float = PING_INTERVAL,
                 identity: nodes.ProcessIdentity | None = None) -> None:
        super().__init__(interval, on_error)
        self.identity = identity or nodes.ProcessIdentity.current()
        self.client = client
        self.keys = keys
        self.state = state
        self.config = config
        self.node_id = config.node_id
        self.started_at = time.time()
        self.pings = 0
        """Pings done so far; the prune runs when this is a multiple of 10."""
        self.version = __version__
        self._registries = self._registry_pairs()
        self._signal_keys = self._signal_lists()

    def _registry_pairs(self) -> list[tuple[str, Callable[[str], str]]]:
        pairs: list[tuple[str, Callable[[str], str]]] = [(self.keys.processes, self.keys.node)]
        if self.keys.sidekiq_processes != self.keys.processes:  # empty namespace
            pairs.append((self.keys.sidekiq_processes, self.keys.sidekiq_process))
        return pairs

    def _signal_lists(self) -> list[str]:
        exq = self.keys.signals(self.node_id)
        sidekiq = self.keys.sidekiq_signals(self.node_id)
        return [exq] if sidekiq == exq else [exq, sidekiq]

    def steps(self) -> Sequence[Step]:
        """One step: ``run_once`` under the operation name ``"node_ping"``."""
        return [("node_ping", self.run_once)]

    def run_once(self) -> list[str]:
        """Ping, hand the signals received to ``state.on_signal`` (oldest first),
        and prune on pings 0, 10, 20, ... Returns the signals handled."""
        signals = self.ping()
        count = self.pings
        self.pings += 1
        # Signals are handled before the prune: they are already trimmed from
        # Redis, so a prune failure must not lose them.
        self._dispatch(signals)
        if signals:
            # What a signal changed (quiet, stopping, the queues) shows now, not at
            # the next ping 5 s later: a UI would show the node running meanwhile.
            self._write_fields()
        if count % PRUNE_EVERY == 0:
            self.prune()
        return signals

    def _write_fields(self) -> None:
        """Write this node's hash fields (``info``, ``busy``, ``quiet``...) again."""
        pipe = self.client.pipeline(transaction=True)
        self._add_fields(pipe)
        pipe.execute()

    def _add_fields(self, pipe: Pipeline) -> None:
        """Queue the node hash's fields on ``pipe``, each hash with its TTL (never a
        hash without one: a node gone meanwhile must not leave it for ever)."""
        fields = self.node_fields()
        for _, node_key in self._registries:
            pipe.hset(node_key(self.node_id), mapping=fields)
            pipe.expire(node_key(self.node_id), NODE_TTL)

    def ping(self) -> list[str]:
        """Write this node's registration in one MULTI/EXEC; return the signals read."""
        pipe = self.client.pipeline(transaction=True)
        # Re-registered at every ping: a node a monitor took for dead (cut off
        # from Redis for too long) is known again once it is back -- unless
        # another process claimed its id meanwhile (see ``_lost_id``).
        # execute_command, not pipe.eval: a Redis Cluster pipeline has no eval().
        pipe.execute_command(  # type: ignore[no-untyped-call]
            "EVAL", scripts.REFRESH_NODE, 1, self.keys.nodes, self.node_id,
            self.identity.to_json())
        for processes, _ in self._registries:
            pipe.sadd(processes, self.node_id)
        self._add_fields(pipe)
        self._write_work(pipe, self.state.running_jobs())
        for key in self._signal_keys:
            pipe.lrange(key, 0, SIGNALS_PER_PING - 1)
            pipe.ltrim(key, SIGNALS_PER_PING, -1)
        replies = pipe.execute()
        if not replies[0]:
            self._lost_id()
        lists = replies[-2 * len(self._signal_keys)::2]
        # Senders LPUSH, so each LRANGE is newest first: reverse it.
        return [text(s) for signals in lists for s in reversed(signals)]

    def _lost_id(self) -> None:
        # Another live process holds this id now: fetching more would put jobs in
        # a backup list it owns. Quiet; the jobs running here still finish.
        if self.state.subscriptions():
            logger.error("node id %r was claimed by another process while this one was cut "
                         "off from Redis: no more fetching here (quiet)", self.node_id)
            self.state.on_signal("TSTP")

    def node_fields(self) -> dict[FieldT, EncodableT]:
        """The node hash: Exq's info/busy/beat/quiet plus Sidekiq's rss/rtt_us."""
        queues = list(self.state.subscriptions())
        busy = self.state.busy()
        quiet = not queues
        return {
            "info": _compact(self.info(queues, busy, quiet)),
            "busy": str(busy),
            "beat": repr(time.time()),
            "quiet": "true" if quiet else "false",
            "rss": str(rss_kb()),
            "rtt_us": "0",
        }

    def info(self, queues: list[str], busy: int, quiet: bool) -> dict[str, object]:
        """The ``info`` JSON object: Exq's node struct plus Sidekiq's fields."""
        return {
            "hostname": socket.gethostname(),
            "identity": self.node_id,
            "started_at": self.started_at,
            "pid": os.getpid(),  # an integer: Sidekiq needs it, Exq accepts it
            "tag": "",
            "concurrency": self.state.total_concurrency(),
            "queues": queues,
            "labels": [],
            "busy": busy,
            "quiet": quiet,
            "version": self.version,
            "embedded": False,
            "stuck": self.state.stuck(),  # exq-fast's: jobs that ignored their timeout
        }

    def _write_work(self, pipe: Pipeline, jobs: list[InFlight]) -> None:
        key = self.keys.sidekiq_work(self.node_id)
        pipe.delete(key)
        if jobs:
            pipe.hset(key, mapping={job.field: _work_json(job) for job in jobs})
            pipe.expire(key, NODE_TTL)

    def _dispatch(self, signals: list[str]) -> None:
        for signal in signals:
            try:
                self.state.on_signal(signal)
            except Exception:
                # The signal is gone from Redis; one bad handler must not drop the rest.
                logger.exception("node_ping: handling signal %r failed", signal)

    def prune(self) -> list[str]:
        """Remove the registry members whose node hash is gone (and their in-progress
        hashes); return them. A live node's records are never touched (see
        ``admin.processes.prune_dead_nodes``, the one implementation)."""
        return prune_dead_nodes(self.client, self.keys)

    def remove(self) -> None:
        """Unregister this node at a graceful stop: registry membership, node
        hash(es), the Sidekiq work hash and the Exq workers hash, in one MULTI."""
        pipe = self.client.pipeline(transaction=True)
        for processes, node_key in self._registries:
            pipe.srem(processes, self.node_id)
            pipe.delete(node_key(self.node_id))
        pipe.delete(self.keys.sidekiq_work(self.node_id), self.keys.workers(self.node_id))
        pipe.execute()


def _work_json(job: InFlight) -> str:
    # The payload is shown, never parsed back: undecodable bytes become U+FFFD.
    payload = job.raw.decode("utf-8", "replace")
    return _compact({"queue": job.queue, "payload": payload, "run_at": int(job.run_at)})


class Heartbeat(BackgroundLoop):
    """Beats into ``R(heartbeats)`` (Exq's ``heartbeat_enable``) and recovers dead nodes,
    every ``heartbeat_interval`` ms.

    A node is dead as ``nodes.judge`` says: on this machine as soon as its
    process is gone; elsewhere after ``window()`` seconds without a heartbeat
    or a process-record beat. Candidates are the nodes of exq-fast's registry
    (whatever their own settings were) and the nodes with a heartbeat (Exq's).
    Recovery moves a dead node's backup lists to the front of their queues.

    Safe with any number of monitors: each batch of a recovery moves jobs only
    while the dead node's registry entry (or, for an Exq node, its heartbeat
    score) is the one judged, and each job is moved by one LPOP.
    """

    thread_name = "exq-heartbeat"

    def __init__(self, client: redis.Redis, keys: Keys, config: Config,
                 on_error: ErrorHook | None = None,
                 on_recovered: RecoveredHook | None = None,
                 identity: nodes.ProcessIdentity | None = None) -> None:
        super().__init__(config.heartbeat_interval / 1000.0, on_error)
        self.client = client
        self.keys = keys
        self.node_id = config.node_id
        self.identity = identity or nodes.ProcessIdentity.current()
        self.queue_names = config.queue_names
        self._window = nodes.dead_window(config.heartbeat_interval,
                                         config.missed_heartbeats_allowed)
        self.policy = recovery.RecoveryPolicy.of(config)
        self.on_recovered = on_recovered
        """Called with ``(queue, reason, count)``: reason ``heartbeat`` for jobs moved
        back to their queue, ``poison`` for jobs recovered too often, now dead."""

    def steps(self) -> Sequence[Step]:
        """Two steps: ``"heartbeat"`` (beat) and ``"heartbeat_monitor"`` (monitor)."""
        return [("heartbeat", self.beat), ("heartbeat_monitor", self.monitor)]

    def error_delay(self, failures: int) -> float:
        """Exq's rule: retry after min(interval, 5 s), not a growing backoff, so
        the node beats again as soon as Redis is back and is not taken for dead."""
        return min(self.interval, HEARTBEAT_RETRY_CAP)

    def window(self) -> float:
        """Seconds without a sign of life after which a node elsewhere is dead."""
        return self._window

    def run_once(self) -> int:
        """Beat, then recover dead nodes; return the number of jobs re-enqueued."""
        self.beat()
        return self.monitor()

    def beat(self) -> float:
        """Record this node's heartbeat (MULTI, ZREM, ZADD, EXEC); return the score."""
        score = int(time.time() * 1000) / 1000  # ms precision, as Exq
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.heartbeats, self.node_id)
        pipe.zadd(self.keys.heartbeats, {self.node_id: score})
        pipe.execute()
        return score

    def dead_nodes(self, now: float | None = None) -> list[nodes.NodeRecord]:
        """The other nodes that are dead now (see the class doc)."""
        records = nodes.read_records(self.client, self.keys)
        window = self.window()
        return [record for name, record in records.items() if name != self.node_id
                and nodes.judge(record.identity, record.last_beat, me=self.identity,
                                window=window, now=now) is nodes.Liveness.DEAD]

    def monitor(self) -> int:
        """Recover every dead node; return the number of jobs re-enqueued."""
        return sum(self.recover_node(record) for record in self.dead_nodes())

    def recover_node(self, record: nodes.NodeRecord) -> int:
        """Move a dead node's backups to the front of their queues, then forget it, all
        only while its registry entry (or heartbeat score) is the one judged."""
        moved = 0
        for name in self._queues(record.node_id):
            counts = self._recover_queue(record, name)
            if counts[0]:
                logger.warning("heartbeat_monitor: re-enqueued %d job(s) of dead node %r "
                               "to %r", counts[0], record.node_id, name)
            recovery.settle(self.client, self.keys, self.policy, name, counts, "heartbeat",
                            self.on_recovered)
            moved += counts[0]
        self._forget(record)
        return moved

    def _recover_queue(self, record: nodes.NodeRecord, name: str) -> tuple[int, int]:
        if record.entry is not None:
            return recovery.recover_registered_backup(self.client, self.keys, record.node_id,
                                                      name, record.entry, self.policy)
        return recovery.recover_dead_node_backup(self.client, self.keys, record.node_id, name,
                                                 repr(record.heartbeat), self.policy)

    def _queues(self, node: str) -> list[str]:
        # Exq looks at the known and configured queues only; the node's own
        # backup lists are scanned too, so a queue nobody lists is not missed.
        known = {text(q) for q in self.client.smembers(self.keys.queues)}
        known |= recovery.backup_queues(self.client, self.keys, node)
        return sorted(known | set(self.queue_names))

    def _forget(self, record: nodes.NodeRecord) -> bool:
        if record.entry is not None:
            return nodes.forget(self.client, self.keys, record.node_id, record.entry)
        # An Exq node: WATCH/MULTI rather than Exq's bare ZREM: if the node beat
        # again since its score was read, it is alive and keeps its heartbeat and
        # workers hash. Any beat of any node aborts the EXEC (WatchError): retry.
        for _ in range(FORGET_ATTEMPTS):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    return self._forget_watched(pipe, record.node_id, record.heartbeat)
                except redis.WatchError:
                    continue
        # Still racing: the member stays and the next monitor tick retries.
        return False

    def _forget_watched(self, pipe: Pipeline, node: str, expected: float | None) -> bool:
        pipe.watch(self.keys.heartbeats)  # type: ignore[no-untyped-call]
        if pipe.zscore(self.keys.heartbeats, node) != expected:
            return False  # beat again (alive), or another monitor already forgot it
        pipe.multi()
        pipe.delete(self.keys.workers(node))
        pipe.zrem(self.keys.heartbeats, node)
        pipe.execute()
        return True
