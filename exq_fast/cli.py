"""The ``exq-fast`` command: a thin layer over ``Config`` and the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn

import redis

from . import __version__, cli_admin
from .cli_admin import CliError, UsageError, config_from, redis_location, redis_target
from .cli_output import one_line
from .config import ConfigError, scrub
from .demo import run_demo
from .enqueuer import Enqueuer, to_timestamp
from .logs import FORMATS, LEVELS, setup_logging
from .nodes import NodeIdInUse
from .registry import DEFAULT_REGISTRY
from .runner import import_worker_modules, run
from .store.enqueue import Conflict
from .supervisor import processes_value, supervise

Handler = Callable[[argparse.Namespace], int]
DESCRIPTION = ("Run Exq / Sidekiq compatible workers, enqueue jobs, and inspect and operate "
               "the queues, the retry, scheduled and dead sets, and the nodes in Redis.")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL: redis://, rediss://, unix://, "
                        "redis+sentinel://host:port[,...]/service[/db] or "
                        "redis+cluster://host:port[,...] (default: $REDIS_URL, else "
                        "EXQ_REDIS_SENTINELS, else 127.0.0.1:6379)")
    parser.add_argument("--namespace", help="key namespace (default: $EXQ_NAMESPACE or 'exq')")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks (and log at debug unless --log-level is given)")
    parser.add_argument("--log-level", choices=LEVELS, metavar="LEVEL",
                        help="exq-fast's log level: debug (a line per job), info, warning or "
                             "error (default info; other libraries log warnings only)")
    parser.add_argument("--log-format", choices=FORMATS,
                        help="log lines on stderr as text, or one JSON object per line "
                             "(default text)")


def log_level(args: argparse.Namespace) -> str:
    """``--log-level``, else debug with ``--debug``, else the verb's default (info;
    error for ``demo``, whose jobs fail on purpose)."""
    level: str | None = args.log_level
    default: str = getattr(args, "default_log_level", "info")
    return level or ("debug" if args.debug else default)


def parse_args_json(text: str) -> list[Any]:
    """ARGS_JSON of ``enqueue``: a JSON list, or a one-line error saying how to fix it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"ARGS_JSON is not valid JSON: {exc.msg} (e.g. '[1, \"two\"]')") from None
    if not isinstance(value, list):
        raise UsageError("ARGS_JSON must be a JSON list, e.g. '[1, \"two\"]'")
    return value


def parse_time(text: str) -> float:
    """``--at``: Unix seconds, or an ISO 8601 time (naive = UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r} is neither Unix seconds nor an ISO 8601 time "
                         "(e.g. 2030-01-02T03:04:05Z)") from None
    return to_timestamp(when)


def _enqueue(args: argparse.Namespace) -> int:
    job_args = parse_args_json(args.args_json)
    options: dict[str, Any] = {}
    if args.retry is not None:
        options["max_retries"] = args.retry
    if args.unique_for is not None:
        options["unique_for"] = args.unique_for
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.in_seconds is not None:
        if args.in_seconds < 0:
            raise UsageError(f"--in must be 0 or more seconds, got {args.in_seconds:g}")
        options["in"] = args.in_seconds
    elif args.at is not None:
        options["at"] = parse_time(args.at)
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.jid is not None:
        if args.count != 1:
            raise UsageError("--jid names one job: it cannot go with --count")
        options["jid"] = args.jid
    items = [(args.queue, args.job_class, job_args, options)] * args.count
    with Enqueuer(config_from(args)) as enqueuer:
        results = enqueuer.enqueue_all(items)
    conflicts = [r for r in results if isinstance(r, Conflict)]
    if args.json:
        print(json.dumps([r if isinstance(r, str) else {"conflict": r.existing_jid}
                          for r in results]))
    else:
        for result in results:
            print(result if isinstance(result, str) else
                  f"conflict: a unique lock is held by job {result.existing_jid}")
    return 1 if conflicts and len(conflicts) == len(results) else 0


class NoWorkerRegistered(CliError):
    """``exq-fast run`` found no ``@worker`` after importing the ``--workers`` modules."""


def require_workers() -> None:
    """Refuse to start a node that has nothing to run (exit 2, one line)."""
    if not DEFAULT_REGISTRY.names():
        raise NoWorkerRegistered(
            "no worker is registered: pass --workers MODULE (a module or .py file whose "
            "functions or classes are decorated with @worker)")


def _run(args: argparse.Namespace) -> int:
    config = config_from(args, **_run_options(args))
    count = processes_value(args.processes)
    # A bad module or none with a worker: one error here, before any node or child starts.
    import_worker_modules(args.workers)
    require_workers()
    if count > 1:
        return supervise(config, count, _child_args(args))
    return run(config, args.supervisor_pid)


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Config options the ``run`` flags give."""
    extra: dict[str, Any] = {"node_id": args.node_id, "shutdown_timeout": args.shutdown_timeout,
                             "concurrency": args.concurrency, "metrics_port": args.metrics_port,
                             "metrics_addr": args.metrics_addr,
                             "heartbeat_enable": args.heartbeat,
                             "heartbeat_interval": args.heartbeat_interval,
                             "missed_heartbeats_allowed": args.missed_heartbeats,
                             "job_timeout": args.job_timeout}
    if args.queue:
        # "--queue a,b:5" lists two queues, as EXQ_QUEUES="a,b:5" does
        extra["queues"] = [part for item in args.queue for part in item.split(",")]
    return extra


