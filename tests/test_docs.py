"""The docs against the code: a cheap check for the drift a reader would trip over.

For every Markdown file of the repository (README.md, docs/, package READMEs):

* every relative link resolves to a file inside the repository (and its #anchor to a
  heading), every other link is a public https:// URL;
* every repository path in backticks (`engine/userloop.py`, `deploy/kubernetes/`)
  exists, every `connect_worker.x.y` names an importable module or attribute, and
  every `test_name` is a test that exists;
* every environment variable it names (`CONNECT_WORKER_*`, `INNGEST_*`, `RAILWAY_*`)
  is read somewhere in the code.

And no file of the repository names an absolute path of the machine it was written on,
or the private notes the first versions were written from.
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "node_modules", "out", "__pycache__", ".mypy_cache",
             ".ruff_cache", ".pytest_cache", ".hypothesis", "dist", ".connect-worker"}
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yml", ".yaml", ".json", ".sh", ".proto", ".txt",
                 ".cfg", ".ini", ""}
# Names in backticks that are other projects' files, not ours.
FOREIGN = {"railway.json", "CONNECT_SDK_SPEC.md"}
FOREIGN_PREFIXES = ("pkg/", "packages/")
# Built so that this file does not match itself.
MACHINE_PATHS = re.compile("|".join([
    "/" + "work/", "/" + "home/[a-z]", "/" + "Users/", r"\.\./" + "shared/",
    "connect-" + r"protocol\.md", "ARCHITECTURE" + r"\.md",
]))


def _walk(suffixes: set[str]) -> list[Path]:
    found = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in parts):
            continue
        if path.is_file() and path.suffix in suffixes:
            found.append(path)
    return sorted(found)


MARKDOWN = _walk({".md"})


def _prose(path: Path) -> str:
    """The file without fenced code blocks (their contents are examples, not links)."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(path).splitlines()
            if line.startswith("#")}


def _links(path: Path) -> list[str]:
    text = _prose(path)
    inline = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    references = re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, re.MULTILINE)
    return inline + references


def _ticked(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _prose(path))


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_inside_the_repository_or_are_public(doc: Path) -> None:
    problems = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            if not target.startswith("https://") or re.match(
                    r"https://(localhost|127\.|\[::1\])", target):
                problems.append(f"{target}: not a public https:// URL")
            continue
        where, _, anchor = target.partition("#")
        resolved = (doc.parent / where).resolve() if where else doc
        if not resolved.is_relative_to(REPO):
            problems.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: no heading #{anchor}")
    assert problems == []


@cache
def _basenames() -> set[str]:
    return {p.name for p in _walk(TEXT_SUFFIXES | {".py"})} | {
        p.name for p in REPO.rglob("*") if p.is_dir()
        and not set(p.relative_to(REPO).parts) & SKIP_DIRS}


def _path_exists(token: str, doc: Path) -> bool:
    path = token.rstrip("/")
    if "*" in path:
        return any(REPO.glob(path)) or any((REPO / "src" / "connect_worker").glob(path))
    bases = (REPO, REPO / "src", REPO / "src" / "connect_worker", doc.parent)
    if any((base / path).exists() for base in bases):
        return True
    return "/" not in path and path in _basenames()


def _is_repo_path(token: str) -> bool:
    if token in FOREIGN or token.startswith(FOREIGN_PREFIXES) or " " in token:
        return False
    if re.fullmatch(r"[\w.*-]+(/[\w.*-]+)*\.(py|md|ya?ml|toml|json|sh|proto)", token):
        return True
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)*/", token))


@cache
def _test_names() -> set[str]:
    names = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        names.add(path.stem)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return names


def _importable(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


@cache
def _span_attributes() -> str:
    ops = REPO / "src" / "connect_worker" / "ops"
    return (ops / "_otel.py").read_text(encoding="utf-8") + (ops / "_genai.py").read_text(
        encoding="utf-8")


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_modules_and_tests_named_in_the_docs_exist(doc: Path) -> None:
    missing = []
    for token in _ticked(doc):
        if _is_repo_path(token):
            if not _path_exists(token, doc):
                missing.append(f"path {token}")
        elif re.fullmatch(r"connect_worker(\.\w+)+(\(\))?(\.\w+)*", token):
            # Span attributes share the name (docs/observability.md#traces): those must be
            # set, spelled out, by the tracing code.
            if not _importable(token.split("(")[0]) and f'"{token}"' not in _span_attributes():
                missing.append(f"module {token}")
        elif re.fullmatch(r"test_\w+(\[[^\]]*\])?", token):
            if token.split("[")[0] not in _test_names():
                missing.append(f"test {token}")
    assert missing == []


ENV_NAME = re.compile(r"\b(?:CONNECT_WORKER|INNGEST|RAILWAY)_[A-Z0-9_]*[A-Z0-9]\b")


@cache
def _env_names_in_code() -> set[str]:
    names: set[str] = set()
    this = Path(__file__).resolve()
    for folder in ("src", "examples", "scripts", "tests", ".railway"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", "") and path != this:
                names.update(ENV_NAME.findall(path.read_text(encoding="utf-8", errors="ignore")))
    return names


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_environment_variables_named_in_the_docs_are_read_by_the_code(doc: Path) -> None:
    unknown = sorted(set(ENV_NAME.findall(doc.read_text(encoding="utf-8")))
                     - _env_names_in_code())
    assert unknown == []


def test_the_checks_above_can_fail() -> None:
    """Guards the helpers: a wrong path, module, test or link is noticed."""
    doc = REPO / "docs" / "design.md"
    assert _is_repo_path("engine/userloop.py") and _path_exists("engine/userloop.py", doc)
    assert not _path_exists("engine/bridge.py", doc)
    assert _is_repo_path("deploy/kubernetes/") and not _is_repo_path("pkg/connect/gateway.go")
    assert _importable("connect_worker.engine.userloop.UserLoop")
    assert not _importable("connect_worker.userloop")
    assert "test_lost_reroute_race_is_cancelled_early" in _test_names()
    assert "what-the-official-clients-get-wrong-and-what-we-do-protocol-56" in _anchors(doc)
    assert "CONNECT_WORKER_DRAIN_TIMEOUT" in _env_names_in_code()
    assert "CONNECT_WORKER_DRAIN_BUDGET" not in _env_names_in_code()


def test_no_file_names_a_path_of_this_machine_or_the_private_notes() -> None:
    offenders = []
    for path in _walk(TEXT_SUFFIXES):
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATHS.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert offenders == []
