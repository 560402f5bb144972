"""Refresh the README's pictures: ``python -m pynsqadmin.screenshots docs/``.

Starts a small cluster on loopback ports chosen by the OS (pynsqlookupd, two
pynsqd, a third one killed on purpose, pynsqadmin sampling every second),
makes traffic for a while -- publishers, a slow consumer that gives some
messages back until they are dead-lettered, a paused channel, a retaining
topic -- and saves one PNG per main page (and the channel's peek and the
dead-letter topic's page), taken by headless Chromium (Debian's
``chromium`` + ``chromium-driver``) through Selenium (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynsqd.protocol import FRAME_TYPE_MESSAGE, MAGIC_V2, FrameDecoder, decode_message, encode_command

PAGES = {
    "topics": "/",
    "topic": "/topics/orders",
    "channel": "/topics/orders/billing",
    "channel-peek": "/topics/orders/billing?peek=10&all=1",
    "dead-letters": "/topics/orders.dead",
    "nodes": "/nodes",
    "lookup": "/lookup",
}
LISTENING = re.compile(r"(TCP|HTTP): listening on \S+:(\d+)")


class Process:
    """A daemon of ours as a subprocess; ``ports`` from its listening lines."""

    def __init__(self, module: str, *args: str, kinds: Sequence[str] = ("TCP", "HTTP")) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.ports: dict[str, int] = {}
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            m = LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(2))
            if all(k in self.ports for k in kinds):
                break
        else:
            raise RuntimeError(f"{module} exited before listening")
        # keep draining, so that a chatty daemon never blocks on a full pipe
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(30)


class LocalCluster:
    """pynsqlookupd + ``nsqds`` pynsqd (data in a temporary directory) + a
    pynsqadmin, all on loopback ports chosen by the OS; ``with`` stops them."""

    def __init__(self, nsqds: int, *nsqd_flags: str, admin_flags: Sequence[str] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.procs: list[Process] = []
        try:
            self.lookupd = self._start("pynsqlookupd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--broadcast-address=127.0.0.1")
            self.nsqds = [
                self._start(
                    "pynsqd",
                    "--tcp-address=127.0.0.1:0",
                    "--http-address=127.0.0.1:0",
                    "--broadcast-address=127.0.0.1",
                    f"--data-path={self._data_dir(i)}",
                    f"--lookupd-tcp-address=127.0.0.1:{self.lookupd.ports['TCP']}",
                    *nsqd_flags,
                )
                for i in range(nsqds)
            ]
            lookupd_http = f"--lookupd-http-address=127.0.0.1:{self.lookupd.ports['HTTP']}"
            self.admin = self._start("pynsqadmin", "--http-address=127.0.0.1:0", lookupd_http, *admin_flags, kinds=("HTTP",))
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.admin.ports['HTTP']}"

    def _data_dir(self, i: int) -> Path:
        path = Path(self._tmp.name, f"nsqd{i}")
        path.mkdir()
        return path

    def _start(self, module: str, *args: str, kinds: Sequence[str] = ("TCP", "HTTP")) -> Process:
        proc = Process(module, *args, kinds=kinds)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def post(port: int, path: str, body: bytes = b"") -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def slow_consumer(port: int, topic: str, channel: str, stop: threading.Event, per_second: float, give_back: int = 0) -> None:
    """Subscribes with RDY 5 and finishes about ``per_second`` messages a second,
    so that the pages show a client, messages in flight and a draining depth;
    one message id in ``give_back`` is always given back (REQ 2 s)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    decoder = FrameDecoder()
    identify = json.dumps({"client_id": "billing-worker", "hostname": "worker-1", "user_agent": "pynsqd-demo/1.0", "heartbeat_interval": 30000})
    sock.sendall(MAGIC_V2 + encode_command(b"IDENTIFY", body=identify.encode()) + encode_command(b"SUB", topic, channel) + encode_command(b"RDY", b"5"))
    sock.settimeout(0.2)
    try:
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                if frame.frame_type == FRAME_TYPE_MESSAGE:
                    stop.wait(1 / per_second)
                    msg_id = decode_message(frame.data)[2]
                    if give_back and int(msg_id[-3:], 16) % give_back == 0:
                        sock.sendall(encode_command(b"REQ", msg_id, b"2000"))
                    else:
                        sock.sendall(encode_command(b"FIN", msg_id))
                elif frame.data == b"_heartbeat_":
                    sock.sendall(encode_command(b"NOP"))
    finally:
        sock.close()