def _child_args(args: argparse.Namespace) -> list[str]:
    """The ``run`` flags a supervised child gets: the supervisor's own, less the ones
    the supervisor sets per child (node id, metrics port and address, process count)."""
    out: list[str] = []
    for flag, value in (("--redis-url", args.redis_url), ("--namespace", args.namespace),
                        ("--concurrency", args.concurrency),
                        ("--shutdown-timeout", args.shutdown_timeout),
                        ("--job-timeout", args.job_timeout),
                        ("--heartbeat-interval", args.heartbeat_interval),
                        ("--missed-heartbeats", args.missed_heartbeats),
                        ("--log-level", args.log_level), ("--log-format", args.log_format)):
        if value is not None:
            out += [flag, str(value)]
    for flag, values in (("--queue", args.queue or []), ("--workers", args.workers)):
        for value in values:
            out += [flag, value]
    if args.heartbeat is not None:
        out.append("--heartbeat" if args.heartbeat else "--no-heartbeat")
    if args.debug:
        out.append("--debug")
    return out


def _demo(args: argparse.Namespace) -> int:
    return run_demo(jobs=args.jobs, redis_url=args.redis_url, namespace=args.namespace)


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offset", type=int, default=0, metavar="N",
                        help="skip the first N entries (default 0)")
    parser.add_argument("--size", type=int, default=100, metavar="N",
                        help="show at most N entries (default 100)")


def _yes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-y", "--yes", action="store_true",
                        help="do not ask for confirmation (needed when stdin is not a terminal)")


