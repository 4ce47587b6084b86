"""What the workers' ``llm.call`` log lines say about the model requests of a run of the
lab (paid, reused, failed, paid twice), for the demo and simulate-deploy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .fleet import WorkerProcess

__all__ = ["FAILED", "PAID", "REUSED", "LLMStats"]

# llm.call outcomes that reached the model, i.e. were paid for ("stopped": a stream
# stopped by the drain, paid for the tokens it produced; "resumed": a crashed stream
# continued from its saved text, paid for the rest only).
PAID = frozenset({"ok", "stopped", "resumed"})
# Answers taken from another copy or attempt without asking the model.
REUSED = frozenset({"cached", "waited"})
FAILED = frozenset({"fatal", "gave_up", "refused"})


@dataclass
class LLMStats:
    """What the workers' ``llm.call`` log lines say about the model requests."""

    paid: int = 0  # requests that reached the model
    cached: int = 0  # answered from the shared result cache, not paid again
    stopped: int = 0  # streams stopped early by a drain (paid for what they produced)
    failed: int = 0  # fatal, gave up or refused
    # The same question asked of the model twice in one run, i.e. paid twice. The
    # simulated provider's request id is derived from the request itself, so a repeat
    # of a request has the same id.
    duplicates: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    models: list[str] = field(default_factory=list)
    paid_per_worker: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_workers(cls, workers: list[WorkerProcess]) -> LLMStats:
        stats = cls()
        asked: Counter[tuple[Any, Any, Any]] = Counter()
        models: set[str] = set()
        for w in workers:
            if not w.started_at:
                continue
            stats.paid_per_worker[w.instance_id] = 0
            for call in w.events("llm.call"):
                outcome = call.get("outcome")
                if outcome in REUSED:
                    stats.cached += 1
                elif outcome in FAILED:
                    stats.failed += 1
                if outcome not in PAID:
                    continue
                stats.paid += 1
                stats.paid_per_worker[w.instance_id] += 1
                stats.stopped += outcome == "stopped"
                stats.input_tokens += int(call.get("input_tokens") or 0)
                stats.output_tokens += int(call.get("output_tokens") or 0)
                stats.cost_usd += float(call.get("cost_usd") or 0.0)
                models.add(str(call.get("model")))
                asked[(call.get("run_id"), call.get("request_id"), call.get("occurrence"))] += 1
        stats.duplicates = sum(n - 1 for n in asked.values() if n > 1)
        stats.models = sorted(models)
        return stats
