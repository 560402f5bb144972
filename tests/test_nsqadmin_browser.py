"""pynsqadmin in a real browser: headless Chromium (Debian's ``chromium`` +
``chromium-driver``, installed by .ci/run) through Selenium, against real
pynsqlookupd + 2 pynsqd subprocesses.  One browser session and one cluster for
the whole module.  Screenshots of the main pages go to
``test-output/screenshots/`` (gitignored) for a person to look at."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Daemon, RawClient, channel_stats, start_nsqadmin, start_nsqd, start_nsqlookupd, wait_for

from pynsqadmin.screenshots import chromium_paths, open_chromium, save_full_page

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "screenshots"

try:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - the test extra installs it
    By = None

pytestmark = pytest.mark.skipif(
    By is None or chromium_paths() is None,
    reason="needs selenium and Debian's chromium + chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)",
)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lookupd = start_nsqlookupd()
        self.nsqds = [self.start_nsqd(f"nsqd{i}") for i in range(2)]
        self.admin = start_nsqadmin(f"--lookupd-http-address={self.lookupd.http_address}", "--sample-interval=1s")
        self.url = f"http://127.0.0.1:{self.admin.http_port}"

    def start_nsqd(self, name: str) -> Daemon:
        (self.tmp / name).mkdir()
        return start_nsqd(str(self.tmp / name), "--broadcast-address=127.0.0.1", f"--lookupd-tcp-address=127.0.0.1:{self.lookupd.tcp_port}")

    def stop(self) -> None:
        for d in [self.admin, *self.nsqds, self.lookupd]:
            d.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("browser"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        driver = open_chromium(profile)
        try:
            yield driver
        finally:
            driver.quit()


def shoot(browser: Any, name: str) -> None:
    """A full-page screenshot for a person to look at."""
    save_full_page(browser, SHOTS / f"{name}.png")


def retry_stale(fn: Callable[[], Any]) -> Callable[[], Any]:
    """The live refresh swaps the page's content: re-find, don't fail."""

    def run() -> Any:
        try:
            return fn()
        except StaleElementReferenceException:
            return None

    return run


def attr(browser: Any, css: str, name: str) -> str | None:
    found = browser.find_elements(By.CSS_SELECTOR, css)
    return found[0].get_attribute(name) if found else None


def click(browser: Any, css: str) -> None:
    def clicked() -> bool:
        found = browser.find_elements(By.CSS_SELECTOR, css)
        if not found:
            return False
        found[0].click()
        return True

    wait_for(retry_stale(clicked), timeout=10, message=f"a clickable {css}")


def text(browser: Any, css: str, timeout: float = 10) -> str:
    """The text of ``css`` once it is on the page (a click's navigation may
    still be on its way)."""

    def found() -> str | None:
        elements = browser.find_elements(By.CSS_SELECTOR, css)
        return elements[0].text if elements else None

    return wait_for(retry_stale(found), timeout=timeout, message=f"{css} on the page")


def publish(nsqd: Daemon, topic: str, count: int) -> None:
    status, body = nsqd.http("POST", f"/mpub?topic={topic}", b"\n".join(b"m%d" % i for i in range(count)))
    assert status == 200, body


def no_console_errors(browser: Any) -> None:
    """No CSP violation, no failed fetch, no script error."""
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_topic_appears_after_a_publish(cluster, browser, unique):
    browser.get(cluster.url + "/")
    assert browser.title == "Topics · pynsqadmin"
    publish(cluster.nsqds[0], unique, 3)
    publish(cluster.nsqds[1], unique, 2)
    # no reload: the page's script refreshes it in place
    row = f'tr[data-topic="{unique}"]'
    wait_for(retry_stale(lambda: browser.find_elements(By.CSS_SELECTOR, row)), timeout=20, message="the topic's row")
    wait_for(retry_stale(lambda: attr(browser, f"{row} td.depth", "textContent") == "5"), timeout=20, message="depth 5")
    shoot(browser, "topics")
    no_console_errors(browser)


def test_depth_and_rate_graphs_change_as_messages_flow(cluster, browser, unique):
    for nsqd in cluster.nsqds:
        assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
        assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=flow")[0] == 200
    browser.get(f"{cluster.url}/topics/{unique}/flow")
    depth = "svg.graph-depth"
    rate = "svg.graph-rate"
    wait_for(retry_stale(lambda: int(attr(browser, depth, "data-points") or 0) >= 2), timeout=20, message="two samples")
    assert float(attr(browser, depth, "data-last")) == 0.0
    publish(cluster.nsqds[0], unique, 40)
    publish(cluster.nsqds[1], unique, 20)
    wait_for(retry_stale(lambda: attr(browser, depth, "data-last") == "60.0"), timeout=20, message="the depth graph at 60")
    wait_for(retry_stale(lambda: float(attr(browser, rate, "data-last") or 0) > 0), timeout=20, message="a message rate above 0")
    # a consumer drains one nsqd: depth goes down, the clients table fills
    with RawClient(cluster.nsqds[0].tcp_port) as consumer:
        consumer.identify(user_agent="browser-test/1.0", hostname="drainer", heartbeat_interval=30000)
        assert consumer.sub(unique, "flow").data == b"OK"
        consumer.cmd(b"RDY", b"100")
        for _ in range(40):
            consumer.cmd(b"FIN", consumer.read_message()[2])
        wait_for(retry_stale(lambda: attr(browser, depth, "data-last") == "20.0"), timeout=20, message="the depth graph at 20")
        wait_for(retry_stale(lambda: "browser-test/1.0" in (attr(browser, "#clients", "textContent") or "")), timeout=20, message="the client listed")
        shoot(browser, "channel")
    browser.get(f"{cluster.url}/topics/{unique}")
    shoot(browser, "topic")
    no_console_errors(browser)


def test_pausing_a_channel_from_the_ui(cluster, browser, unique):
    for nsqd in cluster.nsqds:
        publish(nsqd, unique, 1)
        assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=p")[0] == 200
    browser.get(f"{cluster.url}/topics/{unique}/p")
    click(browser, 'button[data-action="pause_channel"]')
    # a confirmation first: nothing has happened yet
    assert text(browser, "form.confirm .question").startswith("Pause channel “p”")
    assert not any(channel_stats(n, unique, "p")["paused"] for n in cluster.nsqds)
    shoot(browser, "confirm")
    click(browser, "#confirm")
    assert text(browser, "p.notice") == "Channel paused."
    assert all(channel_stats(n, unique, "p")["paused"] for n in cluster.nsqds)
    assert text(browser, "h1 .badge.paused") == "paused"
    # and back, with the page that now offers Unpause
    click(browser, 'button[data-action="unpause_channel"]')
    text(browser, "form.confirm .question")
    click(browser, "#confirm")
    wait_for(lambda: not any(channel_stats(n, unique, "p")["paused"] for n in cluster.nsqds), message="unpaused in /stats")


def test_emptying_a_channel_from_the_ui_without_javascript(cluster, browser, unique):
    for nsqd in cluster.nsqds:
        assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
        assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=e")[0] == 200
        publish(nsqd, unique, 7)
    # a new topic's messages reach its channel once nsqd has asked lookupd (#1416)
    wait_for(lambda: sum(channel_stats(n, unique, "e")["depth"] for n in cluster.nsqds) == 14, message="14 queued")
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        browser.get(f"{cluster.url}/topics/{unique}/e")
        assert text(browser, "#channel-nodes tfoot td.depth") == "14"
        click(browser, 'button[data-action="empty_channel"]')
        assert "deleted for good" in text(browser, "form.confirm .question")
        click(browser, "#confirm")
        assert text(browser, "p.notice") == "Channel emptied."
        assert [channel_stats(n, unique, "e")["depth"] for n in cluster.nsqds] == [0, 0]
        assert browser.find_element(By.CSS_SELECTOR, "#channel-nodes tfoot td.depth").text == "0"
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})


def test_a_killed_nsqd_shows_as_down(cluster, browser, unique):
    doomed = cluster.start_nsqd(f"doomed-{unique}")
    address = f"127.0.0.1:{doomed.http_port}"
    try:
        publish(doomed, unique, 5)
        browser.get(cluster.url + "/nodes")
        row = f'tr[data-node="{address}"]'
        wait_for(retry_stale(lambda: attr(browser, row, "class") == "up"), timeout=20, message="the node up")
        shoot(browser, "nodes")
    finally:
        doomed.kill()
    wait_for(retry_stale(lambda: attr(browser, row, "class") == "down"), timeout=20, message="the node marked down")
    assert "down" in text(browser, f"{row} .badge.down")
    # its topic's page still renders, the node marked there too
    browser.get(f"{cluster.url}/topics/{unique}")
    assert "down" in text(browser, "#topic-nodes tr.down")
    browser.get(cluster.url + "/lookup")
    assert browser.find_elements(By.CSS_SELECTOR, "section.lookupd")
    shoot(browser, "lookup")
    no_console_errors(browser)
