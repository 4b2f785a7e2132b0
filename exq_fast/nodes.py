"""Who a node is, whether it is alive, and the registry that remembers it.

A node id names a node's backup lists, so two live processes must never
share one (each would recover the other's in-flight jobs). The default id is
``<hostname>:<pid>:<6 hex digits>``, new for every process; an id given
explicitly is *claimed* at start-up and refused while another live process
holds it (``NodeIdInUse``).

Every exq-fast node writes its ``ProcessIdentity`` into the registry hash
``P(nodes)`` (node id -> JSON) before it fetches anything. The entry stays
until nothing of the node's is left in Redis: a graceful stop that put every
unfinished job back removes it, and so does the monitor that recovered a dead
node. So a node that dies, even one whose process record expired long ago, is
still known, and its backup lists are recoverable by any live node.

Liveness (``judge``):

* **on this machine** (same hostname, boot and pid namespace): alive exactly
  while its pid runs with the same start time. A node killed by SIGKILL is
  known dead at once, so a restart on the same host recovers its jobs at
  start-up.
* **elsewhere**: alive while a sign of life (its heartbeat score, or the
  ``beat`` of its process record, written every 5 s) is younger than the
  monitor's window. A node that is cut off from Redis for longer than the
  window is taken for dead: its jobs may then run twice (at least once).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from enum import Enum

import redis

from . import scripts
from .connection import text
from .keys import Keys


class NodeIdInUse(Exception):
    """Start-up refused: a live process already runs with this node id."""


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" when unreadable, or when
    the process has exited and waits to be reaped: a zombie runs nothing)."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return ""
    return fields[19]


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """Where a node runs: enough to tell, on the same machine, whether it still runs."""

    host: str
    pid: int
    boot: str
    """The kernel's boot id ("" where unknown): a pid means nothing across reboots."""
    pidns: str
    """The pid namespace (containers sharing a hostname have different ones)."""
    start: str
    """The process's start time in ticks: a reused pid has another."""
    started_at: float

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _read("/proc/sys/kernel/random/boot_id"),
                   _pid_namespace(), _start_ticks(pid), time.time())

    def to_json(self) -> str:
        """The registry entry."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ProcessIdentity | None:
        """The identity in a registry entry, or None if it is not one."""
        try:
            data = json.loads(raw)
            return cls(str(data["host"]), int(data["pid"]), str(data["boot"]),
                       str(data["pidns"]), str(data["start"]), float(data["started_at"]))
        except (ValueError, KeyError, TypeError):
            return None

    def same_machine(self, other: ProcessIdentity) -> bool:
        """True when ``other``'s pid can be checked from here."""
        return bool(self.boot) and (self.host, self.boot, self.pidns) == (
            other.host, other.boot, other.pidns)

    def runs(self) -> bool:
        """Whether this process still runs (only meaningful on its own machine)."""
        start = _start_ticks(self.pid)
        return bool(start) and start == self.start


PING_INTERVAL = 5.0
"""Seconds between two pings of a node's process record (Exq's and Sidekiq 6's beat)."""
MIN_DEAD_WINDOW = 3 * PING_INTERVAL
"""A node elsewhere is dead only after this long without any sign of life, whatever the
heartbeat settings: its process record beats only every ``PING_INTERVAL``."""


def dead_window(heartbeat_interval_ms: int, missed_heartbeats_allowed: int) -> float:
    """Seconds without a sign of life after which a node elsewhere is dead."""
    return max(heartbeat_interval_ms / 1000 * (missed_heartbeats_allowed + 1), MIN_DEAD_WINDOW)


class Liveness(Enum):
    """A node's state as ``judge`` sees it."""

    ALIVE = "alive"
    DEAD = "dead"


