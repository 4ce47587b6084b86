"""Local HTTP servers on 127.0.0.1 that speak the OpenAI chat-completions and Anthropic
messages APIs (JSON and SSE), for driving the real SDK clients in tests.

Behaviour is scripted per request with :class:`Reply` (status, retry-after, delay,
malformed body, refusal, a hold until an event is set, a stream that stalls midway);
unscripted requests get a normal answer. A scripted text is continued like a model would:
when the request ends with the start of that text as the assistant's turn and then a
user turn (a continuation), only the rest is generated. Every request is recorded,
``answered`` counts the successful answers sent, i.e. what the provider would have
billed, and ``generated`` the output tokens (one per word) actually sent per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import h11

Kind = Literal["openai", "anthropic"]


@dataclass
class Reply:
    status: int = 200
    text: str | None = None  # default: echoes the last user message
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # raw body (malformed responses, custom errors)
    error: str = "error"  # message of a generated error body
    error_code: str | None = None
    delay: float = 0.0  # seconds before the response starts (slow responses)
    hold: asyncio.Event | None = None  # wait for this before answering
    stop_reason: str | None = None  # finish_reason / stop_reason override
    refusal: str | None = None  # OpenAI message.refusal
    tool_call: tuple[str, dict[str, Any]] | None = None
    input_tokens: int = 120
    output_tokens: int | None = None  # default: one per word of text
    cached_tokens: int = 0
    chunk_delay: float = 0.0  # between SSE events
    stream_error_after: int | None = None  # send an SSE error event after this many events
    on_chunk: Callable[[int], None] | None = None  # called after each SSE event is sent
    # Stream this many text pieces, then stall until the stub closes (the client is meant
    # to die meanwhile); ``StubProvider.stalled`` is set then.
    stall_after: int | None = None


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        return " ".join(str(m.get("content")) for m in self.body.get("messages", []))


class StubProvider:
    """One fake provider API. ``base_url`` is what the SDK client takes."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.script: deque[Reply] = deque()
        self.requests: list[Seen] = []
        self.answered: list[Seen] = []
        self.generated: list[int] = []
        self.stalled = asyncio.Event()
        self.on_answer: Callable[[Seen], None] | None = None
        self.on_request: Callable[[Seen], None] | None = None
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._closing = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}" + ("/v1" if self.kind == "openai" else "")

    async def __aenter__(self) -> StubProvider:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._closing.set()
        self._server.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _until(self, waiting: Coroutine[Any, Any, Any]) -> None:
        """Wait for ``waiting`` or for the stub to close, whichever comes first."""
        tasks = {asyncio.ensure_future(waiting), asyncio.ensure_future(self._closing.wait())}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            seen = await _read_request(reader)
            if seen is None:
                return
            self.requests.append(seen)
            if self.on_request is not None:
                self.on_request(seen)
            reply = self.script.popleft() if self.script else Reply()
            if reply.hold is not None:
                await self._until(reply.hold.wait())
            if reply.delay:
                # A slow provider; cut short when the stub closes.
                await self._until(asyncio.sleep(reply.delay))
            if not self._closing.is_set():
                await self._respond(writer, seen, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, seen: Seen, reply: Reply) -> None:
        n = next(self._ids)
        request_id = f"req_stub_{n}"
        id_header = "x-request-id" if self.kind == "openai" else "request-id"
        headers = {id_header: request_id, **reply.headers}
        if reply.status != 200 or reply.body is not None:
            body = reply.body if reply.body is not None else self._error_body(reply)
            _write_head(writer, reply.status, {"content-type": "application/json",
                                               "content-length": str(len(body)), **headers})
            writer.write(body)
            await writer.drain()
            return
        text = reply.text
        messages = seen.body.get("messages", [])
        if (text is not None and len(messages) >= 2 and messages[-2].get("role") == "assistant"
                and text.startswith(str(messages[-2].get("content")))):
            text = text[len(str(messages[-2].get("content"))):]  # continue where it stopped
        if text is None:
            json_mode = seen.body.get("response_format", {}).get("type") == "json_object"
            text = (json.dumps({"answer": seen.prompt[-80:]}) if json_mode
                    else f"answer to: {seen.prompt[-200:]}")
        model = str(seen.body.get("model"))
        out = reply.output_tokens if reply.output_tokens is not None else len(text.split())
        build = _openai if self.kind == "openai" else _anthropic
        if seen.body.get("stream"):
            _write_head(writer, 200, {"content-type": "text/event-stream", **headers})
            first_piece = 1 if self.kind == "openai" else 2
            pieces = range(first_piece, first_piece + len(_pieces(text)))
            sent = 0
            for index, chunk in enumerate(build(n, model, text, reply, out, stream=True)):
                if index == reply.stream_error_after:
                    writer.write(self._stream_error())
                    await writer.drain()
                    return
                writer.write(chunk)
                await writer.drain()
                sent += index in pieces
                if reply.on_chunk is not None:
                    reply.on_chunk(index)
                if sent == reply.stall_after and index in pieces:
                    self.generated.append(sent)
                    self.stalled.set()
                    await self._closing.wait()
                    return
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
        else:
            (body,) = build(n, model, text, reply, out, stream=False)
            _write_head(writer, 200, {"content-type": "application/json",
                                      "content-length": str(len(body)), **headers})
            writer.write(body)
        await writer.drain()
        self.generated.append(out)
        self.answered.append(seen)
        if self.on_answer is not None:
            self.on_answer(seen)

    def _stream_error(self) -> bytes:
        error = {"type": "overloaded_error", "message": "Overloaded"}
        if self.kind == "openai":
            return _sse({"error": error})
        return _sse({"type": "error", "error": error}, "error")

    def _error_body(self, reply: Reply) -> bytes:
        if self.kind == "openai":
            err: dict[str, Any] = {"error": {
                "message": reply.error, "type": "invalid_request_error",
                "code": reply.error_code, "param": None}}
        else:
            err = {"type": "error", "error": {"type": reply.error_code or "api_error",
                                              "message": reply.error}}
        return json.dumps(err).encode()


