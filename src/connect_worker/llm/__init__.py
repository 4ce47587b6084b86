"""LLM step toolkit: one async API over the official openai and anthropic SDKs.

``await llm.complete(...)`` retries transient failures (tenacity, jittered exponential
backoff honouring retry-after, a total time budget; the SDKs' own retries are off),
raises ``inngest.NonRetriableError`` for what retrying cannot fix, stores every answer
in a durable cache keyed by the step's identity so a retried step never pays twice,
claims each call so two copies of a step running at once pay once, continues a stream
cut by a crash instead of asking again, lets a step reject an answer, and accounts
tokens and dollars as Prometheus metrics and log lines. See docs/llm.md.
"""

from __future__ import annotations

from .cache import (
    Claims,
    ClaimState,
    Partial,
    PostgresCache,
    Rejection,
    ResultCache,
    RunCost,
    SqliteCache,
)
from .client import CONTINUE, LLM
from .config import LLMConfig
from .errors import LLMDrainingError, LLMFatalError, LLMRejectedError, LLMUnavailableError
from .pricing import Price, PriceTable
from .providers import AnthropicProvider, OpenAIProvider, Provider
from .simulated import SimulatedProvider
from .types import Message, Result, Tool, ToolCall, Usage

__all__ = [
    "CONTINUE",
    "LLM",
    "AnthropicProvider",
    "ClaimState",
    "Claims",
    "LLMConfig",
    "LLMDrainingError",
    "LLMFatalError",
    "LLMRejectedError",
    "LLMUnavailableError",
    "Message",
    "OpenAIProvider",
    "Partial",
    "PostgresCache",
    "Price",
    "PriceTable",
    "Provider",
    "Rejection",
    "Result",
    "ResultCache",
    "RunCost",
    "SimulatedProvider",
    "SqliteCache",
    "Tool",
    "ToolCall",
    "Usage",
]