def judge(identity: ProcessIdentity | None, last_beat: float | None, *, me: ProcessIdentity,
          window: float, now: float | None = None) -> Liveness:
    """Alive or dead (see the module doc). ``last_beat``: its latest sign of life."""
    if identity is not None and me.same_machine(identity):
        return Liveness.ALIVE if identity.runs() else Liveness.DEAD
    now = time.time() if now is None else now
    if last_beat is not None and now - last_beat <= window:
        return Liveness.ALIVE
    return Liveness.DEAD


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What Redis says about one node: its registry entry and its signs of life."""

    node_id: str
    entry: bytes | None
    """The raw registry entry (the recovery scripts compare it), None if not registered."""
    heartbeat: float | None
    beat: float | None
    """The ``beat`` of its process record (Exq's node hash), None if it has none."""

    @property
    def identity(self) -> ProcessIdentity | None:
        """The registered identity, if any."""
        return None if self.entry is None else ProcessIdentity.from_json(self.entry)

    @property
    def last_beat(self) -> float | None:
        """Its latest sign of life."""
        beats = [b for b in (self.heartbeat, self.beat) if b is not None]
        return max(beats) if beats else None


def _float(value: object) -> float | None:
    try:
        return float(text(value)) if isinstance(value, bytes | str) else None
    except ValueError:
        return None


def read_records(client: redis.Redis, keys: Keys,
                 extra: set[str] | None = None) -> dict[str, NodeRecord]:
    """Every registered node and every node with a heartbeat (plus ``extra``), in two
    round trips."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.nodes)
    pipe.zrange(keys.heartbeats, 0, -1, withscores=True)
    entries, beats = pipe.execute()
    registry = {text(k): v for k, v in entries.items()}
    heartbeats = {text(member): float(score) for member, score in beats}
    names = sorted(set(registry) | set(heartbeats) | (extra or set()))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hget(keys.node(name), "beat")
    node_beats = pipe.execute() if names else []
    return {name: NodeRecord(name, registry.get(name), heartbeats.get(name), _float(beat))
            for name, beat in zip(names, node_beats, strict=True)}


def claim(client: redis.Redis, keys: Keys, node_id: str, me: ProcessIdentity,
          window: float) -> None:
    """Register ``node_id`` for this process, or raise ``NodeIdInUse`` naming the holder.

    A registered process on this machine holds the id while it runs; one
    elsewhere, while its process record beat within ``window``. A stale entry
    (its process gone) never blocks a restart. The entry is replaced only if
    it is still the one judged, so two processes starting at once with one id
    cannot both win.
    """
    mine = me.to_json()
    for _ in range(5):
        record = read_records(client, keys, {node_id})[node_id]
        _refuse_if_held(record, me, window)
        expected = record.entry if record.entry is not None else b""
        if scripts.claim_node(client, [keys.nodes], [node_id, expected, mine]):
            return
    raise NodeIdInUse(f"node id {node_id!r} is being claimed by another process right now")


def _refuse_if_held(record: NodeRecord, me: ProcessIdentity, window: float) -> None:
    holder = record.identity
    if holder is not None and holder.same_machine(me) and holder.pid == me.pid:
        return  # this very process (an earlier node object in it): a restart in-process
    if judge(holder, record.last_beat, me=me, window=window) is Liveness.DEAD:
        return
    where = (f"pid {holder.pid} on host {holder.host}" if holder is not None
             else "a process that is not exq-fast (an Exq or Sidekiq node?)")
    seen = ("" if record.beat is None else
            f", last seen {max(time.time() - record.beat, 0.0):.0f} s ago")
    raise NodeIdInUse(f"node id {record.node_id!r} is in use by {where}{seen}: stop it, or "
                      "give this process another --node-id (or none: ids are unique by default)")


def forget(client: redis.Redis, keys: Keys, node_id: str, entry: bytes | str) -> bool:
    """Drop a node's registry entry, heartbeat, process records and in-progress hashes,
    only while its entry is ``entry`` (its own at a stop, or as a monitor judged it).
    True if it was dropped."""
    records = [keys.workers(node_id), keys.node(node_id), keys.sidekiq_process(node_id),
               keys.sidekiq_work(node_id), keys.signals(node_id)]
    return bool(scripts.release_node(
        client, [keys.nodes, keys.heartbeats, keys.processes, keys.sidekiq_processes, *records],
        [node_id, entry]))


@dataclass(frozen=True, slots=True, order=True)
class Backup:
    """One backup list: the jobs ``node_id`` fetched from ``queue`` and has not acked."""

    node_id: str
    queue: str
    size: int
    state: str
    """``alive``, ``dead`` (a monitor will recover it, or has yet to), or ``unknown``: a
    node that is not exq-fast's and has no heartbeat (an Exq 0.13 node, or one gone for
    long): no monitor touches it; ``exq-fast backups --requeue`` can."""


def state_of(record: NodeRecord, me: ProcessIdentity, window: float) -> str:
    """``alive``, ``dead`` or ``unknown`` (see ``Backup.state``)."""
    if record.entry is None and record.heartbeat is None:
        fresh = record.beat is not None and time.time() - record.beat <= window
        return Liveness.ALIVE.value if fresh else "unknown"
    return judge(record.identity, record.last_beat, me=me, window=window).value


def backups(client: redis.Redis, keys: Keys, me: ProcessIdentity,
            window: float) -> list[Backup]:
    """Every non-empty backup list in the namespace, with its node's state."""
    names = [text(key) for key in client.scan_iter(match=keys.backups_pattern(), count=1000)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    sizes = pipe.execute() if names else []
    found = [(keys.split_backup(name), int(size)) for name, size in zip(names, sizes, strict=True)]
    lists = [(where, size) for where, size in found if where is not None and size]
    records = read_records(client, keys, {node for (node, _), _ in lists})
    return sorted(Backup(node, queue, size, state_of(records[node], me, window))
                  for (node, queue), size in lists)
