"""Every fenced block of every Markdown file is run as written, or says why not.

A block's info string is its language, then one marker (GitHub highlights by the first
word and ignores the rest)::

    ```bash run              bash -euo pipefail, in the repository, with .venv on PATH
    ```bash run:gateway      ... with a local dev gateway running (INNGEST_DEV=its URL)
    ```bash run:worker       ... and a worker of examples.pipeline connected to it
    ```python run            the block as a script (python, in the repository); the
                             same :gateway / :worker suffixes apply
    ```yaml check            parsed (yaml, json, python: syntax only), not run
    ```text output           what a command above prints (tables, log lines)
    ```text                  prose in a box: diagrams, file trees, synopses
    ```bash skip: REASON     not run; REASON names the test that runs it instead, or
                             what this machine lacks (a Docker engine, an account)

A block with no marker fails ``test_every_sample_is_marked`` with its file and line, so a
new sample cannot drift unnoticed: mark it, and it is run from then on. Placeholders
such as ``RUN_ID`` or ``myapp`` cannot run; write the sample so it can (``RUN=$(...)``,
``examples.pipeline``) or mark it skip with the test that covers it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from connect_worker.devserver import DevServer, DevServerConfig
from connect_worker.lab.fleet import WorkerProcess

from .test_docs import MARKDOWN, REPO

FENCE = re.compile(r"^(\s*)(```+)(.*)$")
MARKERS = ("run", "run:gateway", "run:worker", "check", "output", "skip:")
PROSE = ("text", "output")
TIMEOUT = 180


@dataclass(frozen=True)
class Sample:
    path: Path
    line: int
    lang: str
    marker: str  # "" when the block has none
    reason: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def samples(path: Path, text: str | None = None) -> list[Sample]:
    found: list[Sample] = []
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        indent, fence, info = opened.groups()
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent):] if lines[index].startswith(indent)
                        else lines[index])
            index += 1
        start = index - len(body)
        index += 1
        words = info.strip().split(maxsplit=1)
        lang = words[0] if words else ""
        rest = words[1].strip() if len(words) > 1 else ""
        marker, reason = rest, ""
        if rest.startswith("skip:"):
            marker, reason = "skip:", rest[len("skip:"):].strip()
        if lang in PROSE and not rest:
            marker = lang
        found.append(Sample(path, start, lang, marker, reason, "\n".join(body) + "\n"))
    return found


SAMPLES = [s for doc in MARKDOWN for s in samples(doc)]
RUNNABLE = [s for s in SAMPLES if s.marker.startswith("run")]
CHECKED = [s for s in SAMPLES if s.marker == "check"]


def test_every_sample_is_marked() -> None:
    unmarked = [f"{s.where}: ```{s.lang} has no marker (one of {', '.join(MARKERS)}, or "
                "```text for prose)" for s in SAMPLES if s.marker not in MARKERS + PROSE]
    skipped_without_reason = [s.where for s in SAMPLES if s.marker == "skip:" and
                              len(s.reason) < 15]
    runnable_kinds = [f"{s.where}: only bash, sh and python blocks run" for s in RUNNABLE
                      if s.lang not in ("bash", "sh", "python")]
    problems = unmarked + [f"{w}: say why it is skipped" for w in skipped_without_reason]
    problems += runnable_kinds
    assert not problems, "\n".join(problems)


def test_the_marker_parser_sees_what_a_reader_sees() -> None:
    text = ("x\n```bash run:worker\necho 1\n```\n  ```text\n  a\n  ```\n"
            "```python skip: the official SDK's own test covers it\npass\n```\n```py\n```\n")
    parsed = samples(REPO / "docs" / "probe.md", text)
    assert [(s.lang, s.marker, s.code) for s in parsed] == [
        ("bash", "run:worker", "echo 1\n"), ("text", "text", "a\n"),
        ("python", "skip:", "pass\n"), ("py", "", "\n")]
    assert parsed[2].reason == "the official SDK's own test covers it"


@pytest.mark.parametrize("sample", CHECKED, ids=lambda s: s.where)
def test_config_samples_parse(sample: Sample) -> None:
    if sample.lang in ("yaml", "yml"):
        yaml.safe_load(sample.code)
    elif sample.lang == "toml":
        tomllib.loads(sample.code)
    elif sample.lang == "python":
        compile(sample.code, sample.where, "exec")
    else:
        import json

        for line in sample.code.splitlines():
            if line.strip():
                json.loads(line)


def _env(extra: dict[str, str]) -> dict[str, str]:
    ours = ("INNGEST_", "CONNECT_WORKER_", "RAILWAY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@asynccontextmanager
async def _services(sample: Sample) -> AsyncIterator[dict[str, str]]:
    async with AsyncExitStack() as stack:
        if sample.marker == "run":
            yield {}
            return
        dev = await stack.enter_async_context(DevServer(DevServerConfig.fast()))
        if sample.marker == "run:worker":
            worker = await stack.enter_async_context(WorkerProcess(
                "examples.pipeline", api_url=dev.api_url, instance_id="docs-worker",
                env={"STEP_SECONDS": "0.05"}))
            await worker.wait_ready(dev)
        yield {"INNGEST_DEV": dev.api_url}


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("sample", RUNNABLE, ids=lambda s: s.where)
async def test_runnable_samples_run_as_written(sample: Sample, tmp_path: Path) -> None:
    async with _services(sample) as extra:
        if sample.lang == "python":
            script = tmp_path / "sample.py"
            script.write_text(sample.code)
            argv = [sys.executable, str(script)]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", sample.code]
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=_env({"PYTHONPATH": str(REPO), **extra}),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{sample.where} exited {proc.returncode}:\n{text[-3000:]}"
