"""The web UI's pages and actions: a Starlette app over one ``admin.Api``.

Every page reads through the Api (so it shows Exq, Sidekiq and exq-fast data
alike, in any namespace) and every action calls one Api method. GETs never
change Redis. Each action is a POST carrying the CSRF token (``security``);
a destructive one (clear a queue, stop a node, anything on a whole set) first
answers with a confirmation page that posts the same fields again with
``confirmed=1``. After an action the browser is sent back (303) to the page
it came from, with one line saying what changed (signed: a link made
elsewhere cannot show a notice of its own).

An action names jobs by reference, ``<digest>@<score>`` in a set or
``<digest>@<index>`` in a queue (``views.JobView.member``): the server reads
the exact bytes back from Redis and acts on those, so a form stays small
whatever the job's size, and a job that changed or left meanwhile is simply
not found (nothing else is touched).

Pages (paths under wherever the app is mounted; a queue is named in the query,
so any name, ``a/../b`` included, is one queue):

    /                          dashboard; /stats.json feeds its live chart
    /queues, /queue?name=<q>   queues; a queue's jobs, paged
    /busy                      nodes and the jobs they run
    /retries, /scheduled, /dead               a set, paged, ?q= filters
    /retries/<score>/<digest> (and the others)  one entry in full
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import jinja2
import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..admin import Api, Entry, JobSet, Queue
from ..admin._common import PAGE_SIZE as SCAN_PAGE
from ..admin._common import entry
from ..config import scrub
from .security import Guard, WebAuth, csrf_token, equal, route_path, same_origin, sign
from .views import (
    Paging,
    ago,
    digest_of,
    duration,
    filtered_page,
    history_bars,
    iso,
    job_view,
    parse_ref,
    realtime_points,
    running_view,
    score_text,
)

__all__ = ["WebUI"]

logger = logging.getLogger("exq_fast.web")
HERE = Path(__file__).resolve().parent
SETS: dict[str, tuple[str, str]] = {
    "retries": ("retry", "Retries"), "scheduled": ("schedule", "Scheduled"),
    "dead": ("dead", "Dead"),
}
"""URL name -> (Api set name, title)."""
HISTORY_DAYS = (7, 30, 90)
_INDEX = re.compile(r"[0-9]{1,12}")
MAX_FORM_BYTES = 1 << 20
"""A form larger than this is refused (forms name jobs, never carry them)."""
MAX_FIELDS = 2000
MAX_REFS = 1000
"""Jobs one action may name (a page shows 25)."""
FORM_TYPE = "application/x-www-form-urlencoded"


class BadRequest(Exception):
    """A request the UI did not make (a missing or broken field): 400."""


class Forbidden(Exception):
    """A POST without the UI's CSRF token, or from another site: 403."""


class NotFound(Exception):
    """An entry or page that is not there (any more): 404."""