def publish_until(ports: list[int], stop: threading.Event) -> None:
    """Bursts of orders and clicks on each nsqd, twice a second."""
    tick = 0
    while not stop.is_set():
        tick += 1
        burst = 20 + 15 * (tick % 4)
        try:
            for port in ports:
                post(port, "/mpub?topic=orders", b"\n".join(b'{"order": %d}' % i for i in range(burst)))
                post(port, "/mpub?topic=clicks", b"\n".join(b"click" for _ in range(burst * 2)))
        except OSError:
            return  # the cluster is going away
        stop.wait(0.5)


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,900",
)


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from the OS packages, or None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def open_chromium(profile: str | Path) -> Any:
    """Headless Chromium through Selenium, with the OS's chromedriver given
    explicitly (Selenium never downloads one) and a fresh profile; nothing
    in it reaches for the network by itself."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=paths[1]), options=opts)


def save_full_page(driver: Any, path: str | Path) -> None:
    """The whole page as a PNG, not just the window's height."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
    )
    Path(path).write_bytes(base64.b64decode(shot["data"]))


def take(directory: Path, traffic_seconds: float) -> list[Path]:
    if chromium_paths() is None:
        raise SystemExit("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    directory.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    with LocalCluster(3, "--e2e-processing-latency-percentile=0.99,0.5", admin_flags=["--sample-interval=1s"]) as cluster, \
            tempfile.TemporaryDirectory() as profile:
        try:
            http = [n.ports["HTTP"] for n in cluster.nsqds]
            for port in http[:2]:
                post(port, "/topic/create?topic=orders")
                post(port, "/topic/create?topic=clicks")
                for channel in ("billing", "shipping"):
                    post(port, f"/channel/create?topic=orders&channel={channel}")
                post(port, "/channel/create?topic=clicks&channel=analytics")
            post(http[0], "/channel/pause?topic=clicks&channel=analytics")
            # pynsqd's opt-in features: retention, dead letters after 2 attempts, a disk bound
            for port in http[:2]:
                post(port, "/topic/retention?topic=orders&time=1h")
                post(port, "/channel/settings?topic=orders&channel=billing&max_attempts=2")
                post(port, "/topic/settings?topic=clicks&max_disk_bytes=100000000")
            post(http[2], "/pub?topic=audit", b"x")
            worker = threading.Thread(target=slow_consumer, args=(cluster.nsqds[0].ports["TCP"], "orders", "billing", stop, 40.0, 20), daemon=True)
            worker.start()
            publisher = threading.Thread(target=publish_until, args=(http[:2], stop), daemon=True)
            publisher.start()
            time.sleep(traffic_seconds)
            cluster.nsqds[2].stop(kill=True)  # shown as down on the nodes page
            time.sleep(2)
            browser = open_chromium(profile)
            saved = []
            try:
                for name, path in PAGES.items():
                    browser.get(cluster.url + path)
                    out = directory / f"nsqadmin-{name}.png"
                    save_full_page(browser, out)
                    saved.append(out)
            finally:
                browser.quit()
            return saved
        finally:
            stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pynsqadmin.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="docs", help="where the PNGs go (default: docs)")
    parser.add_argument("--traffic-seconds", type=float, default=25.0, help="how long to make traffic before the pictures")
    args = parser.parse_args(argv)
    for path in take(Path(args.directory), args.traffic_seconds):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