def _verb(verbs: Any, name: str, handler: Handler, summary: str,
          description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = verbs.add_parser(
        name, help=summary, description=description or summary)
    _common(parser)
    parser.set_defaults(handler=handler)
    return parser


def _add_worker_verbs(verbs: Any) -> None:
    enqueue = _verb(verbs, "enqueue", _enqueue, "enqueue one job")
    enqueue.add_argument("queue")
    enqueue.add_argument("job_class", metavar="CLASS")
    enqueue.add_argument("args_json", metavar="ARGS_JSON", nargs="?", default="[]")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--in", dest="in_seconds", type=float, metavar="S", help="run in S seconds")
    when.add_argument("--at", metavar="TIME", help="run at TIME (Unix seconds or ISO 8601)")
    enqueue.add_argument("--retry", type=int, metavar="N", help="max retries of this job")
    enqueue.add_argument("--unique-for", type=float, metavar="S",
                         help="hold a unique lock for S seconds (Exq's token)")
    enqueue.add_argument("--jid", metavar="JID", help="the job's id (default: a new UUID)")
    enqueue.add_argument("--timeout", type=float, metavar="S",
                         help="seconds the job may run before it fails with JobTimeout")
    enqueue.add_argument("--count", type=int, default=1, metavar="N",
                         help="enqueue N copies in one round trip")
    enqueue.add_argument("--json", action="store_true", help="print the jids as JSON")

    run_verb = _verb(verbs, "run", _run, "run a worker node until SIGTERM / SIGINT")
    run_verb.add_argument("--queue", action="append", metavar="NAME[:CONCURRENCY]",
                          help="a queue to consume (repeatable, or comma-separated: a,b:5; "
                               "default: $EXQ_QUEUES or default)")
    run_verb.add_argument("--workers", action="append", default=[], metavar="MODULE",
                          help="a module to import for its @worker registrations (repeatable)")
    run_verb.add_argument("--node-id",
                          help="this node's id (default: $EXQ_NODE_ID, else <hostname>:<pid>:"
                               "<random>, unique per process); refused while a live process "
                               "holds it")
    run_verb.add_argument("--processes", default="1", metavar="N",
                          help="run N worker nodes under one supervisor ('auto': one per CPU; "
                               "default 1); their ids are <node id>.1 .. .N, and --queue "
                               "concurrency applies to each of them")
    run_verb.add_argument("--concurrency", help="default per-queue concurrency (or infinity)")
    run_verb.add_argument("--job-timeout", type=float, metavar="S",
                          help="seconds a job may run before it fails with JobTimeout, unless "
                               "its worker or the job sets its own (default: $EXQ_JOB_TIMEOUT "
                               "or no limit)")
    run_verb.add_argument("--shutdown-timeout", type=int, metavar="MS",
                          help="how long running jobs may finish at stop (default 5000)")
    run_verb.add_argument("--metrics-port", type=int, metavar="PORT",
                          help="serve Prometheus /metrics on this port (0 = any free port)")
    run_verb.add_argument("--metrics-addr", metavar="ADDR",
                          help="address for /metrics (default 127.0.0.1)")
    run_verb.add_argument("--heartbeat", action=argparse.BooleanOptionalAction, default=None,
                          help="beat, and re-run the jobs of nodes that died (default: on)")
    run_verb.add_argument("--heartbeat-interval", type=int, metavar="MS",
                          help="time between two beats and monitor passes (default 5000)")
    run_verb.add_argument("--missed-heartbeats", type=int, metavar="N",
                          help="beats a node elsewhere may miss before it is taken for dead "
                               "(default 5; never under 15 s in all)")
    run_verb.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)

    demo = _verb(verbs, "demo", _demo, "enqueue and process a batch of demo jobs",
                 "Enqueue a batch of demo jobs (most succeed, a few retry, die or are "
                 "scheduled), process them with an in-process node, print the figures, then "
                 "delete every key of the demo's namespace. The namespace is a new one, "
                 "exq-demo-<random>; a --namespace that already holds keys is refused, so the "
                 "demo never touches a key it did not create.")
    for action in demo._actions:
        if "--namespace" in action.option_strings:
            action.help = "an EMPTY namespace to use (default: a new exq-demo-<random>)"
        if "--log-level" in action.option_strings:
            action.help = ("exq-fast's log level: debug, info, warning or error (default error: "
                           "the demo's failing jobs are not logged)")
    demo.set_defaults(default_log_level="error")
    demo.add_argument("--jobs", type=int, default=10000, help="how many jobs (default 10000)")


