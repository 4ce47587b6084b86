"""The three report pipelines, as plain async steps that the Inngest functions (and the
offline runner) execute one ``step.run`` at a time.

A step gets a :class:`Writer` (the LLM plus the step's identity) and the outputs of the
steps before it, and returns something JSON-serialisable that Inngest memoises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from connect_worker.llm import CONTINUE, LLM, Message, Result

State = dict[str, Any]


@dataclass(frozen=True)
class Writer:
    """Binds the LLM to one step. ``key`` is only needed outside connect_worker's executor
    (the offline runner); inside it the step's job id keys the result cache."""

    llm: LLM
    key: str | None = None
    run_id: str | None = None

    def _models(self) -> tuple[str, str]:
        provider = self.llm.default_provider()
        large = os.environ.get("REPORTS_LARGE_MODEL") or self.llm.config.model or (
            "gpt-4.1" if provider == "openai" else "claude-sonnet-4-6")
        small = os.environ.get("REPORTS_SMALL_MODEL") or (
            "gpt-4.1-mini" if provider == "openai" else "claude-haiku-4-5")
        return large, small

    async def write(self, prompt: str, *, system: str, max_tokens: int = 1500,
                    small: bool = False, stream: bool = False) -> str:
        large, fast = self._models()
        result = await self.llm.complete(prompt, system=system, model=fast if small else large,
                                         max_tokens=max_tokens, temperature=0.4, stream=stream,
                                         key=self.key, run_id=self.run_id)
        return result.text

    async def draft(self, prompt: str, *, system: str, max_tokens: int = 1600) -> Any:
        """Stream a long text. If the worker starts draining meanwhile, stop and return a
        checkpoint instead, which :func:`run_pipeline` continues in a follow-up step
        (probably on another worker) rather than losing the step at the drain deadline."""
        large, _ = self._models()
        result = await self.llm.complete(
            prompt, system=system, model=large, max_tokens=max_tokens, temperature=0.4,
            stream=True, stop_on_drain=True, key=self.key, run_id=self.run_id)
        if not result.stopped_early:
            return result.text
        return {"checkpoint": {"prompt": prompt, "system": system, "model": large,
                               "max_tokens": max_tokens, "text": result.text}}

    async def resume(self, checkpoint: dict[str, Any]) -> Any:
        parts = checkpoint.get("parts", 1)
        result = await self.llm.complete(
            messages=[Message("user", checkpoint["prompt"]),
                      Message("assistant", checkpoint["text"]), Message("user", CONTINUE)],
            system=checkpoint["system"], model=checkpoint["model"],
            max_tokens=checkpoint["max_tokens"], temperature=0.4, stream=True,
            # Normally the continuation runs on a worker that is not draining; should it
            # land on draining ones again and again, finish anyway after a few parts.
            stop_on_drain=parts < MAX_PARTS, key=self.key, run_id=self.run_id)
        text = checkpoint["text"] + result.text
        if result.stopped_early:
            return {"checkpoint": {**checkpoint, "text": text, "parts": parts + 1}}
        return text

    async def data(self, prompt: str, *, system: str, max_tokens: int = 1200,
                   small: bool = True) -> Any:
        large, fast = self._models()
        result: Result = await self.llm.complete(
            prompt, system=system, model=fast if small else large, max_tokens=max_tokens,
            temperature=0.2, json=True, key=self.key, run_id=self.run_id)
        return result.json()

    async def cost(self) -> dict[str, Any]:
        run_id = self.run_id
        return asdict(await self.llm.run_cost(run_id))


Step = Callable[[Writer, State], Awaitable[Any]]
# ctx.step.run in an Inngest function; a direct call when running offline.
StepRunner = Callable[..., Awaitable[Any]]
MAX_PARTS = 3


@dataclass(frozen=True)
class Pipeline:
    fn_id: str
    event: str
    steps: tuple[tuple[str, Step], ...]


async def _resume(w: Writer, checkpoint: dict[str, Any]) -> Any:
    return await w.resume(checkpoint)


async def run_pipeline(pipeline: Pipeline, data: dict[str, Any], run: StepRunner,
                       writer_for: Callable[[str], Writer]) -> Any:
    """Run the steps in order; a step that returned a checkpoint (the worker was draining)
    is finished by ``<step>-continue-<n>`` steps before the next one starts."""
    state: State = {"input": data}
    for step_id, step in pipeline.steps:
        out = await run(step_id, step, writer_for(step_id), dict(state))
        part = 0
        while isinstance(out, dict) and "checkpoint" in out:
            part += 1
            continue_id = f"{step_id}-continue-{part}"
            out = await run(continue_id, _resume, writer_for(continue_id), out["checkpoint"])
        state[step_id] = out
    return state[pipeline.steps[-1][0]]


