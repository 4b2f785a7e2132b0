"""The web UI in a real browser: Debian's headless Chromium driven by selenium
(chromium-driver), against the UI served by uvicorn over the real Redis with jobs
in every state (queued, running, retrying, scheduled, dead, a hostile payload,
bytes that are not a job) and a node that has processed and failed jobs.

Each page is loaded, its numbers compared with the Api, its actions clicked and
Redis read back; a screenshot of each page is written under the test's
temporary directory (and, with ``EXQ_WEB_SCREENSHOTS=<dir>``, the dashboard's
and the dead set's there too: that is how the README's pictures are made).

Without chromium and chromedriver the tests skip, except under CI (``CI`` set),
where they fail: .ci/run installs them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from exq_fast import Exq
from exq_fast.admin import Api
from exq_fast.config import Config
from exq_fast.enqueuer import Enqueuer
from exq_fast.keys import Keys
from exq_fast.web import create_app
from tests.conftest import wait_for
from tests.test_api import EXQ23, SIDEKIQ, Node, load_payloads
from tests.web import WebServer, serving

HOSTILE = "<script>document.title='pwned';alert(1)</script>"
NOT_JSON = b"\xff\xfe not json {"


def _binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    if "CI" in os.environ:
        pytest.fail(f"{names[0]} is not on PATH: CI must install it (apt-get install chromium "
                    "chromium-driver)")
    pytest.skip(f"{names[0]} is not installed (Debian packages chromium, chromium-driver)")


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    browser = _binary("chromium", "chromium-browser")
    chromedriver = _binary("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1360,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(chromedriver), options=options)
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


@dataclass
class World:
    """Jobs in every state in the test's namespace, a node running one, the UI."""

    api: Api
    web: WebServer
    keys: Keys
    redis: redis.Redis
    node: Node
    running_jid: str
    mail_jids: list[str]

    def url(self, path: str) -> str:
        return self.web.url + path


def _fast_node(config: Config, enqueuer: Enqueuer) -> None:
    """Run 40 jobs (8 of them failing, out of retries) on a node of its own, so the
    counters, the per-second counters and the per-day ones have moved."""
    def work(n: int) -> None:
        if n % 5 == 0:
            raise RuntimeError(f"job {n} failed <on purpose>")

    fast = Config(redis_url=config.redis_url, namespace=config.namespace,
                  node_id=f"{config.node_id}-fast", queues=["fast"])
    node = Exq(fast, workers={"Fast": work})
    node.start()
    try:
        enqueuer.enqueue_all([("fast", "Fast", [n], {"max_retries": 0}) for n in range(40)])
        with Api(fast) as api:
            wait_for(lambda: api.stats.total("processed") + api.stats.total("failed") >= 40,
                     20, "the fast node to run its 40 jobs")
    finally:
        node.stop(timeout=5)


@pytest.fixture
def world(config: Config, enqueuer: Enqueuer, redis_client: redis.Redis,
          keys: Keys) -> Iterator[World]:
    _fast_node(config, enqueuer)
    load_payloads(redis_client, keys, EXQ23)
    load_payloads(redis_client, keys, SIDEKIQ)
    mail = [enqueuer.enqueue("mail", "Mailer.Deliver", [f"user{i}@example.com", i])
            for i in range(30)]
    hostile = json.dumps({"class": f"Evil{HOSTILE}", "args": [HOSTILE], "jid": "evil-1",
                          "queue": "mail", "retry_count": 2, "error_class": "Hostile",
                          "error_message": HOSTILE, "failed_at": time.time()})
    redis_client.lpush(keys.queue("mail"), hostile)
    redis_client.zadd(keys.dead, {hostile: time.time(), NOT_JSON: time.time() - 5})
    # The node runs one job from a queue of its own; no scheduler, so the libraries'
    # due retries and scheduled jobs stay where the pages show them.
    node = Node(dataclasses.replace(config, queues=["running"], scheduler_enable=False))
    node.exq.start()
    with Api(config) as api, serving(create_app(api=api)) as web:
        try:
            running = enqueuer.enqueue("running", "Api.Blocker", ["long", 1])
            assert node.started.wait(10)
            node.ping()
            yield World(api, web, keys, redis_client, node, running, mail)
        finally:
            node.close()


