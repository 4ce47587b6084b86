"""Versions of one function, ``drift-pipeline``, as a team would deploy them.

Every version has the same app and function id, so a run started on v1 continues on
whichever version the gateway hands its next step to. Between the steps v1 runs and
the steps v2 continues with sits ``gate``, a ``wait_for_event`` the test releases once
v1's worker is gone. Step bodies count their executions in ``counts``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import inngest
import pydantic

APP = "drift"
FN = "drift-pipeline"
GO = "drift/go"
TRIGGER = "drift/start"

counts: Counter[str] = Counter()
_lock = threading.Lock()


def body(name: str, value: Any = None) -> Callable[[], Any]:
    def run() -> Any:
        with _lock:
            counts[name] += 1
        return value if value is not None else name.upper()

    return run


class Summary(pydantic.BaseModel):
    text: str
    score: float


def _summary_v1() -> dict[str, str]:
    with _lock:
        counts["summarize"] += 1
    return {"text": "short"}


def _summary_v2() -> Summary:
    with _lock:
        counts["summarize"] += 1
    return Summary(text="short", score=1.0)


async def _gate(ctx: inngest.Context) -> None:
    await ctx.step.wait_for_event("gate", event=GO, timeout=60_000)


# Each version: the steps in order; "gate" is the wait; "||x,y" is a parallel group;
# "?pos/neg" a branch on a's memoized output (event data n > 0).
VERSIONS: dict[str, list[str]] = {
    "v1": ["a", "b", "gate", "c"],
    "rename": ["a", "b2", "gate", "c"],
    "remove": ["a", "gate", "c"],
    "add_middle": ["a", "x", "b", "gate", "c"],
    "add_end": ["a", "b", "gate", "c", "d"],
    "reorder": ["a", "c", "b", "gate"],
    "changed_body": ["a", "b", "gate", "c"],
    "par_v1": ["a", "||p1,p2", "gate", "c"],
    "par_same": ["a", "||p1,p2", "gate", "c", "d"],
    "par_rename": ["a", "||p1,p2b", "gate", "c"],
    "branch": ["a", "?pos/neg", "gate", "c"],
    "shape_v1": ["summarize", "gate", "c"],
    "shape_v2": ["summarize", "gate", "c"],
}


def make(version: str, **client_kw: Any) -> tuple[inngest.Inngest, list[inngest.Function[Any]]]:
    """A fresh client and the function as ``version`` defines it."""
    client = inngest.Inngest(app_id=APP, is_production=False, **client_kw)
    plan = VERSIONS[version]

    @client.create_function(fn_id="pipeline", trigger=inngest.TriggerEvent(event=TRIGGER),
                            retries=0)
    async def pipeline(ctx: inngest.Context) -> list[Any]:
        out: list[Any] = []
        for item in plan:
            if item == "gate":
                await _gate(ctx)
            elif item.startswith("||"):
                names = item[2:].split(",")
                got = await ctx.group.parallel(tuple(
                    (lambda n=n: ctx.step.run(n, body(n))) for n in names))
                out.extend(got)
            elif item.startswith("?"):
                pos, neg = item[1:].split("/")
                name = pos if int(out[0]["n"]) > 0 else neg
                out.append(await ctx.step.run(name, body(name)))
            elif item == "a" and version == "branch":
                n = ctx.event.data.get("n", 1)
                out.append(await ctx.step.run("a", body("a", {"n": n})))
            elif item == "summarize":
                fn = _summary_v2 if version == "shape_v2" else _summary_v1
                value = await ctx.step.run("summarize", fn)
                out.append(value if isinstance(value, dict) else value.model_dump())
            else:
                out.append(await ctx.step.run(item, body(item)))
        return out

    return client, [pipeline]
