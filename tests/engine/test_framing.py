"""The session's own frame splitting (``session._Connection._receive``).

Binary frames skip websockets' parser; everything else must still reach websockets
whole and in order, however TCP cuts the stream. A hand-written server on 127.0.0.1
does the opening handshake; after it, the test feeds the client's read callback the
byte stream cut at every position, byte by byte, and at seeded random cuts, and checks
what the worker gets, what websockets gets and what websockets answers (pongs, close
codes) against the same stream delivered whole.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import connect
from websockets.protocol import State

from connect_worker.engine.session import MAX_FRAME_BYTES, SUBPROTOCOL, _Connection

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False) -> bytes:
    """A server frame (unmasked unless asked)."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if masked:
        key = b"\x01\x02\x03\x04"
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def binary(payload: bytes) -> bytes:
    return frame(0x2, payload)


class RawServer:
    """Answers one WebSocket handshake, then records what the client sends."""

    def __init__(self, after_response: bytes = b"") -> None:
        self.after_response = after_response
        self.received = bytearray()
        self.got_data = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                     b"\r\nSec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n\r\n"
                     + self.after_response)
        await writer.drain()
        try:
            while data := await reader.read(65536):
                self.received += data
                self.got_data.set()
                if any(op == 0x8 for op, _ in self.client_frames()):
                    writer.write(frame(0x8, struct.pack("!H", 1000)))  # the closing handshake
                    await writer.drain()
                    return
        finally:
            writer.close()

    def client_frames(self) -> list[tuple[int, bytes]]:
        """(opcode, unmasked payload) of each whole frame the client sent."""
        out, data, pos = [], bytes(self.received), 0
        while len(data) - pos >= 6:
            opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
            pos += 2
            if n == 126:
                n, pos = struct.unpack("!H", data[pos:pos + 2])[0], pos + 2
            elif n == 127:
                n, pos = struct.unpack("!Q", data[pos:pos + 8])[0], pos + 8
            key, pos = data[pos:pos + 4], pos + 4
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(data[pos:pos + n]))
            out.append((opcode, payload))
            pos += n
        return out


@asynccontextmanager
async def client(after_response: bytes = b"") -> AsyncIterator[tuple[_Connection, RawServer]]:
    server = RawServer(after_response)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with connect(f"ws://127.0.0.1:{port}", subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                           max_size=MAX_FRAME_BYTES, ping_interval=None, compression=None,
                           close_timeout=1, create_connection=_Connection) as ws:
            assert isinstance(ws, _Connection)
            yield ws, server
    finally:
        listener.close()


# One stream with every kind of frame: binary of each length encoding, a ping, a text
# frame, a fragmented binary message with a ping between its fragments.
SMALL, MEDIUM, LARGE = b"s" * 5, bytes(range(256)) + b"m" * 44, b"L" * 70_000
STREAM_PARTS = [
    binary(SMALL), frame(0x9, b"p1"), binary(MEDIUM), frame(0x1, b"hello"),
    frame(0x2, b"ab", fin=False), frame(0x9, b"p2"), frame(0x0, b"cd"),
    binary(LARGE), binary(b""), binary(b"last"),
]
STREAM = b"".join(STREAM_PARTS)
WORKER_GETS = [SMALL, MEDIUM, LARGE, b"", b"last"]


def cuts_every_position(data: bytes, limit: int) -> Iterator[list[bytes]]:
    for at in range(1, limit):
        yield [data[:at], data[at:]]


async def feed(chunks: list[bytes]) -> tuple[list[bytes], list[str | bytes], list[bytes]]:
    """The worker's frames, websockets' messages and the pongs sent for ``chunks``."""
    async with client() as (ws, server):
        frames: list[bytes] = []
        ws.on_frame = frames.append
        for chunk in chunks:
            ws.data_received(chunk)
        messages = [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)]
        await asyncio.wait_for(server.got_data.wait(), 5)
        while len(server.client_frames()) < 2:
            server.got_data.clear()
            await asyncio.wait_for(server.got_data.wait(), 5)
        pongs = [p for op, p in server.client_frames() if op == 0xA]
    return frames, messages, pongs


async def test_the_stream_delivered_whole() -> None:
    frames, messages, pongs = await feed([STREAM])
    assert frames == WORKER_GETS
    assert messages == ["hello", b"abcd"]
    assert pongs == [b"p1", b"p2"]


async def test_every_cut_gives_the_same_frames_in_order() -> None:
    # Every two-way cut through the frames before the large one (headers, payloads,
    # the text and fragmented frames), then byte by byte, then seeded random cuts.
    head = len(b"".join(STREAM_PARTS[:7]))
    cuttings = list(cuts_every_position(STREAM, head + 12))
    cuttings.append([STREAM[i:i + 1] for i in range(len(STREAM))])
    rng = random.Random(2026)
    for _ in range(20):
        points = sorted(rng.sample(range(1, len(STREAM)), 12))
        bounds = zip([0, *points], [*points, len(STREAM)], strict=True)
        cuttings.append([STREAM[a:b] for a, b in bounds])
    for chunks in cuttings:
        assert await feed(chunks) == (WORKER_GETS, ["hello", b"abcd"], [b"p1", b"p2"]), (
            [len(c) for c in chunks])


async def test_frames_sent_with_the_handshake_response_reach_websockets() -> None:
    # Before the session runs (no on_frame yet) frames are websockets' own: the
    # gateway's HELLO may arrive in the same read as the 101 response.
    async with client(after_response=binary(b"hello-frame") + binary(b"second")) as (ws, _):
        assert await asyncio.wait_for(ws.recv(), 5) == b"hello-frame"
        frames: list[bytes] = []
        ws.on_frame = frames.append
        assert await asyncio.wait_for(ws.recv(), 5) == b"second"
        ws.data_received(binary(b"third"))
        assert frames == [b"third"]


@pytest.mark.parametrize(("bad", "code"), [
    (frame(0x2, b"masked", masked=True), 1002),  # a server must not mask
    (struct.pack("!BBQ", 0x82, 127, MAX_FRAME_BYTES + 1), 1009),  # too large
    (frame(0x2, b"x", fin=False) + binary(b"y"), 1002),  # a message inside a fragmented one
])
async def test_a_malformed_frame_fails_the_connection_as_websockets_does(
        bad: bytes, code: int) -> None:
    async with client() as (ws, server):
        frames: list[bytes] = []
        ws.on_frame = frames.append
        ws.data_received(binary(b"before") + bad + binary(b"after"))
        await asyncio.wait_for(server.got_data.wait(), 5)
        assert frames == [b"before"]
        assert ws.protocol.state in (State.CLOSING, State.CLOSED)
        [(opcode, payload)] = server.client_frames()
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == code


async def test_frames_after_a_close_frame_are_not_handled() -> None:
    async with client() as (ws, server):
        frames: list[bytes] = []
        ws.on_frame = frames.append
        ws.data_received(binary(b"before") + frame(0x8, struct.pack("!H", 1000) + b"bye")
                         + binary(b"after"))
        assert frames == [b"before"]
        await asyncio.wait_for(server.got_data.wait(), 5)
        [(opcode, payload)] = server.client_frames()
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1000
