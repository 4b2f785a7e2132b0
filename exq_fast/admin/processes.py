"""The worker processes: live nodes, the jobs they run, signals, prune, backups.

Owns the process registries (``R(processes)``; with the empty namespace,
Sidekiq's ``processes`` too), the node hashes ``R(<node>)`` (read only), the
in-progress records (``P(<node>:workers)``, Sidekiq's ``<identity>:work`` and
Exq 0.13's JSON members of the registry) and the signal lists
(docs/wire-format.md §8). The backup lists and the node registry ``P(nodes)``
are ``exq_fast.nodes``' and ``exq_fast.store.recovery``'s; this module only calls them.

Nodes of Exq, Exq 0.13, Sidekiq and exq-fast are all read; a node in both
registries (exq-fast) is listed once. Reads are pipelined: a few round trips
per call. ``send_signal`` and ``clear_running`` are one MULTI each.

``prune_dead_nodes(client, keys)`` is a plain function, the one
implementation of the prune (the node pinger runs it every 10th ping): a
registry member whose node hash has no ``info`` is unregistered and its
in-progress hashes deleted, under WATCH, so a node that pings meanwhile keeps
everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from .. import nodes as node_registry
from ..config import Config
from ..connection import text
from ..job import Job, encode, loads_object, to_seconds
from ..keys import Keys
from ..store.recovery import requeue_backup
from ._common import as_bytes, as_int, check_name, entry

__all__ = ["NodeAlive", "NodeInfo", "ProcessInfo", "Processes", "Source", "prune_dead_nodes"]

Source = Literal["exq", "sidekiq", "exq-0.13"]
"""Who registered a node: Exq / exq-fast, Sidekiq, or an Exq 0.13 in-progress record."""

SIGNAL_TTL = 60
"""EXPIRE of a signal list, in seconds (Exq's and Sidekiq's)."""

_NODE_FIELDS = ("info", "busy", "beat", "quiet")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A worker process registered in ``processes`` (Exq node, Sidekiq process), or
    the Exq 0.13 in-progress records of one host (``source == "exq-0.13"``)."""

    identity: str
    """The registry member: the id signals are sent to."""
    hostname: str | None
    pid: str | int | None
    """As stored: a string for Exq, an integer for Sidekiq and exq-fast."""
    started_at: float | None
    queues: tuple[str, ...]
    busy: int
    quiet: bool
    concurrency: int
    beat: float | None
    """Time of the last ping, float seconds (None for Exq 0.13)."""
    source: Source
    labels: tuple[str, ...] = ()
    tag: str = ""
    version: str | None = None
    stuck: int = 0
    """Jobs running past their timeout, which ignored it (exq-fast's ``info.stuck``;
    0 for other nodes)."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One job in progress, as its node recorded it."""

    node: str
    field: str
    """The record's hash field (Exq worker pid, Sidekiq thread id; Exq 0.13: pid)."""
    queue: str | None
    run_at: float | None
    payload_raw: bytes
    """The job as recorded (Exq: re-encoded; Sidekiq, exq-fast: as fetched)."""
    job: Job | None = dataclasses.field(compare=False)

    @property
    def jid(self) -> str | None:
        """The job id, or None."""
        return self.job.jid if self.job is not None else None


class NodeAlive(Exception):
    """Refused: the node is alive (its backup lists hold running jobs)."""


@dataclass(frozen=True, slots=True)
class _Registry:
    """A process registry set and the hash key of one of its members."""

    key: str
    node_key: Callable[[str], str]


# -- the view --------------------------------------------------------------------------