def _add_read_verbs(verbs: Any) -> None:
    stats = _verb(verbs, "stats", cli_admin.stats, "processed/failed counts, set sizes, "
                  "enqueued, busy, processes, and per-day counts")
    stats.add_argument("--days", type=int, default=7, metavar="N",
                       help="per-day counts of the last N UTC days (default 7; 0: none)")
    _json(stats)
    _json(_verb(verbs, "queues", cli_admin.queues, "each queue's size and latency"))
    jobs = _verb(verbs, "jobs", cli_admin.jobs, "a page of a queue's jobs, newest first")
    jobs.add_argument("queue", metavar="QUEUE")
    _paging(jobs)
    _json(jobs)
    for name, what in (("retries", "the retry set, soonest first"),
                       ("scheduled", "the scheduled set, soonest first"),
                       ("dead", "the dead set, newest first")):
        listing = _verb(verbs, name, cli_admin.set_listing, f"a page of {what}")
        listing.set_defaults(set_name={"retries": "retry"}.get(name, name))
        _paging(listing)
        _json(listing)
        if name != "scheduled":
            listing.add_argument("--backtrace", action="store_true",
                                 help="print each job's error_backtrace lines under its row")
    _json(_verb(verbs, "processes", cli_admin.processes,
                "the live nodes, the jobs they are running, and every node's jobs in flight"))
    backups = _verb(verbs, "backups", cli_admin.backups,
                    "every node's jobs in flight (its backup lists), gone nodes included",
                    "List the backup lists: the jobs each node fetched and has not acked, "
                    "with the node's state (alive; dead: a live node's monitor re-runs them, "
                    "at once on the same host, within about 30 s elsewhere; unknown: not an "
                    "exq-fast node and no heartbeat, e.g. Exq 0.13: nothing re-runs them by "
                    "itself). --requeue NODE puts a node's jobs back at the front of their "
                    "queues; a live node is refused.")
    backups.add_argument("--requeue", metavar="NODE",
                         help="put this node's jobs back in their queues (not a live node)")
    _json(backups)
    _yes(backups)


_TARGETS = ("queue", "retry", "scheduled", "dead")
_SETS = ("retry", "scheduled", "dead")


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=_TARGETS, metavar="{queue QUEUE,retry,scheduled,dead}",
                        help="a queue (with its name) or one of the sets")
    parser.add_argument("queue", nargs="?", metavar="QUEUE", help=argparse.SUPPRESS)


def _add_write_verbs(verbs: Any) -> None:
    requeue = _verb(verbs, "requeue", cli_admin.requeue,
                    "move jobs of the retry, scheduled or dead set to their queues now")
    requeue.add_argument("target", choices=_SETS)
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--jid", action="append", metavar="JID",
                       help="the job to move (repeatable)")
    which.add_argument("--all", action="store_true", help="move every job of the set")
    _yes(requeue)
    remove = _verb(verbs, "remove", cli_admin.remove, "delete jobs by jid from a queue or set")
    _add_target(remove)
    remove.add_argument("--jid", action="append", required=True, metavar="JID",
                        help="the job to delete (repeatable)")
    remove.add_argument("--clear-unique", action="store_true",
                        help="release the unique locks the deleted jobs hold")
    _yes(remove)
    clear = _verb(verbs, "clear", cli_admin.clear,
                  "delete every job of a queue (its name is kept) or of a set")
    _add_target(clear)
    _yes(clear)
    signal = _verb(verbs, "signal", cli_admin.signal, "send quiet, stop or cancel to a node",
                   "Ask a live node to go quiet (stop fetching), to stop, or to cancel a "
                   "running job. The node acts on it at its next ping (every 5 s).")
    signal.add_argument("node", metavar="NODE", help="the node's identity (see 'processes')")
    signal.add_argument("action", choices=("quiet", "stop", "cancel"),
                        help="quiet: stop fetching jobs; stop: shut down (asks first); "
                             "cancel JID: cancel that running job")
    signal.add_argument("jid", nargs="?", metavar="JID", help="the running job to cancel")
    _yes(signal)
    _verb(verbs, "prune", cli_admin.prune, "unregister the nodes that have stopped")


