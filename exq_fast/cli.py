"""The ``exq-fast`` command: a thin layer over ``Config`` and the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import redis

from . import __version__
from .config import Config, ConfigError
from .demo import run_demo
from .enqueuer import Enqueuer, to_timestamp
from .queue import Conflict
from .runner import run

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A problem with what the user typed; printed as one line."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL or 127.0.0.1:6379)")
    parser.add_argument("--namespace", help="key namespace (default: $EXQ_NAMESPACE or 'exq')")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def config_from(args: argparse.Namespace, **extra: Any) -> Config:
    """The Config of a command: env, then the flags given."""
    overrides = {"redis_url": args.redis_url, "namespace": args.namespace, **extra}
    return Config.from_env(**{k: v for k, v in overrides.items() if v is not None})


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
    if args.in_seconds is not None:
        options["in"] = args.in_seconds
    elif args.at is not None:
        options["at"] = parse_time(args.at)
    if args.count < 1:
        raise UsageError("--count must be at least 1")
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


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra: dict[str, Any] = {"node_id": args.node_id, "shutdown_timeout": args.shutdown_timeout,
                             "concurrency": args.concurrency, "metrics_port": args.metrics_port,
                             "metrics_addr": args.metrics_addr}
    if args.queue:
        extra["queues"] = args.queue
    return run(config_from(args, **extra), args.workers)


def _demo(args: argparse.Namespace) -> int:
    return run_demo(jobs=args.jobs, redis_url=args.redis_url, namespace=args.namespace)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="exq-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"exq-fast {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    enqueue = verbs.add_parser("enqueue", help="enqueue one job")
    _common(enqueue)
    enqueue.add_argument("queue")
    enqueue.add_argument("job_class", metavar="CLASS")
    enqueue.add_argument("args_json", metavar="ARGS_JSON", nargs="?", default="[]")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--in", dest="in_seconds", type=float, metavar="S", help="run in S seconds")
    when.add_argument("--at", metavar="TIME", help="run at TIME (Unix seconds or ISO 8601)")
    enqueue.add_argument("--retry", type=int, metavar="N", help="max retries of this job")
    enqueue.add_argument("--unique-for", type=float, metavar="S",
                         help="hold a unique lock for S seconds (Exq's token)")
    enqueue.add_argument("--count", type=int, default=1, metavar="N",
                         help="enqueue N copies in one round trip")
    enqueue.add_argument("--json", action="store_true", help="print the jids as JSON")
    enqueue.set_defaults(handler=_enqueue)

    run_verb = verbs.add_parser("run", help="run a worker node until SIGTERM / SIGINT")
    _common(run_verb)
    run_verb.add_argument("--queue", action="append", metavar="NAME[:CONCURRENCY]",
                          help="a queue to consume (repeatable; default: $EXQ_QUEUES or default)")
    run_verb.add_argument("--workers", action="append", default=[], metavar="MODULE",
                          help="a module to import for its @worker registrations (repeatable)")
    run_verb.add_argument("--node-id", help="this node's id (default: $EXQ_NODE_ID or hostname)")
    run_verb.add_argument("--concurrency", help="default per-queue concurrency (or infinity)")
    run_verb.add_argument("--shutdown-timeout", type=int, metavar="MS",
                          help="how long running jobs may finish at stop (default 5000)")
    run_verb.add_argument("--metrics-port", type=int, metavar="PORT",
                          help="serve Prometheus /metrics on this port (0 = any free port)")
    run_verb.add_argument("--metrics-addr", metavar="ADDR",
                          help="address for /metrics (default 127.0.0.1)")
    run_verb.set_defaults(handler=_run)

    demo = verbs.add_parser("demo", help="enqueue and process a batch of demo jobs")
    _common(demo)
    demo.add_argument("--jobs", type=int, default=10000, help="how many jobs (default 10000)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``exq-fast`` and ``python -m exq_fast``."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (UsageError, ConfigError, ValueError, TypeError) as exc:
        return _fail(args, exc, f"error: {exc}")
    except redis.exceptions.AuthenticationError as exc:
        return _fail(args, exc, f"error: Redis refused the credentials ({exc}); check the password")
    except redis.exceptions.ConnectionError as exc:
        return _fail(args, exc, f"error: cannot reach Redis ({exc}); check --redis-url / REDIS_URL")
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, exc: Exception, message: str) -> int:
    if getattr(args, "debug", False):
        raise exc
    print(message, file=sys.stderr)
    return 2