class Processes:
    """Nodes, their running jobs, signals, prune and backup lists. See the module doc."""

    def __init__(self, client: redis.Redis, keys: Keys, config: Config) -> None:
        self._redis = client
        self._keys = keys
        self._window = node_registry.dead_window(config.heartbeat_interval,
                                                 config.missed_heartbeats_allowed)

    def nodes(self) -> list[NodeInfo]:
        """Every live node, sorted by identity, then the Exq 0.13 hosts.

        A member whose hash has no ``info`` has stopped and is skipped.
        """
        per_registry, legacy = _registry_members(self._redis, self._keys)
        found: dict[str, NodeInfo] = {}
        for registry, ids in per_registry:
            for node in self._read_nodes(registry, ids):
                found.setdefault(node.identity, node)
        return [found[i] for i in sorted(found)] + _legacy_nodes(legacy)

    def running(self, node: str | None = None) -> list[ProcessInfo]:
        """The jobs in progress (of ``node`` only, if given), by start time.

        Exq's ``<node>:workers`` hashes, Sidekiq's ``<identity>:work`` (6.5+;
        ``:workers`` up to 6.4) and Exq 0.13's JSON records; a job recorded in
        both hashes of one node (exq-fast writes both) is listed once.
        """
        ids, legacy = _node_ids(self._redis, self._keys)
        if node is not None:
            ids = [node]
        records = self._hash_processes(ids) + [
            p for p in map(_legacy_process, legacy) if node is None or p.node == node]
        return sorted(records, key=lambda p: (p.run_at or 0.0, p.node, p.field))

    def busy(self) -> int:
        """Jobs running, summed over the nodes' ``busy`` fields (and Exq 0.13 records)."""
        return sum(node.busy for node in self.nodes())

    def clear_running(self) -> None:
        """Exq's ``clear_processes``: delete every node's in-progress records
        (``:workers``, ``:work``, and the Exq 0.13 members of the registry), in one
        MULTI. A running node writes its own back."""
        ids, legacy = _node_ids(self._redis, self._keys)
        pipe = self._redis.pipeline(transaction=True)
        for node in ids:
            pipe.delete(self._keys.workers(node), self._keys.sidekiq_work(node))
        for registry in _registries(self._keys):
            if legacy:
                pipe.srem(registry.key, *legacy)
        pipe.execute()

    def send_signal(self, node_id: str, signal: str) -> None:
        """LPUSH ``signal`` to the node's signal list(s), EXPIRE 60, in one MULTI.

        With the empty namespace, Sidekiq's ``<identity>-signals`` gets it too.
        """
        check_name("node_id", node_id)
        check_name("signal", signal)
        pipe = self._redis.pipeline(transaction=True)
        for key in self._signal_keys(node_id):
            pipe.lpush(key, signal)
            pipe.expire(key, SIGNAL_TTL)
        pipe.execute()

    def pending_signals(self, node_ids: Iterable[str]) -> dict[str, list[str]]:
        """The signals sent to each node and not yet taken (oldest first), in one
        pipeline: what a node will act on at its next ping."""
        keys = {node_id: self._signal_keys(node_id) for node_id in node_ids}
        pipe = self._redis.pipeline(transaction=False)
        for node_keys in keys.values():
            for key in node_keys:
                pipe.lrange(key, 0, -1)
        replies = iter(pipe.execute())
        pending: dict[str, list[str]] = {}
        for node_id, node_keys in keys.items():
            signals = [text(s) for _ in node_keys for s in reversed(next(replies))]
            pending[node_id] = list(dict.fromkeys(signals))
        return pending

    def _signal_keys(self, node_id: str) -> list[str]:
        """The signal list(s) of a node: Exq's, and with the empty namespace Sidekiq's
        too (the same key otherwise, listed once)."""
        return list(dict.fromkeys((self._keys.signals(node_id),
                                   self._keys.sidekiq_signals(node_id))))

    def quiet(self, node_id: str) -> None:
        """Ask ``node_id`` to stop fetching jobs (``TSTP``)."""
        self.send_signal(node_id, "TSTP")

    def stop(self, node_id: str) -> None:
        """Ask ``node_id`` to shut down (``TERM``; Exq nodes ignore it)."""
        self.send_signal(node_id, "TERM")

    def cancel(self, node_id: str, jid: str) -> None:
        """Ask ``node_id`` to cancel the running job ``jid`` (``CANCEL:{"pid","jid"}``).

        Raises ``LookupError`` when no process record of ``node_id`` runs ``jid``.
        """
        check_name("jid", jid)
        running = [p for p in self.running(node_id) if p.jid == jid]
        if not running:
            raise LookupError(f"no process of node {node_id!r} is running job {jid!r}")
        body = encode({"pid": running[0].field or "", "jid": jid}).decode("utf-8")
        self.send_signal(node_id, "CANCEL:" + body)

    def prune_dead_nodes(self) -> list[str]:
        """``prune_dead_nodes`` on this view's Redis and namespace."""
        return prune_dead_nodes(self._redis, self._keys)

    def backups(self) -> list[node_registry.Backup]:
        """Every non-empty backup list, with its node's state (alive, dead, unknown)."""
        return node_registry.backups(self._redis, self._keys,
                                     node_registry.ProcessIdentity.current(), self._window)

    def requeue_backups(self, node_id: str) -> int:
        """Put the jobs of a node that is not alive back at the front of their queues
        (uncounted) and forget the node. Raises ``NodeAlive`` for a live node: its jobs
        are running. Returns how many jobs moved."""
        lists = [b for b in self.backups() if b.node_id == node_id]
        alive = [b for b in lists if b.state == node_registry.Liveness.ALIVE.value]
        if alive:
            raise NodeAlive(f"node {node_id!r} is alive: its {sum(b.size for b in alive)} "
                            "job(s) in flight are running; stop it first")
        moved = sum(requeue_backup(self._redis, self._keys, node_id, b.queue)
                    for b in lists)
        registered = self._redis.hget(self._keys.nodes, node_id)
        if registered is not None:
            node_registry.forget(self._redis, self._keys, node_id, registered)
        return moved

    def _read_nodes(self, registry: _Registry, ids: list[str]) -> list[NodeInfo]:
        pipe = self._redis.pipeline(transaction=False)
        for node in ids:
            pipe.hmget(registry.node_key(node), list(_NODE_FIELDS))
        infos = (_node_info(node, values) for node, values in
                 zip(ids, pipe.execute(raise_on_error=False), strict=True)
                 if isinstance(values, list))
        return [info for info in infos if info is not None]

    def _hash_processes(self, ids: list[str]) -> list[ProcessInfo]:
        pipe = self._redis.pipeline(transaction=False)
        for node in ids:
            pipe.hgetall(self._keys.workers(node))
            pipe.hgetall(self._keys.sidekiq_work(node))
        replies = [r if isinstance(r, dict) else {} for r in pipe.execute(raise_on_error=False)]
        out: list[ProcessInfo] = []
        for index, node in enumerate(ids):
            merged = {**replies[2 * index + 1], **replies[2 * index]}  # :workers wins
            out += [_process_info(node, text(f), as_bytes(v)) for f, v in merged.items()]
        return out