async def _read_request(reader: asyncio.StreamReader) -> Seen | None:
    conn = h11.Connection(h11.SERVER)
    head: h11.Request | None = None
    body = bytearray()
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                return None
            conn.receive_data(data)
        elif isinstance(ev, h11.Request):
            head = ev
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            assert head is not None
            return Seen(head.target.decode(),
                        {k.decode().lower(): v.decode() for k, v in head.headers},
                        json.loads(body or b"{}"))
        else:
            return None


def _write_head(writer: asyncio.StreamWriter, status: int, headers: dict[str, str]) -> None:
    lines = [f"HTTP/1.1 {status} Stub", "connection: close",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    writer.write("\r\n".join(lines).encode())


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


def _openai(n: int, model: str, text: str, reply: Reply, out: int, *, stream: bool
            ) -> list[bytes]:
    usage = {"prompt_tokens": reply.input_tokens, "completion_tokens": out,
             "total_tokens": reply.input_tokens + out,
             "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}
    finish = reply.stop_reason or ("tool_calls" if reply.tool_call else "stop")
    tool_calls = None
    if reply.tool_call:
        tool_calls = [{"id": f"call_{n}", "type": "function", "function": {
            "name": reply.tool_call[0], "arguments": json.dumps(reply.tool_call[1])}}]
    base = {"id": f"chatcmpl-{n}", "created": 1_700_000_000, "model": model}
    if not stream:
        message = {"role": "assistant", "content": None if tool_calls else text,
                   "refusal": reply.refusal, "tool_calls": tool_calls}
        return [json.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        }).encode()]
    chunk = {**base, "object": "chat.completion.chunk"}
    out_chunks = [_sse({**chunk, "choices": [{"index": 0, "delta": {
        "role": "assistant", "content": ""}, "finish_reason": None}]})]
    if reply.refusal:
        out_chunks.append(_sse({**chunk, "choices": [{"index": 0, "delta": {
            "refusal": reply.refusal}, "finish_reason": None}]}))
    elif tool_calls:
        tc = tool_calls[0]
        out_chunks.append(_sse({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, **tc}]}, "finish_reason": None}]}))
    else:
        out_chunks += [_sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                                   "finish_reason": None}]})
                       for piece in _pieces(text)]
    out_chunks.append(_sse({**chunk, "choices": [{"index": 0, "delta": {},
                                                  "finish_reason": finish}]}))
    out_chunks.append(_sse({**chunk, "choices": [], "usage": usage}))
    out_chunks.append(b"data: [DONE]\n\n")
    return out_chunks


def _anthropic(n: int, model: str, text: str, reply: Reply, out: int, *, stream: bool
               ) -> list[bytes]:
    usage = {"input_tokens": reply.input_tokens, "output_tokens": out,
             "cache_read_input_tokens": reply.cached_tokens, "cache_creation_input_tokens": 0}
    stop = reply.stop_reason or ("tool_use" if reply.tool_call else "end_turn")
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if reply.tool_call:
        content.append({"type": "tool_use", "id": f"toolu_{n}", "name": reply.tool_call[0],
                        "input": reply.tool_call[1]})
    message = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": model}
    if not stream:
        return [json.dumps({**message, "content": content, "stop_reason": stop,
                            "stop_sequence": None, "usage": usage}).encode()]
    events = [_sse({"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1}}}, "message_start"),
        _sse({"type": "content_block_start", "index": 0,
              "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    events += [_sse({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
               for piece in _pieces(text)]
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    if reply.tool_call:
        events.append(_sse({"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": f"toolu_{n}", "name": reply.tool_call[0], "input": {}}},
            "content_block_start"))
        events.append(_sse({"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(reply.tool_call[1])}},
            "content_block_delta"))
        events.append(_sse({"type": "content_block_stop", "index": 1}, "content_block_stop"))
    events.append(_sse({"type": "message_delta", "delta": {"stop_reason": stop,
                                                           "stop_sequence": None},
                        "usage": {"output_tokens": out}}, "message_delta"))
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events
