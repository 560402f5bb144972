"""The client as a library inside an application (issue 12): plain-function
handlers, plain exceptions out of ``async with``, asyncio, the blocking
SyncWriter, tracebacks and stdlib logging, the installed package name,
Writer misuse.  Async tests run on trio and on asyncio, against real
pynsqd subprocesses."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from pynsqd.client import Message, NSQError, PublishError, Reader, Writer
from helpers import RawClient, eventually, on_both_backends, start_nsqd, wait_for

REPO = Path(__file__).resolve().parent.parent


def publish(daemon, topic: str, bodies: list[bytes]) -> None:  # noqa: ANN001
    status, body = daemon.http("POST", f"/mpub?topic={topic}&binary=false", b"\n".join(bodies))
    assert status == 200, body


def channel_stats(daemon, topic: str, channel: str) -> dict:  # noqa: ANN001
    (t,) = [t for t in daemon.stats(topic)["topics"] if t["topic_name"] == topic]
    (c,) = [c for c in t["channels"] if c["channel_name"] == channel]
    return c


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address that refuses connections (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


# ---------------------------------------------------------------- 1. sync handlers


@on_both_backends
async def test_a_plain_function_handler_runs_in_worker_threads_with_fin_and_req(nsqd, unique):
    bodies = [f"m{i}".encode() for i in range(12)]
    publish(nsqd, unique, bodies)
    lock = threading.Lock()
    running = {"now": 0, "max": 0}
    handled: list[bytes] = []
    threads: set[int] = set()
    loop_thread = threading.get_ident()

    def handler(message: Message) -> bool | None:
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
            threads.add(threading.get_ident())
        time.sleep(0.01)  # blocking work: fine in a worker thread
        with lock:
            running["now"] -= 1
        if message.attempts == 1 and message.body == b"m3":
            return False  # requeue, as in pynsq
        if message.attempts == 1 and message.body == b"m5":
            raise RuntimeError("transient")
        if message.body == b"m7":
            message.touch()  # from the worker thread
        handled.append(message.body)
        return None

    async with Reader(
        unique, "sync", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=8, concurrency=3,
        default_requeue_delay=0, max_backoff_duration=0,
    ) as reader:
        await eventually(lambda: reader.stats().messages_finished == 12, message="12 finished")
    assert sorted(handled) == sorted(bodies)  # each side effect once
    assert reader.stats().messages_requeued == 2
    assert running["max"] <= 3 and loop_thread not in threads
    c = channel_stats(nsqd, unique, "sync")
    assert (c["requeue_count"], c["timeout_count"], c["depth"], c["in_flight_count"]) == (2, 0, 0, 0)


@on_both_backends
async def test_messages_answered_later_from_a_thread_of_the_application(nsqd, unique):
    publish(nsqd, unique, [b"a", b"b", b"c"])
    later: list[threading.Thread] = []

    def answer(message: Message) -> None:
        message.touch()
        if message.body == b"b" and message.attempts == 1:
            message.requeue(0, backoff=False)
        else:
            message.finish()

    async def handler(message: Message) -> None:
        message.disable_auto_response()
        thread = threading.Thread(target=answer, args=(message,))  # not a worker thread of the Reader's
        later.append(thread)
        thread.start()

    async with Reader(unique, "later", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=3) as reader:
        await eventually(lambda: reader.stats().messages_finished == 3, message="3 finished from threads")
    assert reader.stats().messages_requeued == 1
    for thread in later:
        thread.join(5)


# ---------------------------------------------------------------- 2. exceptions out of async with


@on_both_backends
async def test_exceptions_come_out_of_async_with_as_themselves(nsqd, unique):
    with pytest.raises(NSQError) as info:
        async with Writer([nsqd.tcp_address]) as writer:
            await writer.pub("bad topic!", b"x")
    assert info.value.code == "E_BAD_TOPIC"
    with pytest.raises(NSQError) as info:
        async with Writer([nsqd.tcp_address]) as writer:
            await writer.pub(unique, b"x" * (2 * 1024 * 1024))
    assert info.value.code == "E_BAD_MESSAGE"
    with pytest.raises(ValueError, match="the caller's own"):
        async with Writer([nsqd.tcp_address]) as writer:
            await writer.pub(unique, b"fine")
            raise ValueError("the caller's own")

    async def handler(message: Message) -> None:
        pass

    with pytest.raises(KeyError):
        async with Reader(unique, "body", handler, nsqd_tcp_addresses=[nsqd.tcp_address]) as reader:
            await reader.wait_connected()
            raise KeyError("from the block")
    # a cancellation from outside stays a cancellation: the caller's scope catches it
    with anyio.move_on_after(0.3) as scope:
        async with Writer([nsqd.tcp_address]) as writer, Reader(unique, "cancel", handler, nsqd_tcp_addresses=[nsqd.tcp_address]):
            await anyio.sleep_forever()
    assert scope.cancelled_caught


@on_both_backends
async def test_a_failure_of_the_clients_own_tasks_is_one_background_task_error(nsqd, monkeypatch):
    from pynsqd.client import BackgroundTaskError

    async def broken(self: Writer, address: str) -> None:
        raise ZeroDivisionError("a bug in the client")

    monkeypatch.setattr(Writer, "_supervise", broken)
    with pytest.raises(BackgroundTaskError) as info:
        async with Writer([nsqd.tcp_address]):
            await anyio.sleep_forever()
    assert isinstance(info.value.__cause__, ZeroDivisionError)



@on_both_backends
async def test_a_failure_of_the_clients_own_tasks_during_a_publish_is_a_background_task_error(nsqd, unique):
    """The body was waiting in pub() when the Writer's own task failed: what
    comes out is the failure, not the "Writer is stopped" it caused."""
    from pynsqd.client import BackgroundTaskError

    async def broken_dialer(host: str, port: int) -> anyio.abc.ByteStream:
        raise ZeroDivisionError("a bug in the dialer")

    with anyio.fail_after(10), pytest.raises(BackgroundTaskError) as info:
        async with Writer([nsqd.tcp_address], open_stream=broken_dialer) as writer:
            await writer.pub(unique, b"x")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# ---------------------------------------------------------------- 3. asyncio, as an asyncio app uses it


def test_asyncio_run_with_a_writer_and_a_reader(nsqd, unique):
    async def main() -> list[bytes]:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def handler(message: Message) -> None:
            await got.put(message.body)

        async with Writer([nsqd.tcp_address]) as writer:
            await asyncio.gather(*(writer.pub(unique, f"a{i}".encode()) for i in range(20)))
        async with Reader(unique, "aio", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=5):
            return [await asyncio.wait_for(got.get(), 20) for _ in range(20)]

    assert sorted(asyncio.run(main())) == sorted(f"a{i}".encode() for i in range(20))


# ---------------------------------------------------------------- 4. SyncWriter


def read_bodies(daemon, topic: str, count: int) -> set[bytes]:  # noqa: ANN001
    """Every body on ``topic`` (``count`` deliveries, duplicates included)."""
    c = RawClient(daemon.tcp_port)
    c.identify(feature_negotiation=True)
    assert c.sub(topic, "check").data == b"OK"
    c.cmd(b"RDY", str(count))
    got = set()
    for _ in range(count):
        _, _, msg_id, body = c.read_message(timeout=20)
        c.cmd(b"FIN", msg_id)
        got.add(body)
    c.close()
    return got


def test_sync_writer_from_several_threads_through_an_nsqd_restart(tmp_path):
    from pynsqd.client import SyncWriter

    # mem-queue-size 0: what nsqd acknowledged is on disk and survives the restart
    d = start_nsqd(str(tmp_path), "--mem-queue-size=0")
    tcp, http = d.tcp_address, d.http_address
    topic, total, threads = "restart", 400, 4
    published: list[bytes] = []
    errors: list[BaseException] = []
    writer = SyncWriter([tcp], reconnect_interval=0.05, max_reconnect_interval=0.5, publish_timeout=30)

    second_half = threading.Event()

    def publisher(k: int) -> None:
        mine = range(k, total, threads)
        for n, i in enumerate(mine):
            if n == len(mine) // 2:
                second_half.wait(30)
            try:
                writer.pub(topic, f"s{i}".encode())
                published.append(f"s{i}".encode())
            except Exception as exc:  # noqa: BLE001 - counted, must stay empty
                errors.append(exc)

    workers = [threading.Thread(target=publisher, args=(k,)) for k in range(threads)]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: len(published) == total // 2, message="the first half published")
        assert len(d.stats()["producers"]) == 1  # one connection for every thread
        d.stop()
        second_half.set()  # published while nsqd is down: each waits and retries
        wait_for(lambda: not writer.connected, message="the writer noticed")
        d = start_nsqd(str(tmp_path), "--mem-queue-size=0", f"--tcp-address={tcp}", f"--http-address={http}")
        for w in workers:
            w.join(60)
        assert errors == [] and len(published) == total
        assert len(d.stats()["producers"]) == 1  # reconnected once, shared again
        (t,) = [t for t in d.stats(topic)["topics"] if t["topic_name"] == topic]
        assert t["depth"] >= total  # a publish whose answer was lost may be there twice
        assert read_bodies(d, topic, t["depth"]) == set(published)
    finally:
        writer.close()
        d.stop()


def test_sync_writer_fails_over_and_raises_nsq_errors(tmp_path, refused_address):
    from pynsqd.client import NotRunningError, SyncWriter

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a, b = start_nsqd(str(a_dir)), start_nsqd(str(b_dir))
    topic = "sync"
    try:
        with SyncWriter([a.tcp_address, b.tcp_address], reconnect_interval=0.05) as writer:
            for i in range(10):
                writer.pub(topic, f"p{i}".encode())
            assert sorted(writer.connected) == sorted([a.tcp_address, b.tcp_address])  # round robin
            a.kill()
            for i in range(10):
                writer.pub(topic, f"q{i}".encode())
            writer.mpub(topic, [b"m1", b"m2"])
            writer.dpub(topic, 0.05, b"later")
            with pytest.raises(NSQError) as info:
                writer.pub(topic, b"x" * (2 * 1024 * 1024))
            assert info.value.code == "E_BAD_MESSAGE"
            with pytest.raises(NSQError) as info:
                writer.pub("bad topic!", b"x")
            assert info.value.code == "E_BAD_TOPIC"
            writer.pub(topic, b"after the error")  # redials b, which closed on E_BAD_MESSAGE
        (t,) = [t for t in b.stats(topic)["topics"] if t["topic_name"] == topic]
        assert t["message_count"] == 5 + 10 + 2 + 1 + 1
        with pytest.raises(NotRunningError):
            writer.pub(topic, b"closed")
        with SyncWriter([refused_address], publish_timeout=0.5) as writer:
            with pytest.raises(PublishError, match=f"cannot connect to {refused_address}.*[Rr]efused") as perr:
                writer.pub(topic, b"x")
        assert isinstance(perr.value.__cause__, OSError)
    finally:
        a.stop()
        b.stop()


def local_port(writer) -> int:  # noqa: ANN001
    (conn,) = [t.conn for t in writer._targets if t.conn is not None]
    return int(conn.sock.getsockname()[1])


def test_sync_writer_in_a_forked_child_dials_its_own_connection(nsqd, unique):
    from pynsqd.client import SyncWriter

    with SyncWriter([nsqd.tcp_address]) as writer:
        writer.pub(unique, b"parent")
        parents = local_port(writer)
        pid = os.fork()  # a pre-forking server (gunicorn --preload) after the app published
        if pid == 0:
            try:
                writer.pub(unique, b"child")
                os._exit(0 if local_port(writer) != parents else 2)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        writer.pub(unique, b"parent again")
        assert local_port(writer) == parents
    (t,) = [t for t in nsqd.stats(unique)["topics"] if t["topic_name"] == unique]
    assert t["message_count"] == 3


# ---------------------------------------------------------------- 5. tracebacks


def lookup_user(users: dict[str, str]) -> str:
    return users["missing"]


@on_both_backends
async def test_a_failing_handler_is_logged_with_its_traceback(nsqd, unique, caplog):
    publish(nsqd, unique, [b"x"])

    async def handler(message: Message) -> None:
        if message.attempts == 1:
            lookup_user({})

    with caplog.at_level(logging.ERROR, logger="pynsqd.client"):
        async with Reader(unique, "tb", handler, nsqd_tcp_addresses=[nsqd.tcp_address], default_requeue_delay=0, max_backoff_duration=0) as reader:
            await eventually(lambda: reader.stats().messages_finished == 1, message="finished on the second attempt")
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.name == "pynsqd.client.reader" and record.exc_info[0] is KeyError
    assert "Traceback" in caplog.text and __file__ in caplog.text and 'return users["missing"]' in caplog.text


# ---------------------------------------------------------------- 6. logging in a host application

HOST_APP = textwrap.dedent(
    """
    import logging, sys
    import anyio
    from pynsqd.client import Writer

    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.INFO, format="APP %(name)s %(levelname)s %(message)s")

    async def main():
        async with Writer([sys.argv[2]]) as writer:
            await writer.pub("hostapp", b"x")
        async with Writer([sys.argv[3]], publish_timeout=0.3) as writer:
            try:
                await writer.pub("hostapp", b"x")
            except Exception:
                pass

    anyio.run(main, backend="asyncio")
    print("done")
    """
)


def test_the_client_logs_through_the_applications_logging(nsqd, refused_address):
    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", HOST_APP, mode, nsqd.tcp_address, refused_address], capture_output=True, text=True, timeout=60)

    quiet = run("unconfigured")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "done\n", "")
    loud = run("configured")
    assert loud.returncode == 0 and loud.stdout == "done\n"
    assert f"APP pynsqd.client.writer INFO [writer nsqd {nsqd.tcp_address}] connected" in loud.stderr
    assert f"APP pynsqd.client.writer WARNING [writer nsqd {refused_address}] cannot connect" in loud.stderr


# ---------------------------------------------------------------- 7. package name, py.typed, types


def test_installed_as_pynsqd_client_next_to_an_apps_own_client_module(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("NAME = 'the app'\n")
    script = "import client; from pynsqd.client import SyncWriter, Writer; print(client.NAME, Writer.__module__)"
    out = subprocess.run([sys.executable, "-c", script], cwd=app, capture_output=True, text=True, timeout=60)
    assert out.stdout == "the app pynsqd.client.writer\n", out.stderr
    # nothing named "client" is importable from an empty directory
    found = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('client'))"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert found.stdout == "None\n", found.stderr
    import importlib.resources

    assert importlib.resources.files("pynsqd.client").joinpath("py.typed").is_file()


USER_CODE = textwrap.dedent(
    """
    import anyio
    from pynsqd.client import Message, NSQError, PublishError, Reader, SyncWriter, Writer

    async def handler(message: Message) -> None:
        message.touch()

    def sync_handler(message: Message) -> bool:
        return len(message.body) > 0

    async def main() -> None:
        async with Writer(["127.0.0.1:4150"], publish_timeout=1.0) as writer:
            await writer.pub("t", b"x")
            await writer.mpub("t", [b"a", b"b"])
        async with Reader("t", "c", handler, nsqd_tcp_addresses=["127.0.0.1:4150"], max_in_flight=5):
            await anyio.sleep(1)
        Reader("t", "c", sync_handler, lookupd_http_addresses=["127.0.0.1:4161"])

    def publish() -> None:
        with SyncWriter(["127.0.0.1:4150"]) as writer:
            try:
                writer.dpub("t", 1.5, b"later")
            except (NSQError, PublishError) as exc:
                print(exc)
    """
)


def test_the_public_api_type_checks_under_mypy_strict(tmp_path):
    pytest.importorskip("mypy")
    # the installed layout (mypy does not run the editable install's import hook)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "pynsqd", tmp_path / "pynsqd", ignore=ignore)
    shutil.copytree(REPO / "client", tmp_path / "pynsqd" / "client", ignore=ignore)
    (tmp_path / "user.py").write_text(USER_CODE)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir=cache"]
    for target in (["-p", "pynsqd.client"], ["user.py"]):
        out = subprocess.run([*mypy, *target], capture_output=True, text=True, timeout=280, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- 8. Writer misuse and errors


@on_both_backends
async def test_a_writer_that_was_not_started_says_so_at_once(nsqd, unique, refused_address):
    from pynsqd.client import NotRunningError

    writer = Writer([nsqd.tcp_address])
    with anyio.fail_after(2):
        with pytest.raises(NotRunningError, match="async with"):
            await writer.pub(unique, b"x")
    async with Writer([refused_address], publish_timeout=0.5) as writer:
        with pytest.raises(PublishError, match=f"cannot connect to {refused_address}.*[Rr]efused") as info:
            await writer.pub(unique, b"x")
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("address", ["foo", "", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:-1"])
def test_a_bad_nsqd_address_is_refused_when_built_not_as_an_internal_error(address):
    from pynsqd.client import SyncWriter

    def handler(message: Message) -> None:
        pass

    with pytest.raises(ValueError, match="bad address"):
        Writer([address])
    with pytest.raises(ValueError, match="bad address"):
        Reader("t", "c", handler, nsqd_tcp_addresses=[address])
    with pytest.raises(ValueError, match="bad address"):
        SyncWriter([address])


def test_an_unknown_host_is_described_in_words_not_as_an_unknown_errno():
    from pynsqd.client.errors import describe

    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe(error) == f"[Errno {socket.EAI_NONAME}] Name or service not known"
    wrapped = OSError("All connection attempts failed")
    wrapped.__cause__ = error
    assert describe(wrapped) == f"[Errno {socket.EAI_NONAME}] Name or service not known"
    assert describe(ConnectionRefusedError(111, "Error connecting to ('127.0.0.1', 1): Connection refused")) == "[Errno 111] Connection refused"


def test_closing_a_sync_writer_logs_no_warning(nsqd, unique, caplog):
    from pynsqd.client import SyncWriter

    with caplog.at_level(logging.INFO, logger="pynsqd.client"):
        with SyncWriter([nsqd.tcp_address]) as writer:
            writer.pub(unique, b"x")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@on_both_backends
async def test_waiting_on_a_reader_that_has_stopped_says_so_at_once(nsqd, unique):
    from pynsqd.client import NotRunningError

    async def handler(message: Message) -> None:
        pass

    async with Reader(unique, "gone", handler, nsqd_tcp_addresses=[nsqd.tcp_address]) as reader:
        await reader.wait_connected()
    with anyio.fail_after(5), pytest.raises(NotRunningError, match="stopped"):
        await reader.wait_connected()


@on_both_backends
async def test_waiting_for_a_writers_connection_ends_when_the_writer_stops(refused_address):
    from pynsqd.client import NotRunningError

    async with anyio.create_task_group() as tg:
        writer = Writer([refused_address])
        await tg.start(writer.run)
        outcome: list[BaseException] = []

        async def wait() -> None:
            try:
                await writer.wait_connected()
            except NotRunningError as exc:
                outcome.append(exc)

        tg.start_soon(wait)
        with anyio.fail_after(10):  # (a wait() spinning instead of parking never lets this return)
            await anyio.wait_all_tasks_blocked()  # wait() parked in wait_connected() before the stop
        await writer.stop()
        with anyio.fail_after(5):
            while not outcome:
                await anyio.sleep(0.02)
    assert "stopped" in str(outcome[0])


@on_both_backends
async def test_a_publish_that_nsqd_never_answers_says_so(nsqd, unique):
    import signal

    async with Writer([nsqd.tcp_address], publish_timeout=1) as writer:
        await writer.pub(unique, b"x")
        os.kill(nsqd.proc.pid, signal.SIGSTOP)  # connected, then silent
        try:
            with pytest.raises(PublishError, match=f"no answer from nsqd {nsqd.tcp_address}"):
                await writer.pub(unique, b"y")
        finally:
            os.kill(nsqd.proc.pid, signal.SIGCONT)
