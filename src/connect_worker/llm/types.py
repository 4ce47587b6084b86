"""The provider-neutral values of the LLM toolkit: what a call asks for and what it returns.

``Answer`` is exactly what the result cache stores (it round-trips through JSON), so
a retried step gets the same object back whether the model or the cache answered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from .errors import LLMRejectedError

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON Schema object."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """One model request, independent of provider. Its ``digest`` keys the result cache."""

    provider: str
    model: str
    messages: tuple[Message, ...]
    system: str | None = None
    max_tokens: int = 1024
    temperature: float | None = None
    tools: tuple[Tool, ...] = ()
    json_output: bool = False

    def digest(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts. ``input_tokens`` includes ``cached_tokens`` and ``cache_write_tokens``."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the provider returned for one call (cacheable, JSON-serialisable)."""

    text: str
    usage: Usage
    request_id: str | None
    model: str
    stop_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    # True when a streaming call was stopped early (drain); such answers are never cached.
    partial: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Answer:
        raw = json.loads(text)
        return cls(
            text=raw["text"],
            usage=Usage(**raw["usage"]),
            request_id=raw["request_id"],
            model=raw["model"],
            stop_reason=raw["stop_reason"],
            tool_calls=tuple(ToolCall(**t) for t in raw["tool_calls"]),
            partial=raw["partial"],
        )


@dataclass(frozen=True)
class Result:
    """What ``LLM.complete`` returns: the answer plus how it was obtained."""

    text: str
    usage: Usage
    request_id: str | None
    provider: str
    model: str
    cost_usd: float
    stop_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    cached: bool = False  # served from the result cache: nothing was paid this time
    stopped_early: bool = False  # a streaming call stopped because the worker is draining
    attempts: int = 0  # HTTP requests made for this result (0 when cached)
    # Evicts this answer from the result cache: set on the instance by LLM.complete when
    # the answer is stored. Not a field, so asdict(), ==, repr and pickling ignore it.
    _evict: ClassVar[Callable[[Result, str | None], Awaitable[None]] | None] = None

    def json(self) -> Any:
        """The text parsed as JSON (code fences around it are tolerated)."""
        return parse_json_text(self.text)

    async def reject(self, reason: str | None = None) -> LLMRejectedError:
        """Throw this answer away so that the step's retry asks the model again (telling
        it ``reason``), and return the error to raise::

            if not looks_right(result.text):
                raise await result.reject("the summary has no title")

        Other answers of the step stay cached; the rejected one still counts in
        ``run_cost`` (it was paid for).
        """
        # Read off the instance: a callable class attribute would be bound as a method.
        evict: Callable[[Result, str | None], Awaitable[None]] | None = vars(self).get("_evict")
        if evict is not None:
            await evict(self, reason)
        return LLMRejectedError(reason)


def parse_json_text(text: str) -> Any:
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    return json.loads(body)
