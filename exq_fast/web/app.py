"""The web UI's pages and actions: a Starlette app over one ``admin.Api``.

Every page reads through the Api (so it shows Exq, Sidekiq and exq-fast data
alike, in any namespace) and every action calls one Api method. GETs never
change Redis. Each action is a POST carrying the CSRF token (``security``);
a destructive one (clear a queue, stop a node, anything on a whole set) first
answers with a confirmation page that posts the same fields again with
``confirmed=1``. After an action the browser is sent back (303) to the page
it came from, with one line saying what changed.

Pages (paths under wherever the app is mounted):

    /                        dashboard; /stats.json feeds its live chart
    /queues, /queues/<name>  queues; a queue's jobs, paged
    /busy                    nodes and the jobs they run
    /retries, /scheduled, /dead              a set, paged, ?q= filters
    /retries/<score>/<digest> (and the others)  one entry in full
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..admin import Api, Entry, JobSet
from ..config import scrub
from .security import Guard, WebAuth, csrf_token, same_origin
from .views import (
    Paging,
    ago,
    decode_member,
    digest_of,
    duration,
    filtered_page,
    history_bars,
    iso,
    job_view,
    realtime_points,
    running_view,
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


class BadRequest(Exception):
    """A request the UI did not make (a missing or broken field): 400."""


class Forbidden(Exception):
    """A POST without the UI's CSRF token, or from another site: 403."""