def _web(args: argparse.Namespace) -> int:
    try:
        from .web.serve import auth_from, serve  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        missing = f" (no module {exc.name!r})" if exc.name else ""
        raise UsageError(f"the web UI needs its extra: pip install 'exq-fast[web]'{missing}"
                         ) from None
    auth = auth_from(args.basic_auth, args.token)
    return serve(config_from(args), bind=args.bind, port=args.port, auth=auth,
                 allowed_hosts=[h for item in args.allowed_host for h in item.split(",") if h])


def _add_web_verb(verbs: Any) -> None:
    web = _verb(verbs, "web", _web, "serve the web UI (dashboard, queues, busy, retries, "
                "scheduled, dead) until Ctrl-C",
                "Serve the web UI: the dashboard, the queues, the busy nodes and the retry, "
                "scheduled and dead sets, with their actions. Needs "
                "pip install 'exq-fast[web]'. It binds to 127.0.0.1; any other address needs "
                "--basic-auth or --token.")
    web.add_argument("--port", type=int, default=7433, help="TCP port (default 7433)")
    web.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                     help="address to listen on (default 127.0.0.1; another needs auth)")
    web.add_argument("--basic-auth", metavar="USER:PASSWORD",
                     help="require HTTP basic auth (default: $EXQ_WEB_BASIC_AUTH; prefer the "
                          "variable: a flag shows in ps)")
    web.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a host name browsers may use to reach the UI, beside loopback "
                          "names and the --bind address (repeatable; e.g. the name of a "
                          "proxy in front; also accepted as a form's Origin)")
    web.add_argument("--token", metavar="TOKEN",
                     help="require this token (16+ characters): 'Authorization: Bearer', or "
                          "open /?token=TOKEN once (default: $EXQ_WEB_TOKEN)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = _Parser(
        prog="exq-fast", description=DESCRIPTION,
        epilog="Every verb takes --redis-url (default $REDIS_URL), --namespace (default "
               "$EXQ_NAMESPACE), --log-level and --log-format; read verbs take --json. See "
               "'exq-fast VERB --help'.")
    parser.add_argument("--version", action="version", version=f"exq-fast {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_worker_verbs(verbs)
    _add_read_verbs(verbs)
    _add_write_verbs(verbs)
    _add_web_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``exq-fast`` and ``python -m exq_fast``."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    # Before any Config is built: its warnings (an unknown EXQ_* variable) reach stderr.
    setup_logging(log_level(args), args.log_format or "text")
    try:
        return handler(args)
    except CliError as exc:
        return _fail(args, exc, f"{exc.prefix}{exc}", exc.exit_code)
    except (ConfigError, ValueError, TypeError, NodeIdInUse) as exc:  # WorkerModuleError too
        return _fail(args, exc, f"error: {exc}")
    except redis.exceptions.AuthenticationError as exc:
        return _fail(args, exc, f"error: Redis refused the credentials at {redis_location(args)} "
                                f"({exc}) — check the password in --redis-url / REDIS_URL")
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.RedisClusterException) as exc:
        location, options = redis_target(args)
        return _fail(args, exc, f"error: cannot reach Redis at {location}: {_reason(exc)} "
                                f"— check {options}")
    except redis.exceptions.RedisError as exc:
        return _fail(args, exc, f"error: Redis at {redis_location(args)} answered: {exc}")
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:
        return 130


def _reason(exc: BaseException) -> str:
    """The error's text without the client object redis-py puts in some (Sentinel's
    ``No master found for 'x' : <redis.client.Redis(...)> - network:...``)."""
    text = str(exc)
    head, sep, tail = text.partition(" : <redis.")
    if not sep:
        return text
    cause = tail.rpartition(">")[2].strip(" -")
    return f"{head}: {cause}" if cause else head


def _fail(args: argparse.Namespace, exc: Exception, message: str, code: int = 2) -> int:
    """Re-raise with ``--debug``; else print ``message`` as one line, passwords masked."""
    if getattr(args, "debug", False):
        raise exc
    print(one_line(scrub(message)), file=sys.stderr)
    return code


def _quiet_stdout() -> None:
    """After a closed pipe (``exq-fast dead | head``): no second error at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