def _shot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if target := os.environ.get("EXQ_WEB_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def _no_alert(driver: WebDriver) -> None:
    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return
    raise AssertionError(f"a script from a payload ran: alert {text!r}")


def _text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def _click(driver: WebDriver, css: str) -> None:
    _follow(driver, driver.find_element(By.CSS_SELECTOR, css))


def _follow(driver: WebDriver, element: WebElement) -> None:
    """Click a link or button that leads to another page, and wait until that page has
    loaded. Selenium's click returns once the event is dispatched, maybe before the
    browser has left the page, so a lookup right after it could search the old page
    (CI failed that way once: the confirmation's question was looked for too early)."""
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def loaded() -> bool:
        try:
            old.tag_name  # noqa: B018 -- touching it raises once the page is gone
        except StaleElementReferenceException:
            return bool(driver.execute_script("return document.readyState") == "complete")
        return False

    wait_for(loaded, 10, "the next page to load",
             detail=lambda: f"still at {driver.current_url}: {driver.title}")


def _notice(driver: WebDriver) -> str:
    return str(wait_for(lambda: driver.find_elements(By.ID, "notice"), 10,
                        "the notice after an action")[0].text)


def test_every_page_loads_with_the_api_numbers(driver: WebDriver, world: World,
                                               tmp_path: Path) -> None:
    api = world.api
    # The dashboard: the Api's numbers, and the live chart refreshing them
    driver.get(world.url("/"))
    summary = api.stats.summary()
    for key, value in (("processed", summary.processed), ("failed", summary.failed),
                       ("busy", summary.busy), ("enqueued", summary.enqueued),
                       ("retries", summary.retry_size), ("scheduled", summary.scheduled_size),
                       ("dead", summary.dead_size), ("processes", summary.processes)):
        assert _text(driver, f"#stat-{key}") == str(value), key
    assert summary.processed >= 32 and summary.failed >= 8 and summary.busy == 1
    bars = driver.find_elements(By.CSS_SELECTOR, "#history rect.processed")
    assert len(bars) == 30 and float(bars[-1].get_attribute("height") or 0) > 0
    late = b'{"class":"Late","args":[],"queue":"q"}'
    world.redis.zadd(world.keys.retry, {late: time.time() + 3600})
    wait_for(lambda: _text(driver, "#stat-retries") == str(summary.retry_size + 1), 10,
             "the live refresh to show the new retry")
    assert _text(driver, "#live-status") == ""
    time.sleep(0.3)  # let the chart draw its frame before the picture (nothing asserted on it)
    _shot(driver, tmp_path, "dashboard")

    # Queues: each queue's size
    driver.get(world.url("/queues"))
    for name, size in api.queues.sizes().items():
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-queue="{name}"] td.size')
        assert row.text == str(size)
    _shot(driver, tmp_path, "queues")
    driver.get(world.url("/queue?name=mail"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 25
    _shot(driver, tmp_path, "queue")

    # Busy: the node and its running job
    driver.get(world.url("/busy"))
    assert driver.find_elements(By.CSS_SELECTOR, f'tr[data-node="{world.node.exq.config.node_id}"]')
    assert driver.find_elements(By.CSS_SELECTOR, f'#running tr[data-jid="{world.running_jid}"]')
    _shot(driver, tmp_path, "busy")

    # The sets: their sizes, a detail page each
    for path, jobset in (("retries", api.retries), ("scheduled", api.scheduled),
                         ("dead", api.dead)):
        driver.get(world.url(f"/{path}"))
        assert f"{jobset.size()} job(s)" in _text(driver, "h1")
        rows = driver.find_elements(By.CSS_SELECTOR, "#entries tbody tr")
        assert len(rows) == min(jobset.size(), 25)
        _shot(driver, tmp_path, path)
        _follow(driver, rows[0].find_element(By.CSS_SELECTOR, "td a"))
        assert driver.find_element(By.ID, "detail")
        _shot(driver, tmp_path, f"{path}-job")
    _no_alert(driver)


def test_a_hostile_payload_is_text_and_a_broken_member_its_bytes(
        driver: WebDriver, world: World, tmp_path: Path) -> None:
    for path in ("/queue?name=mail", "/dead", "/"):
        driver.get(world.url(path))
        _no_alert(driver)
        assert driver.title.endswith("exq-fast") and "pwned" not in driver.title
    driver.get(world.url("/dead?q=evil"))
    _click(driver, '#entries tr[data-jid="evil-1"] td a')
    _no_alert(driver)
    assert _text(driver, "#error-message") == HOSTILE
    assert HOSTILE in _text(driver, "#args")
    _only_our_scripts(driver, world)
    _shot(driver, tmp_path, "hostile")
    driver.get(world.url("/dead"))
    raw = [r for r in driver.find_elements(By.CSS_SELECTOR, "#entries tbody tr")
           if "not a job" in r.text]
    assert len(raw) == 1 and r"\xff\xfe not json {" in raw[0].text
    _only_our_scripts(driver, world)


def _only_our_scripts(driver: WebDriver, world: World) -> None:
    """No script element on the page but the UI's own files."""
    sources = [s.get_attribute("src") or "" for s in driver.find_elements(By.TAG_NAME, "script")]
    assert all(src.startswith(world.url("/static/")) for src in sources), sources


def test_retry_delete_kill_clear_and_quiet_change_redis(
        driver: WebDriver, world: World, tmp_path: Path) -> None:
    api, keys, client = world.api, world.keys, world.redis
    # Retry now: the first two retries, selected, go to the head of their queues
    driver.get(world.url("/retries"))
    picked = api.retries.page(size=2)
    for box in driver.find_elements(By.CSS_SELECTOR, "#entries input.select")[:2]:
        box.click()
    retries_before = api.retries.size()
    _click(driver, "#retry-selected")
    assert "Moved 2 job(s) to their queues." in _notice(driver)
    assert api.retries.size() == retries_before - 2
    for entry in picked:
        queue = entry.job.queue if entry.job and entry.job.queue else "default"
        assert entry.raw in client.lrange(keys.queue(queue), 0, 1)

    # Kill from a retry's detail page: it lands in the dead set byte for byte
    victim = api.retries.page(size=1)[0]
    _click(driver, "#entries tbody tr td a")
    _click(driver, "#kill-one")
    assert "dead set" in _notice(driver)
    assert client.zscore(keys.dead, victim.raw) is not None
    assert client.zscore(keys.retry, victim.raw) is None

    # Delete a dead job from its page
    driver.get(world.url("/dead?q=evil"))
    _click(driver, '#entries tr[data-jid="evil-1"] td a')
    dead_before = api.dead.size()
    _click(driver, "#delete-one")
    assert "Deleted 1 job(s)." in _notice(driver)
    assert api.dead.size() == dead_before - 1 and api.dead.find("evil-1") is None

    # Clear a queue: asked first, then empty
    driver.get(world.url("/queue?name=mail"))
    size = api.queues.queue("mail").size()
    _click(driver, "#clear-queue")
    assert f"Delete all {size} job(s) of queue mail" in _text(driver, "#question")
    _shot(driver, tmp_path, "confirm")
    assert api.queues.queue("mail").size() == size
    _click(driver, "#confirm")
    assert "Cleared mail" in _notice(driver)
    assert api.queues.queue("mail").size() == 0

    # Quiet the node: the signal is in Redis, and the node goes quiet on its next beat
    driver.get(world.url("/busy"))
    node_id = world.node.exq.config.node_id
    _click(driver, f'tr[data-node="{node_id}"] button[value="quiet"]')
    assert "quiet" in _notice(driver)
    assert client.lrange(keys.signals(node_id), 0, -1) == [b"TSTP"]
    world.node.ping_until(lambda: world.node.exq.subscriptions() == [], "TSTP handled")
    driver.get(world.url("/busy"))
    assert _text(driver, f'tr[data-node="{node_id}"] td.state') == "quiet"
    assert [n.quiet for n in api.processes.nodes() if n.identity == node_id] == [True]