class WebUI:
    """The app's state (Api, templates, CSRF secret) and its endpoints."""

    def __init__(self, api: Api, auth: WebAuth, secret: bytes,
                 allowed_hosts: frozenset[str] | None = None) -> None:
        self.api = api
        self.secret = secret
        self.origins = allowed_hosts or frozenset()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(iso=iso, ago=ago, duration=duration, quote=_q,
                                namespace_name=api.config.namespace or "(empty)")
        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(Guard, auth=auth, allowed_hosts=allowed_hosts)],
            exception_handlers={redis.exceptions.RedisError: self._redis_down,
                                BadRequest: self._bad_request, Forbidden: self._forbidden,
                                NotFound: self._not_found, 404: self._no_page})

    def _routes(self) -> list[Route | Mount]:
        routes: list[Route | Mount] = [
            Route("/", self.dashboard),
            Route("/stats.json", self.stats_json),
            Route("/queues", self.queues),
            Route("/queue", self.queue),
            Route("/queue", self.queue_action, methods=["POST"]),
            Route("/busy", self.busy),
            Route("/busy", self.busy_action, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static")),
        ]
        for path in SETS:
            routes += [Route(f"/{path}", self.job_set),
                       Route(f"/{path}", self.set_action, methods=["POST"]),
                       Route(f"/{path}/{{score}}/{{digest}}", self.entry)]
        return routes

    # -- rendering -----------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200,
               **context: Any) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        seed = _seed(request)
        notice = request.query_params.get("done", "")
        if notice and not equal(request.query_params.get("sig", ""),
                                sign(self.secret, seed, notice)):
            notice = ""  # not written by this app, for this browser
        page = self.env.get_template(template).render(
            root=root, csrf=csrf_token(self.secret, seed), path=request.url.path,
            message=notice, **context)
        # A lone surrogate (JSON "\ud800") cannot be UTF-8: shown as its escape.
        return HTMLResponse(page.encode("utf-8", "backslashreplace"), status_code=status)

    def _redis_down(self, request: Request, exc: Exception) -> Response:
        logger.warning("web UI: Redis error on %s: %s", request.url.path, exc)
        if isinstance(exc, redis.exceptions.ResponseError):
            return self.render(request, "error.html", 400, title="Redis refused the request",
                               detail=scrub(str(exc)))
        return self.render(request, "error.html", 503, title="Redis unavailable",
                           detail=scrub(f"Redis did not answer: {exc}"))

    def _bad_request(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", 400, title="Bad request", detail=str(exc))

    def _forbidden(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", 403, title="Refused", detail=(
            "This form did not come from this page (no valid CSRF token, or another site "
            "sent it). Reload the page and try again."))

    def _not_found(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", 404, title="Not found", detail=str(exc))

    def _no_page(self, request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no route, no static file): our page, not its bare text.
        return self.render(request, "error.html", 404, title="Not found",
                           detail=f"There is no page at {request.url.path}.")

    # -- dashboard -------------------------------------------------------------------

    def dashboard(self, request: Request) -> Response:
        days = _int_choice(request.query_params.get("days"), HISTORY_DAYS, 30)
        summary = self.api.stats.summary()
        processed = self.api.stats.daily("processed", days)
        failed = self.api.stats.daily("failed", days)
        return self.render(request, "dashboard.html", title="Dashboard", active="dashboard",
                           stats=summary, bars=history_bars(processed, failed), days=days,
                           day_choices=HISTORY_DAYS)

    def stats_json(self, request: Request) -> Response:
        summary = self.api.stats.summary()
        failures, successes = self.api.stats.realtime()
        return JSONResponse({
            "now": time.time(),
            "summary": {"processed": summary.processed, "failed": summary.failed,
                        "busy": summary.busy, "enqueued": summary.enqueued,
                        "retries": summary.retry_size, "scheduled": summary.scheduled_size,
                        "dead": summary.dead_size, "processes": summary.processes,
                        "in_flight": summary.in_flight},
            "realtime": {"processed": realtime_points(successes),
                         "failed": realtime_points(failures)}})

    # -- queues ----------------------------------------------------------------------

    def queues(self, request: Request) -> Response:
        sizes = self.api.queues.sizes()
        in_flight: dict[str, list[tuple[str, int, str]]] = {}
        for backup in self.api.processes.backups():
            in_flight.setdefault(backup.queue, []).append(
                (backup.node_id, backup.size, backup.state))
        rows = [{"name": name, "size": size,
                 "latency": self.api.queues.queue(name).latency(),
                 "in_flight": in_flight.get(name, [])}
                for name, size in sizes.items() if name]  # "" names no queue
        return self.render(request, "queues.html", title="Queues", active="queues", rows=rows,
                           orphans=sorted(set(in_flight) - set(sizes)), in_flight=in_flight)

    def _queue(self, request: Request) -> Queue:
        name = request.query_params.get("name", "")
        if not name:
            raise BadRequest("no queue named: /queue?name=<queue>")
        return self.api.queues.queue(name)

    def queue(self, request: Request) -> Response:
        queue = self._queue(request)
        paging = Paging.parse(request.query_params.get("page"), queue.size())
        jobs = [job_view(e, paging.offset + i)
                for i, e in enumerate(queue.page(offset=paging.offset, size=paging.size))]
        return self.render(request, "queue.html", title=f"Queue {queue.name}", active="queues",
                           name=queue.name, jobs=jobs, paging=paging, latency=queue.latency())

    async def queue_action(self, request: Request) -> Response:
        form = await self._form(request)
        queue = self._queue(request)
        action = form.get("action")
        back = f"/queue?name={_q(queue.name)}"
        if action == "delete":
            refs = _refs(form)
            members = await run_in_threadpool(_queue_members, queue, refs)
            removed = await run_in_threadpool(queue.remove, members) if members else 0
            gone = "" if removed == len(refs) else f" {len(refs) - removed} had already left."
            return self._back(request, _safe_back(form.get("back"), back),
                              f"Deleted {removed} job(s) from {queue.name}.{gone}")
        if action == "clear":
            if form.get("confirmed") != "1":
                size = await run_in_threadpool(queue.size)
                return self._confirm(request, form, f"Delete all {size} job(s) of queue "
                                     f"{queue.name}? The queue's name is kept.", back, back)
            cleared = await run_in_threadpool(queue.clear)
            return self._back(request, back, f"Cleared {queue.name}: {cleared} job(s) deleted.")
        raise BadRequest(f"unknown queue action {action!r}")

    # -- busy ------------------------------------------------------------------------

    def busy(self, request: Request) -> Response:
        nodes = self.api.processes.nodes()
        pending = self.api.processes.pending_signals(n.identity for n in nodes)
        running = [(p, running_view(p)) for p in self.api.processes.running()]
        return self.render(request, "busy.html", title="Busy", active="busy", nodes=nodes,
                           pending=pending, running=running, state_of=_node_state)

    async def busy_action(self, request: Request) -> Response:
        form = await self._form(request)
        action, node = form.get("action"), _field(form, "node")
        processes = self.api.processes
        if action == "quiet":
            await run_in_threadpool(processes.quiet, node)
            return self._back(request, "/busy", f"Asked {node} to go quiet.")
        if action == "stop":
            if form.get("confirmed") != "1":
                return self._confirm(request, form, f"Stop node {node}? Its running jobs get "
                                     "its shutdown timeout to finish.", "/busy", "/busy")
            await run_in_threadpool(processes.stop, node)
            return self._back(request, "/busy", f"Asked {node} to stop.")
        if action == "cancel":
            jid = _field(form, "jid")
            try:
                await run_in_threadpool(processes.cancel, node, jid)
            except LookupError:
                return self._back(request, "/busy", f"Job {jid} is no longer running on {node}.")
            return self._back(request, "/busy", f"Asked {node} to cancel job {jid}.")
        raise BadRequest(f"unknown node action {action!r}")

    # -- retry, scheduled, dead --------------------------------------------------------

    def _set(self, request: Request) -> tuple[str, JobSet, str]:
        name = route_path(request.scope).strip("/").split("/", 1)[0]
        set_name, title = SETS[name]
        jobset = {"retry": self.api.retries, "schedule": self.api.scheduled,
                  "dead": self.api.dead}[set_name]
        return name, jobset, title

    def job_set(self, request: Request) -> Response:
        name, jobset, title = self._set(request)
        needle = request.query_params.get("q", "").strip()
        capped = False
        if needle:
            entries, paging, capped = filtered_page(jobset, needle, request.query_params.get(
                "page"))
        else:
            paging = Paging.parse(request.query_params.get("page"), jobset.size())
            entries = jobset.page(offset=paging.offset, size=paging.size)
        return self.render(request, "set.html", title=title, active=name, set_path=name,
                           jobs=[job_view(e) for e in entries], paging=paging, q=needle,
                           capped=capped, can_kill=name != "dead")

    def entry(self, request: Request) -> Response:
        name, jobset, title = self._set(request)
        found = _set_members(jobset, [(request.path_params["digest"],
                                       request.path_params["score"])])
        if not found:
            raise NotFound(f"This entry is not in {title.lower()}: it was moved, retried "
                           "or deleted (or the address names no score).")
        return self.render(request, "job.html", title=f"{title}: job", active=name,
                           set_path=name, job=job_view(found[0]), can_kill=name != "dead")

    async def set_action(self, request: Request) -> Response:
        form = await self._form(request)
        name, jobset, title = self._set(request)
        action, scope = form.get("action"), form.get("scope", "selected")
        # Retry all leaves bytes that are not a job where they are, as a retry of a
        # selection does (below); the Api's plain requeue_all would send them to the
        # fallback queue, where a node only buries them again.
        verbs: dict[str, tuple[Callable[[list[bytes]], int], Callable[[], int], str]] = {
            "retry": (jobset.requeue, lambda: jobset.requeue_all(jobs_only=True),
                      "Moved {n} job(s) to their queues."),
            "delete": (jobset.remove, jobset.clear, "Deleted {n} job(s)."),
        }
        if name != "dead":
            verbs["kill"] = (jobset.kill, jobset.kill_all, "Moved {n} job(s) to the dead set.")
        if action not in verbs:
            raise BadRequest(f"unknown action {action!r} on {title.lower()}")
        some, every, done = verbs[str(action)]
        back = _safe_back(form.get("back"), f"/{name}")
        if scope == "all":
            if form.get("confirmed") != "1":
                size = await run_in_threadpool(jobset.size)
                return self._confirm(request, form, _all_question(
                    str(action), name, title, size), f"/{name}", back)
            count = await run_in_threadpool(every)
            return self._back(request, back, done.format(n=count))
        refs = _refs(form)
        if not refs:
            return self._back(request, back, "No job was selected.")
        found = await run_in_threadpool(_set_members, jobset, refs)
        # Bytes that are not a job are not sent to a queue one by one: a node would
        # only bury them again, under a reason that hides the first one.
        movable = [m for m in found if m.job is not None or action != "retry"]
        count = await run_in_threadpool(some, [m.raw for m in movable])
        note = done.format(n=count)
        if len(movable) < len(found):
            note += f" {len(found) - len(movable)} not a job: left where it was."
        if len(found) < len(refs):
            note += f" {len(refs) - len(found)} had already left {title.lower()}."
        return self._back(request, back, note)

    # -- forms -----------------------------------------------------------------------

    async def _form(self, request: Request) -> FormData:
        """The POSTed form, refused (403) unless it is the UI's own (see ``security``).
        The origin and size are checked before the body is read."""
        if not same_origin(request.headers, self.origins, request.url.scheme):
            raise Forbidden()
        if request.headers.get("content-type", "").split(";")[0].strip() != FORM_TYPE:
            raise BadRequest(f"a form is sent as {FORM_TYPE}")
        body = bytearray()
        async for chunk in request.stream():  # counted as it comes: chunked bodies too
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise BadRequest("the form is too large")
        try:
            pairs: list[tuple[str, str | UploadFile]] = list(
                parse_qsl(body.decode("ascii"), max_num_fields=MAX_FIELDS))
            form = FormData(pairs)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the form is not URL-encoded") from None
        seed = _seed(request)
        token = form.get("csrf")
        if not (isinstance(token, str) and equal(token, csrf_token(self.secret, seed))):
            raise Forbidden()
        return form

    def _back(self, request: Request, path: str, message: str) -> Response:
        path = _safe_back(path, "/")
        sep = "&" if "?" in path else "?"
        root = request.scope.get("root_path", "")
        seed = _seed(request)
        query = urlencode({"done": message, "sig": sign(self.secret, seed, message)})
        return RedirectResponse(f"{root}{path}{sep}{query}", 303)

    def _confirm(self, request: Request, form: FormData, question: str, action: str,
                 back: str) -> Response:
        """The confirmation page: the same fields posted again to ``action`` (a path of
        this app, as the page that asked used it) with ``confirmed=1``."""
        fields = [(k, v) for k, v in form.multi_items()
                  if k not in ("csrf", "confirmed") and isinstance(v, str)]
        return self.render(request, "confirm.html", title="Confirm", question=question,
                           fields=fields, action=action, back=_safe_back(back, "/"))


def _q(value: str) -> str:
    """``value`` quoted for a URL's path segment or query value (nothing left raw)."""
    return quote(value, safe="")


def _seed(request: Request) -> str:
    """This browser's CSRF cookie, as ``security.Guard`` checked or made it."""
    seed: str = request.scope.get("state", {}).get("csrf_seed", "")
    return seed


def _safe_back(value: object, default: str) -> str:
    """A path of this app to go back to: ``value`` when it is one (``/x?y``), else
    ``default`` (never another site, a scheme, or a fragment)."""
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//"):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.fragment or "\\" in value:
        return default
    return value


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"the form has no {name!r}")
    return value