# -- prune -----------------------------------------------------------------------------


def prune_dead_nodes(client: redis.Redis, keys: Keys) -> list[str]:
    """Unregister the members whose node hash has no ``info`` (stopped nodes) and
    delete their in-progress hashes; Exq 0.13 records go too, as Exq does.
    A node that pings meanwhile is kept (WATCH). Returns the members removed."""
    ids, legacy = _node_ids(client, keys)
    removed = _remove_legacy(client, keys, legacy)
    gone = _dead_ids(client, keys, ids)
    return removed + (_remove_gone(client, keys, gone) if gone else [])


def _dead_ids(client: redis.Redis, keys: Keys, ids: list[str]) -> list[str]:
    per_node = [_node_keys(keys, node) for node in ids]
    pipe = client.pipeline(transaction=False)
    for node_keys in per_node:
        for key in node_keys:
            pipe.hexists(key, "info")
    # An error reply (not a hash) counts as alive: prune never touches what it
    # cannot read.
    alive = iter(not isinstance(r, int) or bool(r) for r in pipe.execute(raise_on_error=False))
    return [node for node, node_keys in zip(ids, per_node, strict=True)
            if sum(next(alive) for _ in node_keys) == 0]


def _remove_legacy(client: redis.Redis, keys: Keys, legacy: list[bytes]) -> list[str]:
    if not legacy:
        return []
    pipe = client.pipeline(transaction=True)
    for registry in _registries(keys):
        pipe.srem(registry.key, *legacy)
    pipe.execute()
    return [text(member) for member in legacy]


def _remove_gone(client: redis.Redis, keys: Keys, candidates: list[str]) -> list[str]:
    # WATCH the candidates' hashes and check again: a node that pings between
    # the check and EXEC aborts the transaction, so a live node never loses
    # its records. After an abort, nothing is removed (the next prune retries).
    watched = [key for node in candidates for key in _node_keys(keys, node)]
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(*watched)  # type: ignore[no-untyped-call]
            gone = [n for n in candidates
                    if not any(pipe.hexists(k, "info") for k in _node_keys(keys, n))]
            if gone:
                pipe.multi()
                for registry in _registries(keys):
                    pipe.srem(registry.key, *gone)
                for node in gone:
                    pipe.delete(keys.workers(node), keys.sidekiq_work(node))
                pipe.execute()
        except redis.WatchError:
            return []
    return gone


# -- registries ------------------------------------------------------------------------


def _registries(keys: Keys) -> list[_Registry]:
    exq = _Registry(keys.processes, keys.node)
    if keys.sidekiq_processes == keys.processes:
        return [exq]
    return [exq, _Registry(keys.sidekiq_processes, keys.sidekiq_process)]


def _node_keys(keys: Keys, node: str) -> list[str]:
    return list(dict.fromkeys(r.node_key(node) for r in _registries(keys)))


