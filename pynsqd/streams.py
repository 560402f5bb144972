"""The stream layers nsqd negotiates in IDENTIFY, for both ends of a
connection: sans-IO codecs for snappy framing and raw deflate, and the trio
:class:`~trio.abc.Stream` wrappers that put them on a connection.

- deflate is raw DEFLATE (no zlib header); every write ends with a sync
  flush, as Go's ``compress/flate`` writer flushed by nsqd after each batch.
- snappy is the framing format (``sNaPpY`` stream identifier, then chunks
  carrying a masked CRC-32C), which nsqd 1.3.0 reads with golang/snappy, so
  checksums are verified here too.

Decoders are fed raw bytes and read out at most ``max_bytes`` at a time, so a
small hostile input cannot be expanded into unbounded memory (a deflate
bomb, a run of huge chunks): memory per connection stays at about one
receive plus one snappy chunk.
"""

from __future__ import annotations

import zlib

import cramjam
import trio

SNAPPY_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"
_CHUNK_COMPRESSED = 0x00
_CHUNK_UNCOMPRESSED = 0x01
_CHUNK_IDENTIFIER = 0xFF
# golang/snappy's limits: 64 KiB of data per chunk, so at most
# MaxEncodedLen(65536) + 4 checksum bytes of chunk body
SNAPPY_MAX_BLOCK = 65536
SNAPPY_MAX_CHUNK = 76490 + 4
DEFAULT_READ = 256 * 1024


class CorruptStream(ValueError):
    """The peer sent bytes that are not a valid snappy/deflate stream."""


# ================================================================ sans-IO codecs


class DeflateEncoder:
    def __init__(self, level: int = 6) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, -15)

    def encode(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)


class DeflateDecoder:
    def __init__(self) -> None:
        self._z = zlib.decompressobj(-15)
        self._pending = b""  # input not yet run through the decompressor

    def feed(self, data: bytes) -> None:
        self._pending = self._pending + data if self._pending else data

    @property
    def finished(self) -> bool:
        """The peer ended the deflate stream (a final block): nothing follows."""
        return self._z.eof

    def read(self, max_bytes: int = DEFAULT_READ) -> bytes:
        """Up to ``max_bytes`` of decoded data; b"" when more input is needed."""
        if not self._pending or self._z.eof:
            return b""
        try:
            out = self._z.decompress(self._pending, max_bytes)
        except zlib.error as exc:
            raise CorruptStream(f"bad deflate data: {exc}") from None
        self._pending = self._z.unconsumed_tail
        return out


class SnappyEncoder:
    def __init__(self) -> None:
        self._started = False

    def encode(self, data: bytes) -> bytes:
        if not data:
            return b""
        framed = bytes(cramjam.snappy.compress(data))
        # cramjam frames each call as a whole stream; one identifier suffices
        if self._started:
            return framed[len(SNAPPY_IDENTIFIER) :]
        self._started = True
        return framed


class SnappyDecoder:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._started = False
        self._ready = b""  # decoded bytes not yet read

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def finished(self) -> bool:
        return False

    def read(self, max_bytes: int = DEFAULT_READ) -> bytes:
        """Decode whole chunks until ``max_bytes`` are ready (or input runs out)."""
        parts = [self._ready] if self._ready else []
        have = len(self._ready)
        buf = self._buf
        while have < max_bytes and len(buf) - self._pos >= 4:
            pos = self._pos
            kind = buf[pos]
            length = buf[pos + 1] | buf[pos + 2] << 8 | buf[pos + 3] << 16
            if length > SNAPPY_MAX_CHUNK:
                raise CorruptStream(f"snappy chunk of {length} bytes is too long")
            if len(buf) - pos - 4 < length:
                break
            chunk = bytes(buf[pos : pos + 4 + length])
            self._pos = pos + 4 + length
            if kind == _CHUNK_IDENTIFIER:
                if chunk != SNAPPY_IDENTIFIER:
                    raise CorruptStream("bad snappy stream identifier")
                self._started = True
                continue
            if not self._started:
                raise CorruptStream("snappy stream does not start with its identifier")
            if kind == _CHUNK_COMPRESSED or kind == _CHUNK_UNCOMPRESSED:
                if length < 4:
                    raise CorruptStream("snappy chunk shorter than its checksum")
                try:
                    # the framed decoder checks the CRC and the block size
                    data = bytes(cramjam.snappy.decompress(SNAPPY_IDENTIFIER + chunk))
                except cramjam.DecompressionError as exc:
                    raise CorruptStream(f"bad snappy chunk: {exc}") from None
                if len(data) > SNAPPY_MAX_BLOCK:
                    raise CorruptStream("snappy chunk decodes to more than 64 KiB")
                parts.append(data)
                have += len(data)
            elif kind < 0x80:
                raise CorruptStream(f"unskippable snappy chunk type {kind:#04x}")
            # padding (0xfe) and reserved skippable chunks (0x80-0xfd) carry nothing
        out = b"".join(parts)
        if len(out) > max_bytes:
            out, self._ready = out[:max_bytes], out[max_bytes:]
        else:
            self._ready = b""
        return out


Encoder = DeflateEncoder | SnappyEncoder
Decoder = DeflateDecoder | SnappyDecoder


# ================================================================ trio layers


class PrefixedStream(trio.abc.Stream):
    """Hands out ``prefix`` before reading ``inner`` again: bytes a plain
    parser had already received when the stream was upgraded belong to the
    new layer."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class CompressedStream(trio.abc.Stream):
    """A trio stream that compresses what it sends and decompresses what it
    receives.  Like any trio stream it must not be sent on (or received
    from) by two tasks at once."""

    def __init__(self, inner: trio.abc.Stream, encoder: Encoder, decoder: Decoder) -> None:
        self.inner = inner
        self.encoder = encoder
        self.decoder = decoder

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = max_bytes or DEFAULT_READ
        decoder = self.decoder
        while True:
            try:
                data = decoder.read(limit)
            except CorruptStream as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if data:
                return data
            if decoder.finished:
                return b""
            raw = await self.inner.receive_some()
            if not raw:
                return b""
            decoder.feed(raw)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = self.encoder.encode(bytes(data))
        if out:
            await self.inner.send_all(out)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class DeflateStream(CompressedStream):
    def __init__(self, inner: trio.abc.Stream, level: int = 6) -> None:
        super().__init__(inner, DeflateEncoder(level), DeflateDecoder())


class SnappyStream(CompressedStream):
    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner, SnappyEncoder(), SnappyDecoder())
