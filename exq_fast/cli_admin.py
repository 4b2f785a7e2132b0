"""Handlers of the operator verbs of ``exq-fast`` (stats, queues, jobs, the retry /
schedule / dead sets, processes, requeue, remove, clear, signal, prune).

Each handler takes the parsed ``argparse.Namespace`` and returns the exit code;
what it reads comes from the views of ``exq_fast.admin.Api`` (a ``Queue`` or a
``JobSet`` is the target of ``remove`` / ``clear``) and is rendered by
``cli_output``. Errors the
user can act on are raised as ``CliError`` subclasses, one line each:
``UsageError`` (exit 2), ``NotFound`` (exit 1: unknown queue, jid or node) and
``Declined`` (exit 1: the operator answered no).

Destructive actions ask ``… [y/N]`` when stdin is a terminal, unless ``--yes``;
without a terminal they refuse (exit 2) rather than wait for an answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import cli_output as out
from .admin import Api, Entry, JobSet, NodeAlive, Queue
from .config import Config

PAGE = 1000
"""Members read per round trip when a whole queue or set is searched for jids."""


class CliError(Exception):
    """An error the user can act on: printed as one line, then exit ``exit_code``."""

    exit_code = 2
    prefix = "error: "


class UsageError(CliError):
    """A problem with what the user typed (exit 2)."""


class NotFound(CliError):
    """A queue, jid or node that does not exist (exit 1)."""

    exit_code = 1


class Declined(CliError):
    """The operator did not confirm a destructive action (exit 1)."""

    exit_code = 1
    prefix = ""


# -- config and connection -------------------------------------------------------------


def config_from(args: argparse.Namespace, **extra: Any) -> Config:
    """The Config of a command: env, then the flags given."""
    overrides = {"redis_url": args.redis_url, "namespace": args.namespace, **extra}
    return Config.from_env(**{k: v for k, v in overrides.items() if v is not None})


URL_OPTIONS = "--redis-url / REDIS_URL"
"""The options that name a command's Redis, unless the sentinels are named instead."""


def redis_location(args: argparse.Namespace) -> str:
    """The Redis a command talks to, as a URL with its password masked."""
    return redis_target(args)[0]


def redis_target(args: argparse.Namespace) -> tuple[str, str]:
    """The Redis a command talks to (as ``redis_location``), and the options that
    name it, for an error's hint."""
    try:
        config = config_from(args)
    except ValueError:
        return (out.mask_url(getattr(args, "redis_url", None)
                             or os.environ.get("REDIS_URL", "?")), URL_OPTIONS)
    if config.redis_url is None and config.sentinel is not None:
        target = config.sentinel
        hosts = ",".join(f"{host}:{port}" for host, port in target.sentinels)
        return (f"the master of {target.service!r} (sentinels {hosts})",
                "EXQ_REDIS_SENTINELS / EXQ_REDIS_SENTINEL_SERVICE")
    url = config.redis_url or f"redis://{config.redis_host}:{config.redis_port}/{config.redis_db}"
    return out.mask_url(url), URL_OPTIONS


@contextmanager
def open_api(args: argparse.Namespace) -> Iterator[Api]:
    """An ``Api`` on the command's Redis and namespace, closed afterwards."""
    with Api(config_from(args)) as api:
        yield api


def confirm(args: argparse.Namespace, question: str) -> None:
    """Ask ``question? [y/N]`` on a terminal unless ``--yes``; raise unless answered yes."""
    if args.yes:
        return
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise UsageError(f"refusing to {question}: stdin is not a terminal, so confirm with --yes")
    sys.stderr.write(f"{question}? [y/N] ")
    sys.stderr.flush()
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise Declined("aborted: nothing was changed")


# -- targets: a queue, or the retry / schedule / dead set -----------------------------


Target = Queue | JobSet
"""What ``remove`` and ``clear`` act on: a queue or a sorted set."""

_SET_TITLES = {"retry": ("the retry set", "RETRY AT"),
               "schedule": ("the scheduled set", "RUN AT"),
               "dead": ("the dead set", "DIED AT")}
"""Each set's label in messages and the title of its time column."""


def job_set(api: Api, name: str) -> JobSet:
    """The sorted set a verb names: ``retry``, ``scheduled`` or ``dead``."""
    return {"retry": api.retries, "scheduled": api.scheduled, "dead": api.dead}[name]


def label(target: Target) -> str:
    """How messages name ``target``: ``queue 'q'``, ``the retry set``, ..."""
    if isinstance(target, Queue):
        return f"queue {target.name!r}"
    return _SET_TITLES[target.name][0]


def _check_target(args: argparse.Namespace) -> None:
    if args.target == "queue":
        if not args.queue:
            raise UsageError(f"'{args.verb} queue' needs the queue's name, "
                             f"e.g. '{args.verb} queue default'")
    elif args.queue is not None:
        raise UsageError(f"unexpected argument {args.queue!r}: only '{args.verb} queue' "
                         "takes a queue name")