def _refs(form: FormData) -> list[tuple[str, str]]:
    refs = [v for v in form.getlist("member") if isinstance(v, str)]
    if len(refs) > MAX_REFS:
        raise BadRequest(f"at most {MAX_REFS} jobs at once; use the whole-set action")
    try:
        return [parse_ref(ref) for ref in refs]
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _all_question(action: str, name: str, title: str, size: int) -> str:
    what = {"retry": "Move all {n} job(s) of {t} to their queues now?",
            "delete": "Delete all {n} job(s) of {t}?",
            "kill": "Move all {n} job(s) of {t} to the dead set?"}[action]
    if action == "retry" and name == "scheduled":
        what = "Add all {n} scheduled job(s) to their queues now?"
    question = what.format(n=size, t=f"the {title.lower()} set" if name != "dead"
                           else "the dead set")
    return question + " (Jobs added meanwhile are included.)"


def _set_members(jobset: JobSet, refs: list[tuple[str, str]]) -> list[Entry]:
    """The entries the references name, reading each score once (many jobs may share
    one, as jobs scheduled for the same second do) and decoding only the ones named."""
    wanted: dict[str, set[str]] = {}
    for digest, score in refs:
        try:
            wanted.setdefault(score_text(score), set()).add(digest)
        except ValueError:
            continue  # not a score: names nothing
    found: list[Entry] = []
    for score, digests in wanted.items():
        for raw in jobset.raw_at_score(score):
            if (digest := digest_of(raw)) in digests:
                digests.discard(digest)
                found.append(entry(raw, float(score)))
    return found


