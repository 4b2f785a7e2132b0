"""The web UI over HTTP: a real uvicorn serving ``create_app`` on a loopback port,
against the real Redis, with Exq, Sidekiq and exq-fast data. Each test checks
what a user would: the numbers on the page against the Api, the bytes in Redis
after an action, the status a refused request gets. The browser tests are in
test_web_browser.py."""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import markupsafe
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Mount

from exq_fast.admin import Api
from exq_fast.config import Config
from exq_fast.embedded import RedisServer, free_port
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from exq_fast.web import WebAuth, create_app
from exq_fast.web.views import digest_of
from tests.conftest import wait_for
from tests.test_api import (
    EXQ23,
    SIDEKIQ,
    SIDEKIQ_ID,
    VERSIONS,
    Node,
    load_inflight,
    load_payloads,
    load_stats,
)
from tests.web import Client, WebServer, serving

HOSTILE = "<script>document.title='pwned'</script>"
ESCAPED = str(markupsafe.escape(HOSTILE))
NOT_JSON = b"\xff\xfe not json {"


@pytest.fixture
def api(config: Config) -> Iterator[Api]:
    with Api(config) as view:
        yield view


@pytest.fixture
def web(api: Api) -> Iterator[WebServer]:
    with serving(create_app(api=api)) as server:
        yield server


@pytest.fixture
def client(web: WebServer) -> Client:
    return Client(web.port)


def ref(raw: bytes, where: float | str | int) -> str:
    """What the UI's forms post to name a job: its digest at its score (a set entry;
    ``where`` as stored) or at its index (a queue)."""
    at = repr(float(where)) if isinstance(where, float | str) else str(where)
    return f"{digest_of(raw)}@{at}"


def stat_values(page: str) -> dict[str, int]:
    """The dashboard's numbers, by their ``stat-<key>`` id."""
    return {k: int(v) for k, v in re.findall(r'id="stat-(\w+)">(\d+)<', page)}


def hostile_job(queue: str = "default", **extra: object) -> bytes:
    return json.dumps({"class": f"Evil{HOSTILE}", "args": [HOSTILE, {"k": HOSTILE}],
                       "jid": "evil-1", "queue": queue, "retry": True,
                       "enqueued_at": time.time(), **extra}).encode()


# -- reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_page_shows_what_the_api_reads_for_each_library(
        version: str, api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given a real library's queue, retry, schedule and dead sets and its counters
    loaded = load_payloads(redis_client, keys, version)
    load_stats(redis_client, keys, version)

    # Then the dashboard's numbers are the Api's (those of `exq-fast stats`)
    page = client.get("/")
    assert page.status == 200
    numbers = api.stats.summary()
    assert stat_values(page.body) == {
        "processed": numbers.processed, "failed": numbers.failed, "busy": numbers.busy,
        "enqueued": numbers.enqueued, "retries": numbers.retry_size,
        "scheduled": numbers.scheduled_size, "dead": numbers.dead_size,
        "processes": numbers.processes, "in_flight": numbers.in_flight}
    assert numbers.processed > 0 and numbers.dead_size == len(loaded.dead)
    live = json.loads(client.get("/stats.json").body)
    assert live["summary"]["dead"] == len(loaded.dead)

    # And the queue page lists the queue's size and every job's jid
    queues = client.get("/queues").body
    assert re.search(rf'data-queue="{loaded.queue}">.*?class="num size">{len(loaded.enqueued)}<',
                     queues, re.S)
    jobs = client.get(f"/queue?name={loaded.queue}").body
    for entry in api.queues.queue(loaded.queue).page(size=25):
        assert f'data-jid="{entry.jid}"' in jobs

    # And each set page shows its size and its entries, and each entry's detail
    for path, members, jobset in (("retries", loaded.retry, api.retries),
                                  ("scheduled", loaded.scheduled, api.scheduled),
                                  ("dead", loaded.dead, api.dead)):
        listing = client.get(f"/{path}").body
        assert f"{len(members)} job(s)" in listing
        for entry in jobset.page(size=25):
            assert f'data-jid="{entry.jid}"' in listing
            detail = client.get(f"/{path}/{entry.score!r}/{digest_of(entry.raw)}")
            assert detail.status == 200
            shown = html.unescape(detail.body)
            assert entry.job is not None and entry.job.job_class in shown
            payload = entry.to_dict() or {}
            if payload.get("error_message"):
                assert payload["error_message"] in shown


