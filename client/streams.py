"""Compressed stream layers nsqd negotiates in IDENTIFY (``deflate``,
``snappy``), as trio streams wrapping the connection's stream.

Both directions use the same class, so a test (or a server) can wrap the
other end too.  deflate is raw DEFLATE (no zlib header) with a sync flush
after every write, as Go's ``compress/flate`` writer flushed by nsqd; snappy
is the framing format (``sNaPpY`` stream identifier, chunks with a masked
CRC-32C), which nsqd reads without checking the CRC.
"""

from __future__ import annotations

import zlib

import cramjam
import trio

_SNAPPY_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"
_CHUNK_COMPRESSED = 0x00
_CHUNK_UNCOMPRESSED = 0x01
_CHUNK_PADDING = 0xFE
_CHUNK_IDENTIFIER = 0xFF


class _Layer(trio.abc.Stream):
    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._ready = b""  # decoded bytes not yet handed out

    def _decode(self, raw: bytes) -> bytes:
        raise NotImplementedError

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._ready:
            raw = await self.inner.receive_some()
            if not raw:
                return b""
            self._ready = self._decode(raw)
        if max_bytes is None or max_bytes >= len(self._ready):
            data, self._ready = self._ready, b""
        else:
            data, self._ready = self._ready[:max_bytes], self._ready[max_bytes:]
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class DeflateStream(_Layer):
    def __init__(self, inner: trio.abc.Stream, level: int = 6) -> None:
        super().__init__(inner)
        self._compress = zlib.compressobj(level, zlib.DEFLATED, -15)
        self._decompress = zlib.decompressobj(-15)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = self._compress.compress(bytes(data)) + self._compress.flush(zlib.Z_SYNC_FLUSH)
        await self.inner.send_all(out)

    def _decode(self, raw: bytes) -> bytes:
        try:
            return self._decompress.decompress(raw)
        except zlib.error as exc:
            raise trio.BrokenResourceError(f"bad deflate data: {exc}") from exc


class SnappyStream(_Layer):
    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self._sent_identifier = False
        self._buf = b""  # an incomplete chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        framed = bytes(cramjam.snappy.compress(bytes(data)))
        # cramjam frames each call as a whole stream; one identifier suffices
        if self._sent_identifier and framed.startswith(_SNAPPY_IDENTIFIER):
            framed = framed[len(_SNAPPY_IDENTIFIER) :]
        self._sent_identifier = True
        await self.inner.send_all(framed)

    def _decode(self, raw: bytes) -> bytes:
        buf = self._buf + raw
        out = []
        pos = 0
        while len(buf) - pos >= 4:
            kind = buf[pos]
            length = int.from_bytes(buf[pos + 1 : pos + 4], "little")
            if len(buf) - pos - 4 < length:
                break
            body = buf[pos + 4 : pos + 4 + length]
            pos += 4 + length
            if kind == _CHUNK_COMPRESSED:
                out.append(bytes(cramjam.snappy.decompress_raw(body[4:])))
            elif kind == _CHUNK_UNCOMPRESSED:
                out.append(body[4:])
            elif kind == _CHUNK_IDENTIFIER:
                if body != b"sNaPpY":
                    raise trio.BrokenResourceError("bad snappy stream identifier")
            elif 0x02 <= kind <= 0x7F:
                raise trio.BrokenResourceError(f"unskippable snappy chunk type {kind:#x}")
            # padding and skippable chunks carry nothing
        self._buf = buf[pos:]
        return b"".join(out)