def _queue_members(queue: Queue, refs: list[tuple[str, str]]) -> list[bytes]:
    """The bytes of each referenced job, as many copies as were named (and are
    there): read at its index when it is still there, else found in one pass over
    the queue. A job gone is skipped. Copies of one job are the same bytes, so
    which copy ``LREM`` takes does not matter."""
    needed = Counter(digest for digest, _ in refs)
    raws: dict[str, bytes] = {}
    for digest, where in refs:
        if digest not in raws and _INDEX.fullmatch(where):
            page = queue.raw_page(offset=int(where), size=1)
            if page and digest_of(page[0]) == digest:
                raws[digest] = page[0]
    if len(raws) == len(needed) and max(needed.values()) == 1:
        return list(raws.values())
    copies: Counter[str] = Counter()
    offset = 0
    while chunk := queue.raw_page(offset=offset, size=SCAN_PAGE):
        for raw in chunk:
            digest = digest_of(raw)
            if digest in needed:
                raws[digest] = raw
                copies[digest] += 1
        offset += len(chunk)
    return [raws[d] for d, n in needed.items() for _ in range(min(n, copies[d]))]


def _int_choice(value: str | None, choices: tuple[int, ...], default: int) -> int:
    try:
        number = int(value or default)
    except ValueError:
        return default
    return number if number in choices else default


def _node_state(quiet: bool, pending: Mapping[str, list[str]], node: str) -> str:
    signals = pending.get(node, [])
    if "TERM" in signals:
        return "stopping"
    if quiet:
        return "quiet"
    return "quieting" if "TSTP" in signals else "running"
