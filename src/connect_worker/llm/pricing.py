"""One price table for every model, in USD per million tokens.

Prices are looked up by model name (longest matching prefix, so dated snapshots such
as ``gpt-4.1-2025-04-14`` find ``gpt-4.1``) and can be replaced or extended with
``CONNECT_WORKER_LLM_PRICES``: a JSON object, or the path of a JSON file, shaped like
``{"gpt-4.1": {"input": 2.0, "output": 8.0, "cached_input": 0.5}}``. A model with no
price costs 0 and is logged once, so a missing entry is visible but never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .types import Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cached_input: float
    cache_write: float  # Anthropic bills cache writes above the input price

    def cost(self, usage: Usage) -> float:
        fresh = max(usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
        return (
            fresh * self.input
            + usage.cached_tokens * self.cached_input
            + usage.cache_write_tokens * self.cache_write
            + usage.output_tokens * self.output
        ) / 1_000_000


def _price(input: float, output: float, cached: float, write: float | None = None) -> Price:
    return Price(input, output, cached, input if write is None else write)


# List prices, standard tier, as published by the providers (late 2025). Newer models
# match by prefix (claude-sonnet-4-6 -> claude-sonnet-4); check and override when it matters.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": _price(1.25, 10.00, 0.125),
    "gpt-5-mini": _price(0.25, 2.00, 0.025),
    "gpt-5-nano": _price(0.05, 0.40, 0.005),
    "gpt-4.1": _price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": _price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _price(0.10, 0.40, 0.025),
    "gpt-4o": _price(2.50, 10.00, 1.25),
    "gpt-4o-mini": _price(0.15, 0.60, 0.075),
    "o3": _price(2.00, 8.00, 0.50),
    "o4-mini": _price(1.10, 4.40, 0.275),
    "claude-opus-4-5": _price(5.00, 25.00, 0.50, 6.25),
    "claude-opus-4": _price(15.00, 75.00, 1.50, 18.75),
    "claude-sonnet-4": _price(3.00, 15.00, 0.30, 3.75),
    "claude-haiku-4-5": _price(1.00, 5.00, 0.10, 1.25),
    "claude-3-5-haiku": _price(0.80, 4.00, 0.08, 1.00),
}


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        self._warned: set[str] = set()

    def lookup(self, model: str) -> Price | None:
        best = max((name for name in self._prices if model.startswith(name)), key=len, default="")
        return self._prices.get(best)

    def cost(self, model: str, usage: Usage) -> float:
        price = self.lookup(model)
        if price is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price for model %r; its cost is counted as 0", model)
            return 0.0
        return price.cost(usage)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> PriceTable:
        prices = dict(DEFAULT_PRICES)
        raw = environ.get("CONNECT_WORKER_LLM_PRICES", "").strip()
        if raw:
            prices.update(_parse_overrides(raw))
        return cls(prices)


def _parse_overrides(raw: str) -> dict[str, Price]:
    var = "CONNECT_WORKER_LLM_PRICES"
    try:
        text = raw if raw.startswith("{") else Path(raw).read_text()
        data = json.loads(text)
        out: dict[str, Price] = {}
        for model, entry in data.items():
            inp, outp = float(entry["input"]), float(entry["output"])
            cached = float(entry.get("cached_input", inp))
            out[model] = Price(inp, outp, cached, float(entry.get("cache_write", inp)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{var}: expected a JSON object (or a path to one) like "
            '{"gpt-4.1": {"input": 2.0, "output": 8.0, "cached_input": 0.5}} '
            f"with prices in USD per million tokens ({type(exc).__name__})"
        ) from None
    return out