@contextmanager
def open_target(args: argparse.Namespace) -> Iterator[Target]:
    """The queue or set a ``remove`` / ``clear`` names, on an open ``Api``; a queue
    must exist (``NotFound``)."""
    _check_target(args)
    with open_api(args) as api:
        if args.target != "queue":
            yield job_set(api, args.target)
            return
        check_queue(api, args.queue)
        yield api.queues.queue(args.queue)


def check_queue(api: Api, name: str) -> None:
    """Raise ``NotFound`` for a queue that is neither known nor holds jobs."""
    known = api.queues.names()
    if name not in known and api.queues.queue(name).size() == 0:
        raise NotFound(f"no queue named {name!r} (known: {', '.join(known) or 'none'})")


def _scan(target: Target) -> Iterator[Entry]:
    offset = 0
    while entries := target.page(offset=offset, size=PAGE):
        yield from entries
        offset += len(entries)


def find_jids(target: Target, jids: Sequence[str]) -> list[Entry]:
    """Every member of ``target`` whose jid is one of ``jids`` (the exact bytes stored);
    ``NotFound`` naming the first jid that has none."""
    wanted = set(jids)
    found = [entry for entry in _scan(target) if entry.jid in wanted]
    seen = {entry.jid for entry in found}
    missing = [jid for jid in dict.fromkeys(jids) if jid not in seen]
    if missing:
        others = f" (nor {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise NotFound(f"no job with jid {missing[0]} in {label(target)}{others}")
    return found


def confirm_all(args: argparse.Namespace, target: Target, verb: str) -> bool:
    """Confirm ``verb`` on every job of ``target``; False (said on stdout) when it is
    empty, so there is nothing to do."""
    total = target.size()
    if total == 0:
        print(f"nothing to {verb}: {label(target)} is empty")
        return False
    confirm(args, f"{verb} {_all_jobs(total)} of {label(target)}")
    return True


def _jobs(count: int) -> str:
    return f"{count} job" + ("" if count == 1 else "s")


def _all_jobs(count: int) -> str:
    return "the 1 job" if count == 1 else f"all {count} jobs"


def _check_page(args: argparse.Namespace) -> None:
    if args.offset < 0 or args.size < 0:
        raise UsageError("--offset and --size must not be negative")


def _page_note(offset: int, shown: int, total: int) -> str | None:
    if offset == 0 and shown >= total:
        return None
    if shown == 0:
        return f"nothing at offset {offset} (there are {total})"
    more = f"; next page: --offset {offset + shown}" if offset + shown < total else ""
    return f"showing {offset + 1}-{offset + shown} of {total}{more}"


def _emit(args: argparse.Namespace, record: Callable[[], object], table: Callable[[], str],
          note: str | None = None) -> int:
    if args.json:
        print(out.to_json(record()))
    else:
        print(table())
        if note:
            print(note)
    return 0


# -- read verbs ------------------------------------------------------------------------


def stats(args: argparse.Namespace) -> int:
    """``stats``: the dashboard numbers and the last ``--days`` days."""
    if args.days < 0:
        raise UsageError("--days must not be negative")
    with open_api(args) as api:
        numbers = api.stats.summary()
        processed = api.stats.daily("processed", args.days) if args.days else {}
        failed = api.stats.daily("failed", args.days) if args.days else {}
    return _emit(args, lambda: out.stats_record(numbers, processed, failed),
                 lambda: out.stats_table(numbers, processed, failed))


def queues(args: argparse.Namespace) -> int:
    """``queues``: each known queue's size and latency."""
    with open_api(args) as api:
        flight: dict[str, int] = {}
        for backup in api.processes.backups():
            flight[backup.queue] = flight.get(backup.queue, 0) + backup.size
        rows = [(name, size, api.queues.queue(name).latency(), flight.get(name, 0))
                for name, size in api.queues.sizes().items()]
    return _emit(args, lambda: [{"name": n, "size": s, "latency": lat, "in_flight": f}
                                for n, s, lat, f in rows],
                 lambda: out.queues_table(rows))


def jobs(args: argparse.Namespace) -> int:
    """``jobs QUEUE``: a page of the queue, newest first."""
    _check_page(args)
    with open_api(args) as api:
        check_queue(api, args.queue)
        queue = api.queues.queue(args.queue)
        entries = queue.page(offset=args.offset, size=args.size)
        total = queue.size()
    return _emit(args, lambda: [out.entry_record(e) for e in entries],
                 lambda: out.jobs_table(entries), _page_note(args.offset, len(entries), total))


def set_listing(args: argparse.Namespace) -> int:
    """``retries`` / ``scheduled`` / ``dead``: a page of the set, with scores;
    ``--backtrace`` (retries, dead): each job's ``error_backtrace`` under its row."""
    _check_page(args)
    backtrace = bool(getattr(args, "backtrace", False))
    with open_api(args) as api:
        target = job_set(api, args.set_name)
        entries = target.page(offset=args.offset, size=args.size)
        total = target.size()
    time_title = _SET_TITLES[target.name][1]
    return _emit(args, lambda: [out.entry_record(e) for e in entries],
                 lambda: out.set_table(entries, time_title, backtrace),
                 _page_note(args.offset, len(entries), total))