ANALYST = ("You are a senior research analyst at a strategy consultancy. You write for busy "
           "executives: precise, evidence-minded, no filler, no hype. When evidence is thin "
           "you say so and state your assumptions.")
DISCOVERY = ("You are a product discovery lead. You reason from customer evidence to "
             "problems worth solving, separate what is known from what is assumed, and "
             "propose cheap ways to learn more.")


def _brief(state: State) -> str:
    data = state["input"]
    return "\n".join(f"{key}: {value}" for key, value in data.items() if value)


def _sections(state: State) -> list[dict[str, Any]]:
    outline = state.get("outline") or {}
    sections = [s for s in outline.get("sections", []) if isinstance(s, dict)]
    return (sections + [{"heading": f"Section {i + 1}", "goal": ""} for i in range(5)])[:5]


# -- generate-report: brief -> outline -> 5 sections -> summary -> review -> final ------

async def analyze_brief(w: Writer, state: State) -> Any:
    return await w.data(
        "Read this report request and restate it precisely.\n\n"
        f"{_brief(state)}\n\n"
        'Return JSON shaped like {"title": "string", "objective": "string", '
        '"audience": "string", "key_questions": ["string"], "out_of_scope": ["string"]}',
        system=ANALYST)


async def outline(w: Writer, state: State) -> Any:
    return await w.data(
        "Design the outline of a report answering this brief. Exactly five sections, in "
        "reading order, each with a heading and one sentence on what it must establish.\n\n"
        f"Brief: {json.dumps(state['analyze-brief'])}\n\n"
        'Return JSON shaped like {"sections": [{"heading": "string", "goal": "string"}]}',
        system=ANALYST, small=False)


def write_section(index: int) -> Step:
    async def step(w: Writer, state: State) -> Any:
        section = _sections(state)[index]
        earlier = [s["heading"] for s in _sections(state)[:index]]
        return await w.draft(
            f"Write section {index + 1} of the report \"{state['analyze-brief'].get('title')}\"."
            f"\n\nHeading: {section.get('heading')}\nIt must establish: {section.get('goal')}\n"
            f"Sections before it: {', '.join(earlier) or 'none'}.\n\n"
            "600-900 words of Markdown starting with the heading as '##'. Use concrete "
            "numbers where you can and mark estimates as such. Do not repeat earlier "
            "sections; end with one sentence that leads into the next.",
            system=ANALYST, max_tokens=1600)
    return step


async def executive_summary(w: Writer, state: State) -> str:
    body = "\n\n".join(state[f"write-section-{i + 1}"] for i in range(5))
    return await w.write(
        "Write the executive summary of the report below: 5 bullet points with the "
        "findings that matter most, then a one-paragraph recommendation.\n\n" + body,
        system=ANALYST, max_tokens=700)


async def review(w: Writer, state: State) -> Any:
    return await w.data(
        "Review this executive summary against the brief. List concrete problems "
        "(unsupported claims, gaps against the key questions, vague wording).\n\n"
        f"Brief: {json.dumps(state['analyze-brief'])}\n\n"
        f"Summary:\n{state['executive-summary']}\n\n"
        'Return JSON shaped like {"issues": [{"problem": "string", "fix": "string"}], '
        '"score": 7}',
        system=ANALYST)


async def finalize(w: Writer, state: State) -> dict[str, Any]:
    summary = await w.write(
        "Revise the executive summary to fix every issue listed. Keep its format.\n\n"
        f"Summary:\n{state['executive-summary']}\n\nIssues: {json.dumps(state['review'])}",
        system=ANALYST, max_tokens=700)
    title = state["analyze-brief"].get("title", "Report")
    body = "\n\n".join(state[f"write-section-{i + 1}"] for i in range(5))
    return {"title": title, "markdown": f"# {title}\n\n{summary}\n\n{body}",
            "cost": await w.cost()}


REPORT = Pipeline("generate-report", "reports/report.requested", (
    ("analyze-brief", analyze_brief),
    ("outline", outline),
    *((f"write-section-{i + 1}", write_section(i)) for i in range(5)),
    ("executive-summary", executive_summary),
    ("review", review),
    ("finalize", finalize),
))