class WebUI:
    """The app's state (Api, templates, CSRF secret) and its endpoints."""

    def __init__(self, api: Api, auth: WebAuth, secret: bytes) -> None:
        self.api = api
        self.secret = secret
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(iso=iso, ago=ago, duration=duration, quote=quote,
                                namespace_name=api.config.namespace or "(empty)")
        self.app = Starlette(routes=self._routes(), middleware=[Middleware(Guard, auth=auth)],
                             exception_handlers={redis.exceptions.RedisError: self._redis_down,
                                                 BadRequest: self._bad_request,
                                                 Forbidden: self._forbidden})

    def _routes(self) -> list[Route | Mount]:
        routes: list[Route | Mount] = [
            Route("/", self.dashboard, name="dashboard"),
            Route("/stats.json", self.stats_json, name="stats_json"),
            Route("/queues", self.queues, name="queues"),
            Route("/queues/{name:path}", self.queue, name="queue"),
            Route("/queues/{name:path}", self.queue_action, methods=["POST"]),
            Route("/busy", self.busy, name="busy"),
            Route("/busy", self.busy_action, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        for path in SETS:
            routes += [Route(f"/{path}", self.job_set, name=path),
                       Route(f"/{path}", self.set_action, methods=["POST"]),
                       Route(f"/{path}/{{score}}/{{digest}}", self.entry)]
        return routes

    # -- rendering -----------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200,
               **context: Any) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        seed: str = request.scope.get("state", {}).get("csrf_seed", "")
        page = self.env.get_template(template).render(
            root=root, csrf=csrf_token(self.secret, seed), path=request.url.path,
            message=request.query_params.get("done", ""), **context)
        return HTMLResponse(page, status_code=status)

    def _redis_down(self, request: Request, exc: Exception) -> Response:
        logger.warning("web UI: Redis error on %s: %s", request.url.path, exc)
        return self.render(request, "error.html", 503, title="Redis unavailable",
                           detail=scrub(f"Redis did not answer: {exc}"))

    def _bad_request(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", 400, title="Bad request", detail=str(exc))

    def _forbidden(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", 403, title="Refused", detail=(
            "This form did not come from this page (no valid CSRF token, or another site "
            "sent it). Reload the page and try again."))

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
                for name, size in sizes.items()]
        return self.render(request, "queues.html", title="Queues", active="queues", rows=rows,
                           orphans=sorted(set(in_flight) - set(sizes)), in_flight=in_flight)

    def queue(self, request: Request) -> Response:
        name = request.path_params["name"]
        queue = self.api.queues.queue(name)
        paging = Paging.parse(request.query_params.get("page"), queue.size())
        jobs = [job_view(e) for e in queue.page(offset=paging.offset, size=paging.size)]
        return self.render(request, "queue.html", title=f"Queue {name}", active="queues",
                           name=name, jobs=jobs, paging=paging,
                           latency=queue.latency())

    async def queue_action(self, request: Request) -> Response:
        form = await self._form(request)
        name = request.path_params["name"]
        action = form.get("action")
        queue = self.api.queues.queue(name)
        back = f"/queues/{quote(name, safe='')}"
        if action == "delete":
            members = _members(form)
            removed = await run_in_threadpool(queue.remove, members)
            return self._back(request, back, f"Deleted {removed} job(s) from {name}.")
        if action == "clear":
            if form.get("confirmed") != "1":
                size = await run_in_threadpool(queue.size)
                return self._confirm(request, form, f"Delete all {size} job(s) of queue "
                                                    f"{name}? The queue's name is kept.", back)
            cleared = await run_in_threadpool(queue.clear)
            return self._back(request, back, f"Cleared {name}: {cleared} job(s) deleted.")
        raise BadRequest(f"unknown queue action {action!r}")

    # -- busy ------------------------------------------------------------------------

    def busy(self, request: Request) -> Response:
        nodes = self.api.processes.nodes()
        pending = self.api.processes.pending_signals(n.identity for n in nodes)
        running = [(p, running_view(p)) for p in self.api.processes.running()]
        return self.render(request, "busy.html", title="Busy", active="busy", nodes=nodes,
                           pending=pending, running=running,
                           state_of=_node_state)

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
                                                    "its shutdown timeout to finish.", "/busy")
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
        path = request.url.path[len(request.scope.get("root_path", "")):].strip("/")
        name = path.split("/", 1)[0]
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
        found = _find(jobset, request.path_params["score"], request.path_params["digest"])
        if found is None:
            return self.render(request, "error.html", 404, title="Not found", detail=(
                f"This entry is no longer in {title.lower()}: it was moved, retried or "
                "deleted."), back=f"/{name}")
        return self.render(request, "job.html", title=f"{title}: job", active=name,
                           set_path=name, job=job_view(found), can_kill=name != "dead")

    async def set_action(self, request: Request) -> Response:
        form = await self._form(request)
        name, jobset, title = self._set(request)
        action, scope = form.get("action"), form.get("scope", "selected")
        verbs: dict[str, tuple[Callable[[list[bytes]], int], Callable[[], int], str]] = {
            "retry": (jobset.requeue, jobset.requeue_all, "Moved {n} job(s) to their queues."),
            "delete": (jobset.remove, jobset.clear, "Deleted {n} job(s)."),
        }
        if name != "dead":
            verbs["kill"] = (jobset.kill, jobset.kill_all, "Moved {n} job(s) to the dead set.")
        if action not in verbs:
            raise BadRequest(f"unknown action {action!r} on {title.lower()}")
        some, every, done = verbs[str(action)]
        back = str(form.get("back") or f"/{name}")
        if scope == "all":
            if form.get("confirmed") != "1":
                size = await run_in_threadpool(jobset.size)
                return self._confirm(request, form, f"{str(action).capitalize()} all {size} "
                                                    f"job(s) of {title.lower()}?", back)
            count = await run_in_threadpool(every)
        else:
            count = await run_in_threadpool(some, _members(form))
        return self._back(request, back, done.format(n=count))

    # -- forms -----------------------------------------------------------------------

    async def _form(self, request: Request) -> FormData:
        """The POSTed form, refused (403) unless it is the UI's own (see ``security``)."""
        form = await request.form()
        seed: str = request.scope.get("state", {}).get("csrf_seed", "")
        token = form.get("csrf")
        expected = csrf_token(self.secret, seed)
        if not (isinstance(token, str) and _same(token, expected) and same_origin(
                request.headers)):
            raise Forbidden()
        return form

    def _back(self, request: Request, path: str, message: str) -> Response:
        if not path.startswith("/") or path.startswith("//"):
            path = "/"  # only a path of this app: never a redirect elsewhere
        sep = "&" if "?" in path else "?"
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}{path}{sep}{urlencode({'done': message})}", 303)

    def _confirm(self, request: Request, form: FormData, question: str,
                 back: str) -> Response:
        fields = [(k, v) for k, v in form.multi_items()
                  if k not in ("csrf", "confirmed") and isinstance(v, str)]
        return self.render(request, "confirm.html", title="Confirm", question=question,
                           fields=fields, action=request.url.path, back=back)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"the form has no {name!r}")
    return value


def _members(form: FormData) -> list[bytes]:
    tokens = [v for v in form.getlist("member") if isinstance(v, str)]
    if not tokens:
        raise BadRequest("no job was selected")
    try:
        return [decode_member(t) for t in tokens]
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _find(jobset: JobSet, score: str, digest: str) -> Entry | None:
    try:
        float(score)
    except ValueError:
        return None
    for entry in jobset.at_score(score):
        if digest_of(entry.raw) == digest:
            return entry
    return None


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
