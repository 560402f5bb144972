"""Micro-benchmark of the daemon's hot paths without sockets: the sans-IO
core driven directly (MPUB parsing + fan-out, delivery + FIN, one PUB
command at a time, and both publishes into the disk queue), in ns per
message of CPU time.  Deterministic enough to compare one change to the next
on a noisy machine, where the socket benchmarks (nsq_bench.py) swing by 20 %.

    python bench/hotpath.py [--messages N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import trio

from pynsqd.client_v2 import STATE_SUBSCRIBED
from pynsqd.nsqd import NSQD
from pynsqd.options import Options
from pynsqd.protocol import MSG_HEADER_LENGTH, encode_command, encode_mpub_body
from pynsqd.protocol_v2 import ProtocolV2


def _frames_ids(data: bytes) -> list[bytes]:
    """Message ids in a buffer of message frames (4 size + 4 type + 8 ts + 2 attempts + id)."""
    ids = []
    pos = 0
    n = len(data)
    while pos < n:
        size = int.from_bytes(data[pos : pos + 4], "big")
        if int.from_bytes(data[pos + 4 : pos + 8], "big") == 2:
            ids.append(data[pos + 18 : pos + 34])
        pos += 4 + size
    return ids


async def run(messages: int, size: int, rdy: int, retention_time: float = 0.0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        nsqd = NSQD(Options(data_path=tmp, mem_queue_size=messages + 1, lookupd_tcp_addresses=[], retention_time=retention_time))
        body = b"x" * size
        # --- publish: MPUB x200 into a topic with one channel
        topic = nsqd.get_topic("bench")
        channel = topic.get_channel("ch")
        pub_client = nsqd.new_client("127.0.0.1:1")
        pub = ProtocolV2(nsqd, pub_client)
        batch = encode_command(b"MPUB", "bench", body=encode_mpub_body([body] * 200))
        chunk = batch * 10
        t0 = time.process_time()
        sent = 0
        while sent < messages:
            pub.receive_data(chunk)
            while pub.process() is not None:
                pass
            pub_client.take_output()
            sent += 2000
        t_pub = time.process_time() - t0
        assert channel.depth() == sent
        # --- consume: deliver with RDY, FIN everything in batches
        cons_client = nsqd.new_client("127.0.0.1:2")
        cons = ProtocolV2(nsqd, cons_client)
        cons_client.state = STATE_SUBSCRIBED
        cons_client.heartbeat_interval = 30.0
        channel.add_client(cons_client)
        cons_client.ready_count = rdy
        clock = time.process_time
        t0 = clock()
        channel.client_ready_changed(cons_client)
        t_daemon = clock() - t0
        done = 0
        while done < sent:
            t1 = clock()
            out = cons_client.take_output()
            t_daemon += clock() - t1
            ids = _frames_ids(out)
            if not ids:
                break
            fins = b"".join(b"FIN " + i + b"\n" for i in ids)
            t1 = clock()
            cons.receive_data(fins)
            while cons.process() is not None:
                pass
            t_daemon += clock() - t1
            done += len(ids)
        t_con = clock() - t0
        assert done == sent, (done, sent)
        # --- PUB one command at a time (a round trip's share of the core), no channel
        pubs = messages // 10
        t_single = _time_commands(nsqd, encode_command(b"PUB", "single", body=body), pubs)
        # --- the same two publishes past --mem-queue-size: into the disk queue
        # (syncs are the daemon's rounds, outside the core: not timed here)
        disk_path = os.path.join(tmp, "disk")
        os.mkdir(disk_path)
        disk = NSQD(Options(data_path=disk_path, mem_queue_size=0, sync_every=1 << 30, lookupd_tcp_addresses=[], retention_time=retention_time))
        t_disk_mpub = _time_commands(disk, batch, messages // 400)
        t_disk_pub = _time_commands(disk, encode_command(b"PUB", "bench", body=body), pubs)
        for topic in disk.topics.values():
            topic.backend.close()
        return {"publish_ns_per_msg": t_pub / sent * 1e9, "consume_ns_per_msg": t_con / sent * 1e9,
                "consume_daemon_ns_per_msg": t_daemon / sent * 1e9, "pub_ns_per_msg": t_single / pubs * 1e9,
                "disk_mpub_ns_per_msg": t_disk_mpub / (messages // 400 * 200) * 1e9,
                "disk_pub_ns_per_msg": t_disk_pub / pubs * 1e9, "messages": sent}


def _time_commands(nsqd: NSQD, command: bytes, count: int) -> float:
    """CPU seconds for ``count`` commands through a fresh client, one at a time."""
    client = nsqd.new_client("127.0.0.1:9")
    proto = ProtocolV2(nsqd, client)
    t0 = time.process_time()
    for _ in range(count):
        proto.receive_data(command)
        proto.process()
        client.take_output()
    return time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=400_000)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--rdy", type=int, default=2500)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--retention-time", type=float, default=0.0, help="seconds: every topic retains (the cost of retention)")
    a = p.parse_args()
    results = [trio.run(run, a.messages, a.size, a.rdy, a.retention_time) for _ in range(a.repeat)]
    best_pub = min(r["publish_ns_per_msg"] for r in results)
    best_con = min(r["consume_ns_per_msg"] for r in results)
    best_single = min(r["pub_ns_per_msg"] for r in results)
    best_daemon = min(r["consume_daemon_ns_per_msg"] for r in results)
    print(f"publish (MPUB x200 + fan-out): {best_pub:7.0f} ns/msg  = {1e9 / best_pub:9,.0f} msg/s of one core")
    print(f"consume (deliver + FIN):       {best_con:7.0f} ns/msg  = {1e9 / best_con:9,.0f} msg/s of one core")
    print(f"  of which the daemon's part:  {best_daemon:7.0f} ns/msg  (the rest: the stand-in consumer reading ids, writing FINs)")
    print(f"PUB, one command at a time:    {best_single:7.0f} ns/msg  = {1e9 / best_single:9,.0f} msg/s of one core")
    best_disk_mpub = min(r["disk_mpub_ns_per_msg"] for r in results)
    best_disk_pub = min(r["disk_pub_ns_per_msg"] for r in results)
    print(f"MPUB x200 into the disk queue: {best_disk_mpub:7.0f} ns/msg  = {1e9 / best_disk_mpub:9,.0f} msg/s of one core")
    print(f"PUB into the disk queue:       {best_disk_pub:7.0f} ns/msg  = {1e9 / best_disk_pub:9,.0f} msg/s of one core")


if __name__ == "__main__":
    main()