# -- generate-discovery-report: problem framing through recommendations -----------------

async def frame_problem(w: Writer, state: State) -> Any:
    return await w.data(
        "Frame the problem behind this discovery request.\n\n"
        f"{_brief(state)}\n\n"
        'Return JSON shaped like {"problem_statement": "string", "who_has_it": "string", '
        '"assumptions": ["string"], "unknowns": ["string"]}',
        system=DISCOVERY)


async def map_stakeholders(w: Writer, state: State) -> str:
    return await w.write(
        "Map the stakeholders of this problem: who experiences it, who pays, who decides, "
        "who blocks. For each, what they want and what they fear. Markdown table plus "
        f"three observations.\n\nProblem: {json.dumps(state['frame-problem'])}",
        system=DISCOVERY, max_tokens=1200)


async def pain_points(w: Writer, state: State) -> Any:
    return await w.data(
        "From the problem framing and interview notes, synthesise the distinct pain points."
        " Rate severity 1-5 by frequency and cost to the customer.\n\n"
        f"Problem: {json.dumps(state['frame-problem'])}\n"
        f"Notes: {state['input'].get('interview_notes', 'none provided')}\n\n"
        'Return JSON shaped like {"pain_points": [{"title": "string", "evidence": "string", '
        '"severity": 3}]}',
        system=DISCOVERY, small=False)


async def existing_solutions(w: Writer, state: State) -> str:
    return await w.write(
        "Describe how people solve this today: incumbent products, workarounds, "
        "doing nothing. For each, why it falls short for the top pain points.\n\n"
        f"Pain points: {json.dumps(state['pain-points'])}",
        system=DISCOVERY, max_tokens=1400)


async def hypotheses(w: Writer, state: State) -> Any:
    return await w.data(
        "Turn the pain points and the gaps in existing solutions into testable "
        "opportunity hypotheses, each with the cheapest test that could falsify it.\n\n"
        f"Pain points: {json.dumps(state['pain-points'])}\n\n"
        f"Existing solutions:\n{state['existing-solutions']}\n\n"
        'Return JSON shaped like {"hypotheses": [{"statement": "string", "test": "string", '
        '"signal": "string"}]}',
        system=DISCOVERY, small=False)


async def size_opportunity(w: Writer, state: State) -> str:
    return await w.write(
        "Estimate the size of the opportunity bottom-up (segments x reachable customers x "
        "willingness to pay). Show the arithmetic and label every assumption.\n\n"
        f"Brief:\n{_brief(state)}\n\nHypotheses: {json.dumps(state['hypotheses'])}",
        system=DISCOVERY, max_tokens=1200)


async def risks(w: Writer, state: State) -> str:
    return await w.write(
        "List the five biggest risks to pursuing this opportunity (market, technical, "
        "regulatory, go-to-market), each with a mitigation, as a Markdown list.\n\n"
        f"Opportunity sizing:\n{state['size-opportunity']}",
        system=DISCOVERY, max_tokens=700, small=True)


async def next_steps(w: Writer, state: State) -> str:
    return await w.write(
        "Recommend the next four weeks of discovery work: which hypotheses to test first, "
        "how, with whom, and what result would change the plan.\n\n"
        f"Hypotheses: {json.dumps(state['hypotheses'])}\n\nRisks:\n{state['risks']}",
        system=DISCOVERY, max_tokens=900)


async def compile_discovery(w: Writer, state: State) -> dict[str, Any]:
    sections = [state[k] for k in ("map-stakeholders", "existing-solutions",
                                   "size-opportunity", "risks", "recommend-next-steps")]
    summary = await w.write(
        "Write a one-page discovery summary for the leadership team: the problem, the "
        "evidence, the opportunity, the recommendation.\n\n" + "\n\n".join(sections),
        system=DISCOVERY, max_tokens=900, stream=True)
    problem = state["frame-problem"].get("problem_statement", "Discovery report")
    return {"title": problem, "markdown": "\n\n".join([f"# Discovery: {problem}", summary,
                                                         *sections]),
            "cost": await w.cost()}


