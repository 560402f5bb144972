"""Word count, stage 1: split sentences into words.

Consumes ``sentences`` on the ``splitter`` channel and publishes each
sentence's words, one message per word, to ``words`` (one MPUB).  The
sentence is finished only after nsqd accepted its words, so a crash
between the two makes nsqd redeliver the sentence: at least once, never lost.

Run (with a pynsqd on 127.0.0.1:4150, and counter.py on ``words``):

    python examples/word_count/splitter.py
    python examples/word_count/splitter.py      # scale out: same channel,
                                                # the sentences are shared
    pyto_nsq --topic=sentences --nsqd-tcp-address=127.0.0.1:4150 < book.txt

Each line published is a "sentence".  On exit (Ctrl-C / SIGTERM) a splitter
prints how much it did: ``{"sentences": 120, "words": 1543}``.  With
``--lookupd-http-address`` it consumes from every nsqd that has the topic;
it publishes to ``--nsqd-tcp-address`` (usually the nsqd on the same host).
"""

from __future__ import annotations

import argparse
import json
import re
import signal

import trio

from pynsqd.client import Message, Reader, Writer
from pynsqd import log

WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def split_words(sentence: str) -> list[str]:
    """Lowercase words; apostrophes inside a word stay (``don't``)."""
    return WORD.findall(sentence.lower())


async def main(args: argparse.Namespace) -> None:
    done = {"sentences": 0, "words": 0}
    nsqds = args.nsqd_tcp_address or ["127.0.0.1:4150"]
    # consume from the nsqds lookupd knows, or else from the ones given
    if args.lookupd_http_address:
        sources = {"lookupd_http_addresses": args.lookupd_http_address}
    else:
        sources = {"nsqd_tcp_addresses": nsqds}

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Writer(nsqds) as writer:

            async def split(message: Message) -> None:
                words = split_words(message.body.decode("utf-8", errors="replace"))
                if words:
                    await writer.mpub(args.output_topic, [w.encode() for w in words])
                done["sentences"] += 1
                done["words"] += len(words)

            async with Reader(args.topic, args.channel, split, **sources, max_in_flight=args.max_in_flight):
                async for _ in signals:
                    break
            # the Reader has stopped (its handlers are done) before the Writer closes
    print(json.dumps(done), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsqd-tcp-address", action="append", help="nsqd to publish words to, and without --lookupd-http-address to consume from; repeatable (default 127.0.0.1:4150)")
    p.add_argument("--lookupd-http-address", action="append", help="nsqlookupd to discover the nsqds with sentences, repeatable")
    p.add_argument("--topic", default="sentences")
    p.add_argument("--channel", default="splitter", help="splitters on the same channel share the sentences")
    p.add_argument("--output-topic", default="words")
    p.add_argument("--max-in-flight", type=int, default=20)
    p.add_argument("--log-level", default="warn", choices=("debug", "info", "warn", "error"))
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    log.configure(app="splitter", level=arguments.log_level)
    trio.run(main, arguments)
