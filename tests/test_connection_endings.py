"""How TCP connections end (issue 11, defect 5): to a client, a killed or
stopped pynsqd must look exactly like a killed or stopped Go nsqd — an
orderly EOF (``recv`` returns ``b""``) after everything the daemon sent,
never ECONNRESET where nsqd's close is orderly.

The kernel answers a close that finds unread input in the socket with RST
instead of FIN, so the clients here keep sending while the daemon ends.
Every test runs against pynsqd and, where the binary is present, against Go
nsqd 1.3.0 with the same expectations: that is the parity being proved."""

from __future__ import annotations

import fcntl
import json
import signal
import socket
import struct
import termios
import threading
import time

import pytest

from helpers import GO_NSQD_MISSING, Daemon, go_nsq_binary, http_request, start_go_nsqd, start_nsqd, wait_for
from pynsqd.protocol import FRAME_TYPE_ERROR, FRAME_TYPE_MESSAGE, FrameDecoder, decode_message

PACE = 0.002  # seconds between two commands of a sending client
PROC_NET_TCP = "/proc/net/tcp"


@pytest.fixture(params=["pynsqd", "go-nsqd"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "go-nsqd" and go_nsq_binary("nsqd") is None:
        pytest.skip(GO_NSQD_MISSING)
    return request.param


def start(kind: str, data_path: str, *extra: str) -> Daemon:
    if kind == "pynsqd":
        return start_nsqd(data_path, "--log-level=info", *extra)
    return start_go_nsqd(data_path, *extra)


def identify(**fields: object) -> bytes:
    body = json.dumps(fields).encode()
    return b"IDENTIFY\n" + struct.pack(">i", len(body)) + body


class Peer:
    """A raw-socket client: one thread sends ``command`` every PACE seconds
    (or without pause, if flooding) while the gate is open, another reads everything (FINing messages when
    asked, answering heartbeats unless ``silent``) and records how the
    connection ended: ``"EOF"`` or ``"RST"``."""

    def __init__(self, port: int, setup: bytes, command: bytes | None = None, *, fin: bool = False, read: bool = True, silent: bool = False, flood: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        # a flooding client sends faster than any daemon reads: input is
        # always waiting in the daemon's socket
        self.command = command * (65536 // len(command)) if flood and command else command
        self.pace = 0.0 if flood else PACE
        self.fin = fin
        self.silent = silent
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()
        if read:
            self.reading.set()
        self.done = threading.Event()
        self.decoder = FrameDecoder()
        self.messages = 0
        self.errors: list[bytes] = []
        self.received = 0
        self.reset = False
        self.eof = False
        self.sock.sendall(b"  V2" + setup)
        self._threads = [threading.Thread(target=self._read, daemon=True)]
        if command is not None:
            self._threads.append(threading.Thread(target=self._send_loop, daemon=True))
        for t in self._threads:
            t.start()

    def send(self, data: bytes) -> bool:
        with self.lock:
            if not self.gate.is_set():
                return True
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self._failed(exc)
                return False
            return True

    def _failed(self, exc: OSError) -> None:
        # The kernel reports an RST once, to whichever call comes first:
        # ECONNRESET if it came instead of a FIN; EPIPE if a FIN came first
        # (and the RST answered what this client sent after it)
        if isinstance(exc, ConnectionResetError):
            self.reset = True

    def _send_loop(self) -> None:
        assert self.command is not None
        while not self.done.is_set():
            self.gate.wait()
            if not self.send(self.command):
                return
            if self.pace:
                time.sleep(self.pace)

    def pause(self) -> None:
        """No byte leaves this client until :meth:`resume`."""
        self.gate.clear()
        with self.lock:
            pass

    def all_delivered(self) -> bool:
        """Everything this client sent reached the daemon's kernel (none
        still queued here, e.g. behind a delayed ACK)."""
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0] == 0

    def resume(self) -> None:
        self.gate.set()
        self.reading.set()

    def _read(self) -> None:
        self.reading.wait()
        try:
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    self.eof = True
                    return
                self.received += len(data)
                self.decoder.receive_data(data)
                while (frame := self.decoder.next_frame()) is not None:
                    if frame.frame_type == FRAME_TYPE_MESSAGE:
                        self.messages += 1
                        if self.fin:
                            self.send(b"FIN " + decode_message(frame.data)[2] + b"\n")
                    elif frame.frame_type == FRAME_TYPE_ERROR:
                        self.errors.append(frame.data)
                    elif frame.data == b"_heartbeat_" and not self.silent:
                        self.send(b"NOP\n")
        except OSError as exc:
            self._failed(exc)
        finally:
            self.done.set()

    def wait_ended(self, timeout: float = 20.0) -> str:
        """``"EOF"``: the connection ended with a FIN; ``"RST"``: reset."""
        if not self.done.wait(timeout):
            return "still open"
        with self.lock:  # the sender's last error is in
            return "RST" if self.reset else "EOF" if self.eof else "error"

    def close(self) -> None:
        self.done.set()
        self.gate.set()
        self.reading.set()
        self.sock.close()


def daemon_queues(port: int, peers: list[Peer]) -> dict[int, tuple[int, int]]:
    """(unsent output, unread input) of the daemon's side of each peer's
    connection, from the kernel's table."""
    ours = {p.port for p in peers}
    out = {}
    with open(PROC_NET_TCP) as fh:
        for line in fh.read().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
            if local == port and remote in ours:
                tx, rx = fields[4].split(":")
                out[remote] = (int(tx, 16), int(rx, 16))
    return out


def nothing_unread(daemon: Daemon, peers: list[Peer]) -> bool:
    if not all(p.all_delivered() for p in peers):
        return False
    queues = daemon_queues(daemon.tcp_port, peers)
    # (a read of the table may miss rows that move while it is read)
    return len(queues) == len(peers) and all(rx == 0 for _, rx in queues.values())


def consumers_in_every_state(daemon: Daemon) -> dict[str, Peer]:
    """Connections in the states a killed daemon may find them in, all but
    one sending commands without pause."""
    port = daemon.tcp_port
    big = b"b" * 100_000
    for _ in range(40):
        assert http_request("POST", f"http://127.0.0.1:{daemon.http_port}/pub?topic=big", big)[0] == 200
    peers = {
        # subscribed with RDY 0, heartbeating with NOPs
        "rdy 0": Peer(port, identify() + b"SUB flow idle\nRDY 0\n", b"NOP\n"),
        # receiving and FINing what the publisher below publishes
        "consumer": Peer(port, identify() + b"SUB flow busy\nRDY 5\n", b"NOP\n", fin=True),
        # publishing, reading an OK per PUB
        "publisher": Peer(port, identify() + b"PUB flow\n" + struct.pack(">i", 5) + b"first", b"PUB flow\n" + struct.pack(">i", 4) + b"body"),
        # not reading its socket (the daemon's output backs up), silent
        "stalled": Peer(port, identify() + b"SUB big c\nRDY 40\n", read=False),
    }
    wait_for(lambda: peers["consumer"].messages >= 20, message="the consumer receiving")
    wait_for(lambda: daemon_queues(port, [peers["stalled"]]).get(peers["stalled"].port, (0, 0))[0] > 0, message="the stalled consumer's output backing up")
    return peers


@pytest.mark.skipif(not __import__("os").path.exists(PROC_NET_TCP), reason="reads the daemon's socket queues from /proc/net/tcp (Linux)")
def test_sigkill_ends_every_connection_with_eof(kind, tmp_path):
    daemon = start(kind, str(tmp_path))
    peers: dict[str, Peer] = {}
    try:
        peers = consumers_in_every_state(daemon)
        for p in peers.values():
            p.pause()
        # the daemon reads its clients' input promptly in every state (a
        # reader blocked on a full socket or a sync would leave it there and
        # make the kernel reset the connection when the process dies)
        wait_for(lambda: nothing_unread(daemon, list(peers.values())), timeout=10, message="the daemon to read everything its clients sent")
        daemon.kill()
        # (sending again now would race the FIN still queued behind output:
        # any daemon's orphaned socket answers that with RST)
        peers["stalled"].reading.set()
        endings = {name: p.wait_ended() for name, p in peers.items()}
        assert endings == {name: "EOF" for name in peers}
        assert peers["stalled"].messages > 0  # what the kernel held was delivered, then the FIN
    finally:
        for p in peers.values():
            p.close()
        daemon.kill()


def test_sigterm_ends_every_connection_with_eof(kind, tmp_path):
    daemon = start(kind, str(tmp_path))
    peers: dict[str, Peer] = {}
    peers_and_flood: list[Peer] = []
    try:
        peers = consumers_in_every_state(daemon)
        peers_and_flood = list(peers.values())
        flood = Peer(daemon.tcp_port, identify() + b"SUB flow flood\nRDY 0\n", b"NOP\n", flood=True)
        peers_and_flood.append(flood)
        wait_for(lambda: daemon_queues(daemon.tcp_port, [flood]).get(flood.port, (0, 0))[1] > 0, message="input waiting in the daemon")
        if kind == "go-nsqd":
            # Go nsqd resets a connection whose input arrives while it
            # shuts down: its clients must be quiet for an orderly end
            for p in peers.values():
                p.pause()
            wait_for(lambda: nothing_unread(daemon, list(peers.values())), message="quiet clients")
        # pynsqd's clients go on sending while it shuts down, one flooding
        assert daemon.stop(signal.SIGTERM) == 0
        peers["stalled"].reading.set()
        endings = {name: p.wait_ended() for name, p in peers.items()}
        assert endings == {name: "EOF" for name in peers}
        assert peers["stalled"].messages > 0
        # where input is still waiting at the close, Go nsqd resets the
        # connection; pynsqd half-closes first and drains: still an EOF
        if kind == "pynsqd":
            assert flood.wait_ended() == "EOF"
    finally:
        for p in peers_and_flood:
            p.close()
        daemon.kill()


def test_connections_the_daemon_ends_end_with_eof(kind, tmp_path):
    daemon = start(kind, str(tmp_path))
    port = daemon.tcp_port
    try:
        for path in ("/topic/create?topic=ends", "/channel/create?topic=ends&channel=doomed"):
            assert http_request("POST", f"http://127.0.0.1:{daemon.http_port}{path}")[0] == 200
        peers = {
            # a fatal error
            "fatal error": Peer(port, b"BOGUS\n"),
            # heartbeats not answered: closed after two intervals
            "heartbeat timeout": Peer(port, identify(heartbeat_interval=1000) + b"SUB ends hb\nRDY 1\n", silent=True),
            # its channel deleted under it
            "channel deleted": Peer(port, identify() + b"SUB ends doomed\nRDY 1\n"),
        }
        # the same with clients that go on sending: input waits in the
        # socket when the daemon closes it.  Go nsqd resets these (or not:
        # a race); pynsqd half-closes, drains, then closes: always an EOF
        floods = {
            "fatal error": Peer(port, b"BOGUS\n", b"NOP\n", flood=True),
            "channel deleted": Peer(port, identify() + b"SUB ends doomed\nRDY 1\n", b"NOP\n", flood=True),
        }
        wait_for(lambda: any(c["channel_name"] == "doomed" and len(c["clients"]) == 2 for t in daemon.stats("ends")["topics"] for c in t["channels"]), message="the consumers of the doomed channel")
        assert http_request("POST", f"http://127.0.0.1:{daemon.http_port}/channel/delete?topic=ends&channel=doomed")[0] == 200
        endings = {name: p.wait_ended() for name, p in peers.items()}
        assert endings == {name: "EOF" for name in peers}
        assert [e.split()[0] for e in peers["fatal error"].errors] == [b"E_INVALID"]
        flood_endings = {name: p.wait_ended() for name, p in floods.items()}
        if kind == "pynsqd":
            assert flood_endings == {name: "EOF" for name in floods}
            assert [e.split()[0] for e in floods["fatal error"].errors] == [b"E_INVALID"]
        for p in [*peers.values(), *floods.values()]:
            p.close()
    finally:
        daemon.stop()