DISCOVERY_REPORT = Pipeline("generate-discovery-report", "reports/discovery.requested", (
    ("frame-problem", frame_problem),
    ("map-stakeholders", map_stakeholders),
    ("pain-points", pain_points),
    ("existing-solutions", existing_solutions),
    ("hypotheses", hypotheses),
    ("size-opportunity", size_opportunity),
    ("risks", risks),
    ("recommend-next-steps", next_steps),
    ("compile", compile_discovery),
))


# -- generate-hybrid-report: market research and customer discovery, cross-checked -------

async def plan_hybrid(w: Writer, state: State) -> Any:
    return await w.data(
        "Plan a report that combines desk research on the market with customer discovery "
        f"on the problem.\n\n{_brief(state)}\n\n"
        'Return JSON shaped like {"title": "string", "research_questions": ["string"], '
        '"discovery_questions": ["string"]}',
        system=ANALYST)


async def research_landscape(w: Writer, state: State) -> Any:
    return await w.draft(
        "Answer these research questions about the market: size and growth, main players "
        "and their positioning, pricing norms, recent shifts.\n\n"
        f"Questions: {json.dumps(state['plan'].get('research_questions', []))}",
        system=ANALYST, max_tokens=1600)


async def discovery_findings(w: Writer, state: State) -> Any:
    return await w.data(
        "Answer these discovery questions from the customer's point of view, using the "
        "interview notes where available.\n\n"
        f"Questions: {json.dumps(state['plan'].get('discovery_questions', []))}\n"
        f"Notes: {state['input'].get('interview_notes', 'none provided')}\n\n"
        'Return JSON shaped like {"findings": [{"question": "string", "answer": "string", '
        '"confidence": "string"}]}',
        system=DISCOVERY, small=False)


async def cross_reference(w: Writer, state: State) -> str:
    return await w.write(
        "Cross-reference the market research with the customer findings: where do they "
        "agree, where do they conflict, and what does each miss?\n\n"
        f"Research:\n{state['research-landscape']}\n\n"
        f"Findings: {json.dumps(state['discovery-findings'])}",
        system=ANALYST, max_tokens=1200)


async def thesis(w: Writer, state: State) -> str:
    return await w.write(
        "State the opportunity thesis in one paragraph, then the three pieces of evidence "
        f"that support it most and the one that threatens it most.\n\n"
        f"{state['cross-reference']}",
        system=ANALYST, max_tokens=800)


async def strategy(w: Writer, state: State) -> Any:
    return await w.draft(
        "Write the strategy section: target segment, positioning, pricing approach and "
        f"go-to-market motion, each justified by the evidence.\n\nThesis:\n{state['thesis']}",
        system=ANALYST, max_tokens=1600)


async def roadmap(w: Writer, state: State) -> str:
    return await w.write(
        "Write a two-quarter roadmap as a Markdown table (milestone, owner role, success "
        f"metric, dependency).\n\nStrategy:\n{state['strategy']}",
        system=ANALYST, max_tokens=1000)


async def hybrid_summary(w: Writer, state: State) -> str:
    return await w.write(
        "Write the executive summary: what we learned from the market, what we learned "
        "from customers, the thesis, and the decision we ask for.\n\n"
        f"Thesis:\n{state['thesis']}\n\nStrategy:\n{state['strategy']}",
        system=ANALYST, max_tokens=700)


async def quality_review(w: Writer, state: State) -> dict[str, Any]:
    verdict = await w.data(
        "Check this summary for claims that the research or the customer findings do not "
        f"support.\n\nSummary:\n{state['executive-summary']}\n\n"
        'Return JSON shaped like {"unsupported_claims": ["string"], "ready": true}',
        system=ANALYST)
    title = state["plan"].get("title", "Hybrid report")
    parts = [state[k] for k in ("executive-summary", "research-landscape", "cross-reference",
                                "thesis", "strategy", "roadmap")]
    return {"title": title, "markdown": "\n\n".join([f"# {title}", *parts]),
            "review": verdict, "cost": await w.cost()}


HYBRID_REPORT = Pipeline("generate-hybrid-report", "reports/hybrid.requested", (
    ("plan", plan_hybrid),
    ("research-landscape", research_landscape),
    ("discovery-findings", discovery_findings),
    ("cross-reference", cross_reference),
    ("thesis", thesis),
    ("strategy", strategy),
    ("roadmap", roadmap),
    ("executive-summary", hybrid_summary),
    ("quality-review", quality_review),
))

PIPELINES = (REPORT, DISCOVERY_REPORT, HYBRID_REPORT)
