"""Every Redis key name exq-fast reads or writes; nothing else builds key strings.

Schema (``ns`` = namespace, ``P(x)`` = ``x`` when ``ns`` is empty else ``ns:x``,
``R(x)`` = always ``ns:x``, so ``:x`` with an empty namespace — Exq's quirk):

==============================  ======  ==========================================
key                             type    contents
==============================  ======  ==========================================
P(queues)                       SET     queue names
P(queue:<q>)                    LIST    job JSON; LPUSH to enqueue, pop from the right
P(queue:backup::<node>::<q>)    LIST    exact bytes of jobs fetched by <node>
P(schedule)                     ZSET    job JSON scored by run time (float seconds)
P(retry)                        ZSET    job JSON scored by next attempt time
P(dead)                         ZSET    job JSON scored by time of death
P(stat:processed|failed)        STRING  totals
P(stat:<kind>:YYYY-MM-DD)       STRING  per UTC day, no TTL
P(stat:<kind>_rt:<T>)           STRING  per second, ``T`` = ``YYYY-MM-DD HH:MM:SSZ``,
                                        EXPIRE 120
R(processes)                    SET     node ids (Exq) / identities (Sidekiq)
R(<node>)                       HASH    info, busy, beat, quiet; TTL 60
R(<node>)-signals               LIST    signals for <node>; TTL 60
P(<node>:workers)               HASH    pid string -> in-progress record (Exq)
R(heartbeats)                   ZSET    node id scored by last heartbeat
P(unique:<token>)               STRING  jid holding the unique lock; PX TTL
P(<node>:stats-batch)           STRING  id of the last stats batch applied (exq-fast)
P(recoveries)                   HASH    job sha1 -> times recovered from a backup (exq-fast)
P(suspects)                     ZSET    sha1 of recovered jobs, by time (exq-fast)
P(started)                      HASH    sha1 -> time a recovered job was seen starting
P(poison)                       LIST    jobs recovered too often, on their way to dead
P(nodes)                        HASH    node id -> process identity JSON (exq-fast)
P(processes), P(<id>),          Sidekiq's process registry; identical to the
P(<id>:work)                    R() forms unless the namespace is empty
==============================  ======  ==========================================
"""

from __future__ import annotations

import time
from typing import Literal

StatKind = Literal["processed", "failed"]

RT_STAT_TTL = 120
"""Seconds a per-second (``_rt``) stat key lives after its last increment."""


def day_suffix(at: float) -> str:
    """UTC date of the Unix time ``at`` as Exq writes it: ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def second_suffix(at: float) -> str:
    """UTC second of ``at`` as Exq writes it: ``YYYY-MM-DD HH:MM:SSZ`` (with a space)."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


