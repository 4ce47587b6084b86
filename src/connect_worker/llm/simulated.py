"""An offline stand-in for a model: realistic latency, streaming and token usage, no network.

Selected with ``CONNECT_WORKER_LLM_PROVIDER=simulated``; ``CONNECT_WORKER_LLM_SIM_SPEEDUP``
divides every delay (1 = about a second to the first token, then ~70 tokens/s, so a
long section takes 10-20 s like a real model; 100 makes a report run in seconds).
Answers are deterministic for a given request. With ``json=True`` the answer follows the
first JSON skeleton found in the prompt (``{"title": "string", "items": [...]}``), with
every string filled in and every list given 3-5 entries. It counts its requests, so
tests can check that the cache saved them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

from .providers import OnText, ShouldStop
from .types import Answer, Call, Usage

_FILLER = (
    "customers teams adoption pricing onboarding retention workflow integration costs "
    "signals evidence interviews segment market competitors risks opportunity roadmap "
    "metrics growth churn support revenue experiment hypothesis latency reliability "
    "stakeholders budget timeline priority channel partnership compliance"
).split()
_JSON_START = re.compile(r"[{\[]")


class SimulatedProvider:
    name = "simulated"

    def __init__(self, *, speedup: float = 1.0, first_token: float = 0.9,
                 tokens_per_second: float = 70.0) -> None:
        self.speedup = speedup
        self.first_token = first_token
        self.tokens_per_second = tokens_per_second
        self.requests = 0
        self._seen_systems: set[str] = set()

    async def send(
        self, call: Call, *, attempt_timeout: float, stream: bool, on_text: OnText | None,
        should_stop: ShouldStop | None,
    ) -> Answer:
        self.requests += 1
        rng = random.Random(call.digest())
        text = _json_answer(call, rng) if call.json_output else _prose(call, rng)
        prompt_chars = sum(len(m.content) for m in call.messages) + len(call.system or "")
        system_tokens = len(call.system or "") // 4
        cached = 0
        if call.system and system_tokens >= 1024:
            if call.system in self._seen_systems:
                cached = system_tokens // 128 * 128
            self._seen_systems.add(call.system)
        pieces = re.findall(r"\S+\s*", text) or [text]
        out_tokens = max(len(text) // 4, 1)
        per_piece = out_tokens / len(pieces) / self.tokens_per_second / self.speedup
        await asyncio.sleep(self.first_token * rng.uniform(0.7, 1.4) / self.speedup)
        sent: list[str] = []
        for index in range(0, len(pieces), 4):
            chunk = "".join(pieces[index:index + 4])
            await asyncio.sleep(per_piece * 4)
            sent.append(chunk)
            if stream and on_text is not None:
                on_text(chunk)
            if stream and should_stop is not None and should_stop() and index + 4 < len(pieces):
                partial = "".join(sent)
                return Answer(partial, Usage(prompt_chars // 4 + 12, len(partial) // 4, cached),
                              f"sim_{call.digest()[:20]}", call.model, "drain", partial=True)
        usage = Usage(prompt_chars // 4 + 12, out_tokens, cached)
        return Answer(text, usage, f"sim_{call.digest()[:20]}", call.model, "stop")


_SKIP = set("string return shaped heading title about write which their there these those "
            "should would could section sections words sentence report using where exactly "
            "answer order reading before after every".split())
_SHORT_KEYS = {"title", "heading", "name", "question", "owner", "confidence", "signal"}


def _words(call: Call) -> list[str]:
    found = re.findall(r"[A-Za-z][a-z]{4,}", " ".join(m.content for m in call.messages))
    words = [w.lower() for w in found if w.lower() not in _SKIP][:200]
    return words or list(_FILLER)


def _sentence(rng: random.Random, words: list[str]) -> str:
    picked = [rng.choice(words if rng.random() < 0.4 else _FILLER)
              for _ in range(rng.randint(10, 20))]
    return " ".join(picked).capitalize() + "."


def _prose(call: Call, rng: random.Random) -> str:
    words = _words(call)
    budget = int(call.max_tokens * rng.uniform(0.45, 0.8)) * 4  # characters
    parts: list[str] = []
    size = 0
    while size < budget:
        if rng.random() < 0.2:
            heading = " ".join(rng.choice(words) for _ in range(3)).title()
            block = f"## {heading}"
        elif rng.random() < 0.3:
            block = "\n".join(f"- {_sentence(rng, words)}" for _ in range(rng.randint(2, 4)))
        else:
            block = " ".join(_sentence(rng, words) for _ in range(rng.randint(3, 6)))
        parts.append(block)
        size += len(block) + 2
    return "\n\n".join(parts)[:budget]


def _skeleton(call: Call) -> Any:
    decoder = json.JSONDecoder()
    for text in (call.system or "", *(m.content for m in call.messages)):
        for match in _JSON_START.finditer(text):
            try:
                return decoder.raw_decode(text, match.start())[0]
            except ValueError:
                continue
    return {"answer": "string"}


def _fill(shape: Any, rng: random.Random, words: list[str], key: str = "") -> Any:
    if isinstance(shape, dict):
        return {name: _fill(value, rng, words, name) for name, value in shape.items()}
    if isinstance(shape, list):
        return [_fill(shape[0] if shape else "string", rng, words, key)
                for _ in range(rng.randint(3, 5))]
    if key in _SHORT_KEYS:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))).capitalize()
    if isinstance(shape, bool):
        return rng.random() < 0.5
    if isinstance(shape, int | float):
        return rng.randint(1, 10)
    return _sentence(rng, words)


def _json_answer(call: Call, rng: random.Random) -> str:
    return json.dumps(_fill(_skeleton(call), rng, _words(call)), indent=1)