def _registry_members(client: redis.Redis, keys: Keys
                      ) -> tuple[list[tuple[_Registry, list[str]]], list[bytes]]:
    """The node ids of each registry, and the Exq 0.13 JSON members of any."""
    per_registry: list[tuple[_Registry, list[str]]] = []
    legacy: dict[bytes, None] = {}
    for registry in _registries(keys):
        members = [as_bytes(m) for m in
                   cast(Iterable[bytes | str], client.smembers(registry.key))]
        legacy.update((m, None) for m in members if _legacy_record(m) is not None)
        per_registry.append((registry, [text(m) for m in members if m not in legacy]))
    return per_registry, list(legacy)


def _node_ids(client: redis.Redis, keys: Keys) -> tuple[list[str], list[bytes]]:
    """The node ids of every registry (deduplicated), and the Exq 0.13 members."""
    per_registry, legacy = _registry_members(client, keys)
    return list(dict.fromkeys(n for _, ids in per_registry for n in ids)), legacy


# -- records ---------------------------------------------------------------------------


def _json_object(raw: bytes) -> dict[str, Any]:
    return loads_object(raw) or {}  # junk reads as no fields


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _str_tuple(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _float(value: object) -> float | None:
    try:
        return float(value) if isinstance(value, bytes | str | int | float) else None
    except ValueError:
        return None


def _quiet(stored: bytes | None, info: dict[str, Any]) -> bool:
    if stored is not None:
        return text(stored) == "true"
    return info.get("quiet") is True


def _node_info(node: str, values: list[bytes | None]) -> NodeInfo | None:
    raw_info, busy, beat, quiet = values
    if raw_info is None:
        return None  # stopped (hash expired) or never registered
    info = _json_object(raw_info)
    pid = info.get("pid")
    return NodeInfo(
        identity=node, hostname=_opt_str(info.get("hostname")),
        pid=pid if isinstance(pid, str | int) and not isinstance(pid, bool) else None,
        started_at=to_seconds(info.get("started_at")), queues=_str_tuple(info.get("queues")),
        busy=as_int(busy) if busy is not None else as_int(info.get("busy")),
        quiet=_quiet(quiet, info), concurrency=as_int(info.get("concurrency")),
        beat=_float(beat), source="exq" if "busy" in info else "sidekiq",
        labels=_str_tuple(info.get("labels")), tag=_opt_str(info.get("tag")) or "",
        version=_opt_str(info.get("version")), stuck=max(as_int(info.get("stuck")), 0),
    )


def _process_info(node: str, name: str, value: bytes) -> ProcessInfo:
    record = _json_object(value)
    payload = record.get("payload")
    if isinstance(payload, str):
        # A lone surrogate (from a "\ud800" escape in the record) has no UTF-8 form:
        # written back as that escape, so the job still reads (and the page renders).
        raw = payload.encode("utf-8", "backslashreplace")
    else:
        raw = encode(payload) if isinstance(payload, dict) else value
    job = entry(raw).job
    queue = _opt_str(record.get("queue")) or (job.queue if job is not None else None)
    return ProcessInfo(node, name, queue, to_seconds(record.get("run_at")), raw, job)


def _legacy_record(member: bytes) -> dict[str, Any] | None:
    """An Exq 0.13 in-progress record (a JSON object member of ``processes``), or None."""
    if not member.startswith(b"{"):
        return None
    record = _json_object(member)
    return record if record else None


def _legacy_process(member: bytes) -> ProcessInfo:
    record = _legacy_record(member) or {}
    job_text = record.get("job")
    raw = job_text.encode("utf-8") if isinstance(job_text, str) else member
    job = entry(raw).job
    return ProcessInfo(_opt_str(record.get("host")) or "", _opt_str(record.get("pid")) or "",
                       job.queue if job is not None else None,
                       to_seconds(record.get("started_at")), raw, job)


def _legacy_nodes(members: list[bytes]) -> list[NodeInfo]:
    by_host: dict[str, list[ProcessInfo]] = {}
    for process in map(_legacy_process, members):
        by_host.setdefault(process.node, []).append(process)
    return [_legacy_node(host, group) for host, group in sorted(by_host.items())]


def _legacy_node(host: str, group: list[ProcessInfo]) -> NodeInfo:
    starts = [p.run_at for p in group if p.run_at is not None]
    return NodeInfo(
        identity=host, hostname=host, pid=None, started_at=min(starts) if starts else None,
        queues=tuple(sorted({p.queue for p in group if p.queue})), busy=len(group),
        quiet=False, concurrency=0, beat=None, source="exq-0.13",
    )