class Keys:
    """Key builder for one namespace. Cheap to create; fixed keys are precomputed."""

    __slots__ = (
        "dead",
        "heartbeats",
        "namespace",
        "prefix",
        "processes",
        "queues",
        "raw_prefix",
        "retry",
        "schedule",
        "sidekiq_processes",
    )

    def __init__(self, namespace: str | None) -> None:
        ns = namespace or ""
        self.namespace = ns
        self.prefix = f"{ns}:" if ns else ""
        self.raw_prefix = f"{ns}:"
        self.queues = self.p("queues")
        self.schedule = self.p("schedule")
        self.retry = self.p("retry")
        self.dead = self.p("dead")
        self.processes = self.r("processes")
        self.heartbeats = self.r("heartbeats")
        self.sidekiq_processes = self.p("processes")

    def p(self, name: str) -> str:
        """The prefixed key ``P(name)``: no colon at all with an empty namespace."""
        return self.prefix + name

    def r(self, name: str) -> str:
        """The raw-prefixed key ``R(name)``: ``:name`` with an empty namespace."""
        return self.raw_prefix + name

    def queue(self, queue: str) -> str:
        """The list a queue's jobs wait in."""
        return self.prefix + "queue:" + queue

    def backup(self, node_id: str, queue: str) -> str:
        """The list holding the jobs ``node_id`` fetched from ``queue`` and has not acked."""
        return f"{self.prefix}queue:backup::{node_id}::{queue}"

    def backup_pattern(self, node_id: str) -> str:
        """A SCAN pattern matching every backup list of ``node_id``."""
        return f"{_glob_escape(self.prefix)}queue:backup::{_glob_escape(node_id)}::*"

    def backups_pattern(self) -> str:
        """A SCAN pattern matching every backup list of every node."""
        return f"{_glob_escape(self.prefix)}queue:backup::*"

    def split_backup(self, key: str) -> tuple[str, str] | None:
        """``(node id, queue)`` of a backup list's key, or None if it is not one (a node id
        never holds ``::``; a queue name may)."""
        head = f"{self.prefix}queue:backup::"
        node, sep, queue = key[len(head):].partition("::")
        return (node, queue) if key.startswith(head) and sep and node else None

    def stat(self, kind: StatKind) -> str:
        """The all-time counter ``stat:processed`` or ``stat:failed``."""
        return self.prefix + "stat:" + kind

    def stat_day(self, kind: StatKind, at: float) -> str:
        """The per-day counter for the UTC day of ``at``."""
        return f"{self.prefix}stat:{kind}:{day_suffix(at)}"

    def stat_rt(self, kind: StatKind, at: float) -> str:
        """The per-second realtime counter for the UTC second of ``at``."""
        return self.stat_rt_prefix(kind) + second_suffix(at)

    def stat_rt_prefix(self, kind: StatKind) -> str:
        """What every realtime counter of ``kind`` starts with (its time follows)."""
        return f"{self.prefix}stat:{kind}_rt:"

    def stat_rt_pattern(self, kind: StatKind) -> str:
        """A SCAN pattern matching every realtime counter of ``kind``."""
        return _glob_escape(self.stat_rt_prefix(kind)) + "*"

    def node(self, node_id: str) -> str:
        """Exq's node hash (info, busy, beat, quiet)."""
        return self.raw_prefix + node_id

    def signals(self, node_id: str) -> str:
        """The list other processes push signals for ``node_id`` into."""
        return self.raw_prefix + node_id + "-signals"

    def workers(self, node_id: str) -> str:
        """Exq's hash of the jobs ``node_id`` is running."""
        return self.prefix + node_id + ":workers"

    def sidekiq_process(self, identity: str) -> str:
        """Sidekiq's process hash, read by its Web UI."""
        return self.prefix + identity

    def sidekiq_signals(self, identity: str) -> str:
        """The list Sidekiq's Web UI pushes signals for ``identity`` into."""
        return self.prefix + identity + "-signals"

    def backup_queue(self, node_id: str, key: str) -> str | None:
        """The queue name of ``node_id``'s backup list ``key``, or None if it is not one."""
        head = f"{self.prefix}queue:backup::{node_id}::"
        return key[len(head):] if key.startswith(head) else None

    def sidekiq_work(self, identity: str) -> str:
        """Sidekiq >= 6.5's hash of the jobs a process is running."""
        return self.prefix + identity + ":work"

    @property
    def suspects(self) -> str:
        """Digests of jobs recovered from backups, scored by time (poison detection)."""
        return self.prefix + "suspects"

    @property
    def started(self) -> str:
        """Hash of the suspects seen starting: digest -> time (exq-fast's)."""
        return self.prefix + "started"

    @property
    def recoveries(self) -> str:
        """Hash of the recovery counts: digest -> times recovered (exq-fast's)."""
        return self.prefix + "recoveries"

    @property
    def poison(self) -> str:
        """Jobs recovered ``max_recoveries`` times, on their way to the dead set."""
        return self.prefix + "poison"

    @property
    def nodes(self) -> str:
        """exq-fast's registry of nodes that may own backup lists (see ``nodes``)."""
        return self.prefix + "nodes"

    def batch_marker(self, node_id: str) -> str:
        """exq-fast's record of the last stats batch ``node_id`` applied (1 h TTL)."""
        return self.prefix + node_id + ":stats-batch"

    def unique(self, token: str) -> str:
        """The unique-job lock for ``token``."""
        return self.prefix + "unique:" + token

    def all_keys_pattern(self) -> str:
        """A SCAN pattern matching every key of a non-empty namespace."""
        if not self.namespace:
            raise ValueError("the empty namespace has no key pattern of its own")
        return _glob_escape(self.raw_prefix) + "*"


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters so ``text`` matches only itself in SCAN MATCH."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)