def processes(args: argparse.Namespace) -> int:
    """``processes``: the live nodes and the jobs they are running."""
    with open_api(args) as api:
        nodes = api.processes.nodes()
        running = api.processes.running()
        backups = api.processes.backups()
    return _emit(args, lambda: {"nodes": [out.node_record(n) for n in nodes],
                                "running": [out.process_record(p) for p in running],
                                "in_flight": [out.backup_record(b) for b in backups]},
                 lambda: f"nodes:\n{out.nodes_table(nodes)}\n\n"
                         f"running jobs:\n{out.running_table(running)}\n\n"
                         f"jobs in flight (backup lists, gone nodes included):\n"
                         f"{out.backups_table(backups)}")


def backups(args: argparse.Namespace) -> int:
    """``backups [--requeue NODE]``: every node's jobs in flight; put a dead node's back."""
    with open_api(args) as api:
        if args.requeue is None:
            lists = api.processes.backups()
            return _emit(args, lambda: [out.backup_record(b) for b in lists],
                         lambda: out.backups_table(lists))
        held = sum(b.size for b in api.processes.backups() if b.node_id == args.requeue)
        if not held:
            raise NotFound(f"node {args.requeue!r} has no jobs in flight (see 'backups')")
        confirm(args, f"put {_jobs(held)} of node {args.requeue!r} back in their queues")
        try:
            moved = api.processes.requeue_backups(args.requeue)
        except NodeAlive as exc:
            raise UsageError(str(exc)) from None
    print(f"put {_jobs(moved)} of node {args.requeue!r} back at the front of their queues")
    return 0


# -- write verbs -----------------------------------------------------------------------


def requeue(args: argparse.Namespace) -> int:
    """``requeue SET (--jid J... | --all)``: move members, byte for byte, to their queues."""
    with open_api(args) as api:
        target = job_set(api, args.target)
        if args.all:
            if not confirm_all(args, target, "requeue"):
                return 0
            moved = target.requeue_all()
        else:
            moved = target.requeue([entry.raw for entry in find_jids(target, args.jid)])
    print(f"requeued {_jobs(moved)} from {label(target)}")
    return 0


def remove(args: argparse.Namespace) -> int:
    """``remove TARGET --jid J...``: delete the members with those jids."""
    with open_target(args) as target:
        found = find_jids(target, args.jid)
        confirm(args, f"remove {_jobs(len(found))} from {label(target)}")
        removed = target.remove([entry.raw for entry in found],
                                clear_unique_tokens=args.clear_unique)
    unlocked = " (unique locks released)" if args.clear_unique else ""
    print(f"removed {_jobs(removed)} from {label(target)}{unlocked}")
    return 0


def clear(args: argparse.Namespace) -> int:
    """``clear TARGET``: delete every job of a queue (its name kept) or of a set."""
    with open_target(args) as target:
        if not confirm_all(args, target, "delete"):
            return 0
        deleted = target.clear()
    print(f"deleted {_jobs(deleted)} from {label(target)}")
    return 0


_SIGNALS = {"quiet": "TSTP (quiet: stop fetching jobs)", "stop": "TERM (stop)",
            "cancel": "CANCEL"}


def signal(args: argparse.Namespace) -> int:
    """``signal NODE {quiet|stop|cancel JID}``: push a signal to a live node."""
    if args.action == "cancel" and args.jid is None:
        raise UsageError("'signal NODE cancel' needs the JID of the running job")
    if args.action != "cancel" and args.jid is not None:
        raise UsageError(f"unexpected argument {args.jid!r}: only 'cancel' takes a JID")
    with open_api(args) as api:
        check_node(api, args.node)
        if args.action == "stop":
            confirm(args, f"stop node {args.node!r}")
        _send(api, args.node, args.action, args.jid)
    what = _SIGNALS[args.action] + (f" of job {args.jid}" if args.jid else "")
    print(f"sent {what} to node {args.node!r}; it acts on it at its next ping")
    return 0


def check_node(api: Api, node: str) -> None:
    """Raise ``NotFound`` for a node that is not registered and alive."""
    known = [info.identity for info in api.processes.nodes()]
    if node not in known:
        raise NotFound(f"no live node named {node!r} (known: {', '.join(known) or 'none'})")


def _send(api: Api, node: str, action: str, jid: str | None) -> None:
    if action == "quiet":
        api.processes.quiet(node)
    elif action == "stop":
        api.processes.stop(node)
    else:
        try:
            api.processes.cancel(node, jid or "")
        except LookupError as exc:
            raise NotFound(str(exc)) from None


def prune(args: argparse.Namespace) -> int:
    """``prune``: unregister the nodes that have stopped (their hash has expired)."""
    with open_api(args) as api:
        removed = api.processes.prune_dead_nodes()
    if not removed:
        print("no dead nodes to prune")
    else:
        names = ", ".join(out.truncate(name, 60) for name in removed)
        print(f"pruned {len(removed)} dead node{'' if len(removed) == 1 else 's'}: {names}")
    return 0