def test_pages_and_filters(api: Api, client: Client, redis_client: redis.Redis,
                           keys: Keys) -> None:
    # Given 60 dead jobs of two classes
    now = time.time()
    redis_client.zadd(keys.dead, {json.dumps({
        "class": "Billing.Charge" if i % 3 else "Mail.Send", "args": [i], "jid": f"jid-{i:03}",
        "queue": "q", "error_class": "E", "error_message": "m"}): now - i for i in range(60)})

    # Then the list is paged 25 at a time, newest death first
    first, third = client.get("/dead").body, client.get("/dead?page=3").body
    assert first.count('class="select"') == 25 and third.count('class="select"') == 10
    assert 'data-jid="jid-000"' in first and 'data-jid="jid-059"' in third

    # And a filter by class (any case) or by jid finds exactly the matches
    mail = client.get("/dead?q=mail.send").body
    assert "20 match(es)" in mail and "Billing.Charge" not in mail
    one = client.get("/dead?q=jid-042").body
    assert "1 match(es)" in one and 'data-jid="jid-042"' in one
    assert "No entry matches" in client.get("/dead?q=nothing-like-it").body


def test_a_hostile_payload_is_shown_as_text_on_every_page(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given a job whose class, args and error carry a script, in a queue and each set
    job = hostile_job(error_class=HOSTILE, error_message=HOSTILE,
                      error_backtrace=[HOSTILE])
    redis_client.sadd(keys.queues, "default")
    redis_client.lpush(keys.queue("default"), job)
    for key in (keys.retry, keys.schedule, keys.dead):
        redis_client.zadd(key, {job: time.time() + 60})
    score = repr(float(redis_client.zscore(keys.dead, job) or 0))

    # Then no page carries the script as markup, and each shows it escaped
    for path in ("/", "/queues", "/queue?name=default", "/retries", "/scheduled", "/dead",
                 f"/dead/{score}/{digest_of(job)}"):
        page = client.get(path)
        assert page.status == 200, path
        assert "<script>document" not in page.body, path
        if path not in ("/", "/queues"):
            assert ESCAPED in page.body, path
    detail = client.get(f"/dead/{score}/{digest_of(job)}").body
    assert detail.count(ESCAPED) >= 4  # class, args, error, backtrace


def test_a_member_that_is_not_a_job_shows_its_raw_bytes(
        client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given bytes that are not JSON (nor UTF-8) in a queue and in the dead set
    redis_client.sadd(keys.queues, "default")
    redis_client.lpush(keys.queue("default"), NOT_JSON)
    redis_client.zadd(keys.dead, {NOT_JSON: 1700000000.5, b'{"args": "not a list"}': 1.0})

    # Then each page lists it as "not a job" with its bytes, and its detail opens
    for path in ("/queue?name=default", "/dead"):
        page = client.get(path)
        assert page.status == 200
        assert "not a job" in page.body and r"\xff\xfe not json {" in page.body
    detail = client.get(f"/dead/1700000000.5/{digest_of(NOT_JSON)}")
    assert detail.status == 200 and r"\xff\xfe not json {" in detail.body
    assert client.get(f"/dead/1.5/{digest_of(NOT_JSON)}").status == 404


def test_busy_lists_a_live_node_and_its_running_job(
        config: Config, client: Client, enqueuer: Enqueuer) -> None:
    # Given a node running one job
    node = Node(config)
    node.exq.start()
    try:
        jid = enqueuer.enqueue("default", "Api.Blocker", [HOSTILE])
        assert node.started.wait(10)

        # Then the busy page shows the node (busy 1) and the job, escaped
        def shown() -> str | None:
            page = client.get("/busy").body
            return page if f'data-jid="{jid}"' in page else None
        page = wait_for(shown, 10, "the running job on the busy page")

        def busy() -> str:
            node.ping()  # the node writes its busy count when it beats
            row = re.search(rf'data-node="{config.node_id}">(.*?)</tr>',
                            client.get("/busy").body, re.S)
            assert row is not None
            return re.findall(r'<td class="num">(\d+)', row.group(1))[1]
        wait_for(lambda: busy() == "1", 10, "busy 1 on the node's row")
        assert "<script>document" not in page

        # When cancel is pressed, the node gets the signal and cancels the job
        reply = client.post("/busy", [("action", "cancel"), ("node", config.node_id),
                                      ("jid", jid)])
        assert reply.status == 303
        node.ping_until(lambda: node.jobs and node.jobs[0].cancelled, "the job to be cancelled")
    finally:
        node.close()


def test_a_running_record_whose_payload_text_holds_a_lone_surrogate_is_shown(
        client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given a node whose in-progress record holds its job as JSON text, and that
    # text a lone surrogate (a "\ud800" escape in the record: no UTF-8 form)
    redis_client.sadd(keys.processes, "odd-node")
    redis_client.hset(keys.node("odd-node"), mapping={
        "info": json.dumps({"hostname": "h", "pid": 1, "queues": ["q"]}), "busy": "1"})
    redis_client.hset(keys.workers("odd-node"), "w1", json.dumps({
        "queue": "q", "run_at": 1, "payload": '{"class":"Odd\ud800","args":[],"jid":"odd-1"}'}))
    # Then the busy page answers and lists the job, its character as an escape
    reply = client.get("/busy")
    assert reply.status == 200
    assert 'data-jid="odd-1"' in reply.body and "Odd\\ud800" in reply.body


def test_the_empty_namespace_with_sidekiq_processes_and_an_exq_node(
        private_redis: RedisServer) -> None:
    # Given Sidekiq 6.4's jobs, sets, stats and process, and Exq 0.23's node, with no
    # namespace (Sidekiq 7's layout), on a private Redis
    client, keys = redis.Redis.from_url(private_redis.url), Keys("")
    loaded = load_payloads(client, keys, SIDEKIQ)
    load_stats(client, keys, SIDEKIQ)
    load_inflight(client, keys, SIDEKIQ)
    load_inflight(client, keys, EXQ23)
    with Api(Config(redis_url=private_redis.url, namespace="")) as api, \
            serving(create_app(api=api)) as server:
        web = Client(server.port)
        # Then the dashboard has the Api's numbers and the busy page both nodes and
        # the jobs they run
        numbers = api.stats.summary()
        assert stat_values(web.get("/").body)["busy"] == numbers.busy == 4
        busy = web.get("/busy").body
        for node in api.processes.nodes():
            assert f'data-node="{html.escape(node.identity)}"' in busy
        assert busy.count("<tr data-jid=") == len(api.processes.running()) == 4
        assert "namespace: (empty)" in busy

        # And quiet sent from the page reaches Sidekiq's signal list too
        web.post("/busy", [("action", "quiet"), ("node", SIDEKIQ_ID)])
        assert client.lrange(f"{SIDEKIQ_ID}-signals", 0, -1) == [b"TSTP"]

        # And a dead job retried from the page is at the head of Sidekiq's queue
        web.get("/dead")
        member, score = loaded.dead[0]
        web.post("/dead", [("action", "retry"), ("member", ref(member, score))])
        assert client.lindex("queue:default", 0) == member
    client.close()


# -- actions ---------------------------------------------------------------------------


def test_retry_delete_and_kill_move_exactly_the_selected_members(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given Exq's retry set
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    client.get("/retries")
    (first, s1), (second, s2), (third, s3) = loaded.retry[:3]

    # When one is retried now, one deleted and one killed
    for action, member, score in (("retry", first, s1), ("delete", second, s2),
                                  ("kill", third, s3)):
        reply = client.post("/retries", [("action", action), ("member", ref(member, score))])
        assert reply.status == 303 and "done=" in reply.headers["location"]

    # Then the first is at the head of its queue byte for byte, the second gone,
    # the third in the dead set as it was
    assert redis_client.lindex(keys.queue(loaded.queue), 0) == first
    assert redis_client.zscore(keys.retry, second) is None
    assert redis_client.zscore(keys.dead, third) is not None
    assert api.retries.size() == len(loaded.retry) - 3
    assert "Moved 1 job(s) to the dead set." in client.get(
        reply.headers["location"].split(":" + str(client.port))[-1]).body


def test_whole_set_actions_and_clearing_a_queue_ask_first(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    client.get("/dead")

    # When "retry all" is pressed, a confirmation comes back and nothing moved
    ask = client.post("/dead", [("action", "retry"), ("scope", "all")])
    assert ask.status == 200 and f"Move all {len(loaded.dead)} job(s) of the dead set" in ask.body
    assert api.dead.size() == len(loaded.dead)

    # And once confirmed every dead job is back in its queue
    done = client.post("/dead", [("action", "retry"), ("scope", "all"), ("confirmed", "1")])
    assert done.status == 303 and api.dead.size() == 0
    queued = len(loaded.enqueued) + len(loaded.dead)
    assert api.queues.queue(loaded.queue).size() == queued

    # When the queue is cleared: first a question, then the queue is empty, its name kept
    ask = client.post(f"/queue?name={loaded.queue}", [("action", "clear")])
    assert ask.status == 200 and f"Delete all {queued} job(s)" in ask.body
    assert api.queues.queue(loaded.queue).size() == queued
    done = client.post(f"/queue?name={loaded.queue}", [("action", "clear"), ("confirmed", "1")])
    assert done.status == 303 and api.queues.queue(loaded.queue).size() == 0
    assert loaded.queue in api.queues.names()

    # And kill all on the schedule set moves it whole to the dead set
    client.post("/scheduled", [("action", "kill"), ("scope", "all"), ("confirmed", "1")])
    assert api.scheduled.size() == 0 and api.dead.size() == len(loaded.scheduled)


def test_deleting_one_queued_job_removes_that_one_only(
        client: Client, enqueuer: Enqueuer, redis_client: redis.Redis, keys: Keys) -> None:
    jids = [enqueuer.enqueue("default", "W", [i]) for i in range(3)]
    client.get("/queue?name=default")
    listed = redis_client.lrange(keys.queue("default"), 0, -1)
    index, target = next((i, m) for i, m in enumerate(listed) if jids[1].encode() in m)
    # (the index a page saw: the job is found even after the queue shifted)
    redis_client.lpush(keys.queue("default"), b'{"class":"W","args":["newer"],"jid":"n"}')
    reply = client.post("/queue?name=default", [("action", "delete"),
                                                 ("member", ref(target, index))])
    assert reply.status == 303
    left = redis_client.lrange(keys.queue("default"), 0, -1)
    assert len(left) == 3 and target not in left


def test_quiet_and_stop_signal_the_node(config: Config, client: Client,
                                        redis_client: redis.Redis, keys: Keys) -> None:
    # Given a live node
    node = Node(config)
    node.exq.start()
    try:
        wait_for(lambda: f'data-node="{config.node_id}"' in client.get("/busy").body, 10,
                 "the node on the busy page")
        # When quiet is pressed, the node stops fetching
        assert client.post("/busy", [("action", "quiet"), ("node", config.node_id)]).status == 303
        assert redis_client.lrange(keys.signals(config.node_id), 0, -1) == [b"TSTP"]
        assert "quieting" in client.get("/busy").body
        node.ping_until(lambda: node.exq.subscriptions() == [], "TSTP handled")
        # (no second ping: the node writes its quiet state when it takes the signal)
        assert re.search(rf'data-node="{config.node_id}">.*?class="tag quiet">quiet<',
                         client.get("/busy").body, re.S)
        # When stop is pressed: a question first, then TERM
        ask = client.post("/busy", [("action", "stop"), ("node", config.node_id)])
        assert ask.status == 200 and "Stop node" in ask.body
        assert b"TERM" not in redis_client.lrange(keys.signals(config.node_id), 0, -1)
        client.post("/busy", [("action", "stop"), ("node", config.node_id), ("confirmed", "1")])
        assert b"TERM" in redis_client.lrange(keys.signals(config.node_id), 0, -1)
        assert "stopping" in client.get("/busy").body
    finally:
        node.close()


# -- safety ----------------------------------------------------------------------------


def test_a_post_without_the_csrf_token_or_from_another_site_changes_nothing(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    client.get("/dead")
    clear = [("action", "delete"), ("scope", "all"), ("confirmed", "1")]

    assert client.post("/dead", clear, csrf=False).status == 403
    assert client.post("/dead", [*clear, ("csrf", "0" * 64)], csrf=False).status == 403
    assert client.post("/dead", clear, headers={"Origin": "http://evil.example"}).status == 403
    assert client.post("/dead", clear, headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    stranger = Client(client.port)  # another browser: its own cookie, so not this token
    stranger.get("/dead")
    stranger.csrf = client.csrf
    assert stranger.post("/dead", clear).status == 403
    assert api.dead.size() == len(loaded.dead)

    # And a GET never changes anything, whatever it carries
    assert client.get("/dead?action=delete&scope=all&confirmed=1").status == 200
    assert api.dead.size() == len(loaded.dead)
    # While the page's own form works
    assert client.post("/dead", clear).status == 303 and api.dead.size() == 0


def test_every_response_carries_the_security_headers(client: Client) -> None:
    for path in ("/", "/dead", "/static/style.css", "/nope"):
        reply = client.get(path)
        csp = reply.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert reply.headers["x-content-type-options"] == "nosniff"
    cookie = client.get("/").set_cookies or Client(client.port).get("/").set_cookies
    assert "HttpOnly" in cookie[0] and "SameSite=Lax" in cookie[0]


def test_basic_auth_and_token(api: Api) -> None:
    auth = WebAuth("ops", "correct horse", token="t" * 20 + "-secret")
    with serving(create_app(api=api, auth=auth)) as server:
        # Without credentials: 401 and nothing from Redis, static files included
        for path in ("/", "/dead", "/static/style.css", "/stats.json"):
            reply = Client(server.port).get(path)
            assert reply.status == 401, path
            assert "Basic" in reply.headers["www-authenticate"]
        assert Client(server.port, basic=("ops", "wrong")).get("/").status == 401
        assert Client(server.port, bearer="x" * 20).get("/").status == 401

        # With basic auth or the bearer token: the pages
        assert Client(server.port, basic=("ops", "correct horse")).get("/").status == 200
        assert Client(server.port, bearer=auth.token).get("/dead").status == 200

        # A browser opening ?token= once gets a cookie (not the token) and the page
        browser = Client(server.port)
        reply = browser.get(f"/dead?page=2&token={auth.token}")
        assert reply.status == 303 and reply.headers["location"] == "/dead?page=2"
        assert auth.token not in " ".join(reply.set_cookies)
        assert browser.get("/dead").status == 200


def test_mounted_in_another_app_under_a_prefix(
        api: Api, redis_client: redis.Redis, keys: Keys) -> None:
    # Given the UI mounted at /ops/exq in a service's own Starlette app
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    service = Starlette(routes=[Mount("/ops/exq", app=create_app(api=api))])
    with serving(service) as server:
        client = Client(server.port)
        page = client.get("/ops/exq/dead").body
        # Then its links and forms stay under the prefix, and an action works there
        assert 'href="/ops/exq/static/style.css"' in page
        assert 'action="/ops/exq/dead"' in page
        assert client.get("/ops/exq/static/style.css").status == 200
        member = ref(*loaded.dead[0])
        reply = client.post("/ops/exq/dead", [("action", "delete"), ("member", member)])
        assert reply.status == 303 and reply.headers["location"].startswith("/ops/exq/dead?")
        assert api.dead.size() == len(loaded.dead) - 1


def test_an_unreachable_redis_gives_a_page_saying_so(private_redis: RedisServer) -> None:
    config = Config(redis_url=private_redis.url, namespace="web")
    with Api(config) as api, serving(create_app(api=api)) as server:
        client = Client(server.port)
        assert client.get("/").status == 200
        private_redis.stop()
        for path in ("/", "/dead", "/busy"):
            reply = client.get(path)
            assert reply.status == 503 and "Redis did not answer" in reply.body
            assert "Traceback" not in reply.body


# -- the command -----------------------------------------------------------------------


def _web_command(*args: str, env: dict[str, str] | None = None,
                 ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "exq_fast", "web", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_the_web_command_refuses_a_public_address_without_auth(config: Config) -> None:
    base = ["--redis-url", config.redis_url, "--namespace", config.namespace]
    process = _web_command(*base, "--bind", "0.0.0.0", "--port", str(free_port()),
                           env={"EXQ_WEB_TOKEN": "", "EXQ_WEB_BASIC_AUTH": ""})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "--bind 0.0.0.0" in err and "--basic-auth" in err and len(err.splitlines()) == 1
    process = _web_command(*base, "--token", "short")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2 and "--token" in err and "16 characters" in err
    process = _web_command(*base, "--basic-auth", "no-colon")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2 and "USER:PASSWORD" in err and "no-colon" not in err


def test_the_web_command_serves_until_sigterm(config: Config, redis_client: redis.Redis,
                                              keys: Keys) -> None:
    port = free_port()
    redis_client.zadd(keys.dead, {hostile_job(): time.time()})
    process = _web_command("--redis-url", config.redis_url, "--namespace", config.namespace,
                           "--port", str(port), "--allowed-host", "ops.example")
    try:
        client = Client(port)

        def up() -> bool:
            try:
                return client.get("/dead").status == 200
            except OSError:
                return False
        wait_for(up, 20, "exq-fast web to answer")
        assert "1 job(s)" in client.get("/dead").body
        assert client.get("/dead", headers={"Host": "ops.example"}).status == 200
        assert client.get("/dead", headers={"Host": "evil.example"}).status == 421
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in err



# -- what a hostile site, odd data or another app on the host cannot do ------------------


def test_a_site_rebinding_its_name_to_loopback_gets_nothing(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given a UI with no auth, and a page of evil.example whose DNS now says 127.0.0.1
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    client.get("/dead")
    evil = {"Host": f"evil.example:{client.port}"}

    # Then neither its reads nor its POSTs reach Redis
    assert client.get("/dead", headers=evil).status == 421
    reply = client.post("/dead", [("action", "delete"), ("scope", "all"), ("confirmed", "1")],
                        headers={**evil, "Origin": f"http://evil.example:{client.port}"})
    assert reply.status == 421 and api.dead.size() == len(loaded.dead)
    # While localhost and [::1]-style names work
    assert client.get("/dead", headers={"Host": f"localhost:{client.port}"}).status == 200


def test_a_name_given_in_allowed_hosts_works_behind_a_proxy(
        api: Api, redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.zadd(keys.dead, {hostile_job(): 1.0})  # a page with a form (and a token)
    with serving(create_app(api=api, allowed_hosts=["ops.example.com"])) as server:
        web = Client(server.port)
        proxied = {"Host": "ops.example.com"}
        assert web.get("/dead", headers=proxied).status == 200
        assert web.get("/dead", headers={"Host": "other.example.com"}).status == 421
        # A form whose Origin is the proxy's public name, Host rewritten by the proxy
        reply = web.post("/busy", [("action", "quiet"), ("node", "n1")],
                         headers={"Origin": "https://ops.example.com"})
        assert reply.status == 303


def test_cross_site_subresources_are_refused_but_links_open(client: Client) -> None:
    image = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
             "Sec-Fetch-Dest": "image"}
    assert client.get("/dead?q=anything", headers=image).status == 403
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert client.get("/dead", headers=link).status == 200


def test_odd_queue_names_are_each_their_own_queue(
        api: Api, client: Client, enqueuer: Enqueuer) -> None:
    # Given queues whose names look like paths, escapes or markup, and a plain "b"
    names = ["a/../b", "b", "..", ".", "x%2Fy", "x/y", 'q<"\'>&', "sp ace?#"]
    for name in names:
        enqueuer.enqueue(name, "W", [name])

    listing = client.get("/queues").body
    assert 'q<"' not in listing and str(markupsafe.escape('q<"\'>&')) in listing
    for name in names:
        # Then each one's page lists its own job only
        page = client.get(f"/queue?name={_quote(name)}")
        assert page.status == 200, name
        assert page.body.count("<tr data-jid=") == 1, name
        assert html.escape(json.dumps([name])) in page.body or \
            str(markupsafe.escape(json.dumps([name]))) in page.body, name
        assert f'href="/queue?name={_quote(name)}"' in listing, name

    # And clearing "a/../b" (asked, then confirmed) clears it and nothing else
    ask = client.post(f"/queue?name={_quote('a/../b')}", [("action", "clear")])
    action = re.search(r'<form method="post" action="([^"]+)"', ask.body)
    assert action is not None
    done = client.request("POST", html.unescape(action.group(1)), urlencode(
        [("action", "clear"), ("confirmed", "1"), ("csrf", client.csrf)]).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"})
    assert done.status == 303
    assert api.queues.queue("a/../b").size() == 0
    assert all(api.queues.queue(n).size() == 1 for n in names if n != "a/../b")


def test_values_no_page_expected_never_break_one(
        client: Client, redis_client: redis.Redis, keys: Keys, config: Config) -> None:
    # Given scores and times no date can hold, a lone surrogate, deep nesting, an
    # empty queue name and a node whose times are junk
    deep = "[" * 900 + "]" * 900
    redis_client.zadd(keys.retry, {b'{"class":"K","args":[],"jid":"big-score"}': 1e20})
    redis_client.zadd(keys.dead, {
        b'{"class":"K","args":[],"jid":"t1","enqueued_at":1e300,"failed_at":1e17}': 5.0,
        b'{"class":"\\ud800","args":["\\udfff"],"jid":"sur\\ud800"}': 6.0,
        ('{"class":"Deep","args":' + deep + ',"jid":"deep"}').encode(): 7.0})
    redis_client.sadd(keys.queues, "", "q")
    redis_client.lpush(keys.queue("q"), b'{"class":"K","args":[],"enqueued_at":1e300}')
    node = 'junk<b>"node'
    redis_client.sadd(keys.processes, node)
    redis_client.hset(keys.node(node), mapping={"info": json.dumps({
        "hostname": "h\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
        "started_at": 1e300, "pid": 1, "queues": ["q"], "concurrency": 1}), "beat": "1e300",
        "busy": "0"})

    # Then every page answers 200 and shows them
    for path in ("/", "/queues", "/queue?name=q", "/busy", "/retries", "/dead",
                 "/dead?q=sur", "/retries/1e+20/" + digest_of(
                     b'{"class":"K","args":[],"jid":"big-score"}')):
        reply = client.get(path)
        assert reply.status == 200, (path, reply.body[-500:])
    assert "1e+20" in client.get("/retries").body
    dead = client.get("/dead").body
    assert "\\ud800" in dead and 'data-jid="deep"' in dead
    assert client.get("/queue?name=").status == 400
    busy = client.get("/busy").body
    assert 'junk<b>' not in busy and str(markupsafe.escape(node)) in busy


def test_junk_scores_in_a_detail_address_are_not_found(client: Client) -> None:
    for score in ("nan", "inf", "-inf", "1_000", "0x10", "1e999", "abc"):
        reply = client.get(f"/retries/{score}/0123456789abcdef")
        assert reply.status == 404, score
        assert "<h1>Not found</h1>" in reply.body


def test_an_address_with_no_page_gets_the_apps_not_found_page(client: Client) -> None:
    for path in ("/nope", "/static/nope.css", "/queues/extra", "/<b>x</b>"):
        reply = client.get(path)
        assert reply.status == 404, path
        assert "<h1>Not found</h1>" in reply.body and "Dashboard" in reply.body, path
    assert "&lt;b&gt;" in client.get("/<b>x</b>").body


def test_another_apps_cookies_on_the_same_host_do_not_lock_us_out(
        api: Api, redis_client: redis.Redis, keys: Keys) -> None:
    auth = WebAuth(token="a-token-of-twenty-chars")
    load_payloads(redis_client, keys, VERSIONS[0])
    with serving(create_app(api=api, auth=auth)) as server:
        web = Client(server.port)
        assert web.get(f"/dead?token={auth.token}").status == 303
        web.cookies = {"theme": '{"d":1}', **web.cookies, "prefs": "a b"}
        assert web.get("/dead").status == 200
        assert web.post("/busy", [("action", "quiet"), ("node", "n1")]).status == 303
        # While a wrong cookie value is refused
        forged = Client(server.port)
        forged.cookies = {"exq_web_token": "0" * 64}
        assert forged.get("/dead").status == 401


def test_a_notice_in_a_link_from_elsewhere_is_not_shown(client: Client) -> None:
    page = client.get("/dead?done=Your+session+expired,+sign+in+at+evil.example").body
    assert "evil.example" not in page and 'id="notice"' not in page


def test_back_never_leaves_the_app(client: Client, redis_client: redis.Redis,
                                   keys: Keys) -> None:
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    client.get("/dead")
    for back in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)",
                 "/dead#frag", "/\\evil.example"):
        reply = client.post("/dead", [("action", "delete"), ("member", ref(*loaded.dead[0])),
                                      ("back", back)])
        assert reply.status == 303 and reply.headers["location"].startswith("/dead?done="), back
        ask = client.post("/dead", [("action", "delete"), ("scope", "all"), ("back", back)])
        hrefs = re.findall(r'href="([^"]*)"', ask.body)
        assert '<a href="/dead" id="cancel">' in ask.body, back
        assert not [h for h in hrefs if "evil" in h or h.startswith("javascript")], back


def test_a_big_job_is_listed_short_and_deleted_by_reference(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given a 3 MB member that is not a job, and a 2 MB job, in the dead set
    junk = b"x" * 3_000_000
    job = json.dumps({"class": "Big", "args": ["y" * 2_000_000], "jid": "big"}).encode()
    redis_client.zadd(keys.dead, {junk: 1.0, job: 2.0})

    # Then the listing stays small, and each is deleted from its row's reference
    page = client.get("/dead")
    assert len(page.body) < 50_000
    for raw, score in ((junk, 1.0), (job, 2.0)):
        reply = client.post("/dead", [("action", "delete"), ("member", ref(raw, score))])
        assert reply.status == 303
    assert api.dead.size() == 0


def test_a_form_too_large_or_from_null_origin_is_refused_unread(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    loaded = load_payloads(redis_client, keys, VERSIONS[0])
    client.get("/dead")
    clear = [("action", "delete"), ("scope", "all"), ("confirmed", "1")]
    assert client.post("/dead", clear, headers={"Origin": "null"}).status == 403
    assert client.post("/dead", [*clear, ("pad", "z" * (2 << 20))]).status == 400
    assert api.dead.size() == len(loaded.dead)


def test_auth_failures_show_nothing_from_redis(api: Api, redis_client: redis.Redis,
                                               keys: Keys) -> None:
    load_payloads(redis_client, keys, VERSIONS[0])
    secret_jid = api.dead.page(size=1)[0].jid or ""
    auth = WebAuth("ops", "correct horse")
    with serving(create_app(api=api, auth=auth)) as server:
        for user, password in (("ops", "wrong"), ("nobody", "correct horse"), ("", "")):
            reply = Client(server.port, basic=(user, password)).get("/dead")
            assert reply.status == 401 and secret_jid not in reply.body
    assert "correct horse" not in repr(auth)


def _quote(name: str) -> str:
    return quote(name, safe="")


def test_retry_of_a_selection_leaves_what_is_not_a_job_and_keeps_the_page(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given 30 dead jobs and, among them, bytes that are not a job
    redis_client.zadd(keys.dead, {json.dumps({"class": "W", "args": [i], "jid": f"j{i}",
                                              "queue": "q"}): float(i) for i in range(30)})
    redis_client.zadd(keys.dead, {NOT_JSON: 100.0})
    client.get("/dead?page=2")
    job = json.dumps({"class": "W", "args": [3], "jid": "j3", "queue": "q"}).encode()

    # When both are selected on page 2 and retried
    reply = client.post("/dead", [("action", "retry"), ("member", ref(job, 3.0)),
                                  ("member", ref(NOT_JSON, 100.0)), ("back", "/dead?page=2")])

    # Then the job is in its queue, the bytes still in the dead set, and the browser is
    # back on page 2 with a notice saying so
    assert reply.status == 303 and reply.headers["location"].startswith("/dead?page=2&done=")
    assert redis_client.lrange(keys.queue("q"), 0, -1) == [job]
    assert redis_client.zscore(keys.dead, NOT_JSON) == 100.0
    assert "1 not a job: left where it was." in client.get(reply.headers["location"]).body

    # And pressing a button with nothing selected says so, changing nothing
    reply = client.post("/dead", [("action", "delete"), ("back", "/dead?page=2")])
    assert reply.status == 303
    assert "No job was selected." in client.get(reply.headers["location"]).body
    assert api.dead.size() == 30


def test_a_notice_is_for_the_browser_that_acted_and_seeds_are_ours(
        client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.zadd(keys.dead, {hostile_job(): 1.0})
    client.get("/dead")
    reply = client.post("/dead", [("action", "delete"), ("member", "0" * 16 + "@2.0")])
    location = reply.headers["location"]
    assert "Deleted 0 job(s)." in client.get(location).body
    other = Client(client.port)
    assert 'id="notice"' not in other.get(location).body  # another browser: not shown
    # A cookie we did not make is replaced, not used as a seed
    forged = Client(client.port)
    forged.cookies = {"exq_web_csrf": "notice:Sign in again at evil.example, please now"}
    assert forged.get("/dead").set_cookies  # a fresh seed


def test_references_resolve_among_many_jobs_at_one_score(
        api: Api, client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    # Given 3000 jobs scheduled for the same second (and one at +inf)
    members = [json.dumps({"class": "W", "args": [i], "jid": f"s{i}"}).encode()
               for i in range(3000)]
    redis_client.zadd(keys.schedule, dict.fromkeys(members, 1.8e9))
    never = b'{"class":"W","args":[],"jid":"never"}'
    redis_client.zadd(keys.schedule, {never: float("inf")})
    client.get("/scheduled")

    # When three of them are deleted by reference, and the +inf one from its page
    picked = [members[5], members[1500], members[2999]]
    reply = client.post("/scheduled", [("action", "delete"),
                                       *[("member", ref(m, 1.8e9)) for m in picked]])
    assert reply.status == 303
    assert client.get(f"/scheduled/inf/{digest_of(never)}").status == 200
    client.post("/scheduled", [("action", "delete"), ("member", f"{digest_of(never)}@inf")])

    # Then exactly those went
    assert api.scheduled.size() == 2997
    left = set(redis_client.zrange(keys.schedule, 0, -1))
    assert not left & {*picked, never}


def test_copies_of_one_job_in_a_queue_are_deleted_as_many_as_named(
        client: Client, redis_client: redis.Redis, keys: Keys) -> None:
    a, b = b'{"class":"A","args":[],"jid":"same"}', b'{"class":"B","args":[]}'
    redis_client.sadd(keys.queues, "dup")
    redis_client.rpush(keys.queue("dup"), a, b, a, b, a)
    client.get("/queue?name=dup")
    reply = client.post("/queue?name=dup", [("action", "delete"), ("member", ref(a, 0)),
                                            ("member", ref(a, 2))])
    assert "Deleted 2 job(s) from dup." in client.get(reply.headers["location"]).body
    assert redis_client.lrange(keys.queue("dup"), 0, -1).count(a) == 1
    junk = client.post("/queue?name=dup", [("action", "delete"), ("member", f"{digest_of(b)}@²")])
    assert junk.status == 303  # a junk index: found by its bytes instead
    assert redis_client.lrange(keys.queue("dup"), 0, -1).count(b) == 1


def test_retry_all_leaves_what_is_not_a_job(api: Api, client: Client,
                                           redis_client: redis.Redis, keys: Keys) -> None:
    job = b'{"class":"W","args":[],"queue":"q"}'
    redis_client.zadd(keys.dead, {NOT_JSON: 1.0, job: 2.0, b'{"args":"x"}': 3.0})
    client.get("/dead")
    client.post("/dead", [("action", "retry"), ("scope", "all"), ("confirmed", "1")])
    assert redis_client.lrange(keys.queue("q"), 0, -1) == [job]
    assert api.dead.size() == 2 and redis_client.llen(keys.queue("default")) == 0


def test_the_filter_finds_what_redis_glob_finds(client: Client, redis_client: redis.Redis,
                                               keys: Keys) -> None:
    redis_client.zadd(keys.dead, {
        '{"class":"\u212aafkaWorker","args":[],"jid":"kelvin"}'.encode(): 1.0,
        b'{"class":"KafkaWorker","args":[],"jid":"plain"}': 2.0,
        b'{"class":"Other","args":[],"jid":"x-kafka-1"}': 3.0,
        b'{"class":"Q<A>","args":[],"jid":"lt"}': 4.0})
    page = client.get("/dead?q=KAFKA").body
    assert 'data-jid="plain"' in page and 'data-jid="x-kafka-1"' not in page
    assert "1 match(es)" in page
    assert 'data-jid="lt"' in client.get("/dead?q=q%3Ca").body


def test_frames_images_and_other_local_apps_are_refused(client: Client,
                                                       redis_client: redis.Redis,
                                                       keys: Keys) -> None:
    redis_client.zadd(keys.dead, {hostile_job(): 1.0})
    frame = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
             "Sec-Fetch-Dest": "iframe"}
    assert client.get("/dead", headers=frame).status == 403
    sibling = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors",
               "Sec-Fetch-Dest": "image"}
    assert client.get("/dead?q=a", headers=sibling).status == 403
    client.get("/dead")
    for origin in ("http://localhost:9999", f"https://127.0.0.1:{client.port}"):
        reply = client.post("/busy", [("action", "quiet"), ("node", "n1")],
                            headers={"Origin": origin})
        assert reply.status == 403, origin
    assert client.get("/dead", headers={"Host": f"localhost.:{client.port}"}).status == 200


def test_a_chunked_body_past_the_limit_is_refused(api: Api, client: Client,
                                                 redis_client: redis.Redis,
                                                 keys: Keys) -> None:
    redis_client.zadd(keys.dead, {hostile_job(): 1.0})
    client.get("/dead")
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    body = (b"a=" + b"x" * 65536 + b"&" for _ in range(40))  # 2.6 MB, no Content-Length
    conn.request("POST", "/dead", body=body, encode_chunked=True, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Transfer-Encoding": "chunked",
        "Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())})
    assert conn.getresponse().status == 400
    conn.close()
    assert api.dead.size() == 1
