"""The package layout's import rule, read from the source (ast) of every module.

The rule (imports run one way, downwards)::

    top level   __init__, __main__, cli, devclient, config, context, errors: the public API
                and the CLI (devclient: its commands against a running dev gateway)
    engine      the product: worker, session, userloop, executor, gateway_api, target
    ops         health, httpserver, metrics, logs, check
    protocol    the sans-I/O wire layer
    llm         the LLM step toolkit
    devserver   the local Connect gateway (tests, demo, `connect-worker dev`)
    lab         demo, simulate, bench, timeline: tools that drive the engine

    1. engine, ops, protocol and llm never import devserver or lab, not even inside a
       function or under TYPE_CHECKING: the product must not depend on its test rig.
    2. protocol imports nothing of engine, ops, devserver, lab or llm (only the top-level
       errors module): it is the bottom layer.
    3. devserver never imports lab; nothing outside lab imports it except the CLI, lazily.
    4. The top-level modules do not import lab or devserver at import time (the CLI may,
       inside the function of the subcommand that needs it), so `import connect_worker`
       and `connect-worker run` never load the test rig.

    5. Layers, bottom to top (``LAYERS``); an import may point down or within its own
       layer, never up; engine and llm, peers, never import each other:

           foundation  errors, config, context (and the package's __version__)
           protocol
           ops         used by the engine (tracing, logs, metrics) and the LLM toolkit
           engine | llm   (peers: neither imports the other)
           app         compat, devclient: commands built on the engine
           devserver
           lab
           entry       cli, __main__: the program; loads any layer, lazily

       ``UPWARD_ALLOWED`` lists the one deliberate exception. A string handed to
       ``importlib.import_module`` counts as an import, so the rule cannot be hidden.

Rules 1-3 and 5 are checked on every ``import`` statement anywhere in a module; rule 4 on
module-level statements (outside functions and ``if TYPE_CHECKING:`` blocks), and once
more in a fresh interpreter by importing the public modules and looking at
``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "connect_worker"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
SUBPACKAGES = ("engine", "ops", "protocol", "llm", "devserver", "lab")
PRODUCT = ("engine", "ops", "protocol", "llm")
RIG = ("devserver", "lab")


@dataclass(frozen=True)
class Import:
    module: str  # importing module, e.g. connect_worker.engine.worker
    target: str  # imported module, absolute, e.g. connect_worker.protocol.codec
    line: int
    at_import_time: bool  # module level, not inside a function or `if TYPE_CHECKING:`
    type_only: bool = False  # under `if TYPE_CHECKING:` (for annotations only)

    def __str__(self) -> str:
        path = self.module.replace(".", "/")
        return f"{path}.py:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        # The package a relative import is relative to.
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[Import] = []
        self._deferred = 0  # depth of functions / TYPE_CHECKING blocks
        self._type_only = 0  # depth of TYPE_CHECKING blocks

    def _add(self, target: str, node: ast.stmt) -> None:
        self.found.append(Import(self.module, target, node.lineno, self._deferred == 0,
                                 self._type_only > 0))

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("connect_worker.x"): an import all the same.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (name == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            self.found.append(Import(self.module, node.args[0].value, node.lineno,
                                     self._deferred == 0, self._type_only > 0))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base)
            target = f"{prefix}.{node.module}" if node.module else prefix
        else:
            target = node.module or ""
        self._add(target, node)
        # `from . import codec` imports a submodule: record it too.
        for alias in node.names:
            self._add(f"{target}.{alias.name}", node)

    def _deferred_block(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = _deferred_block
    visit_AsyncFunctionDef = _deferred_block
    visit_Lambda = _deferred_block

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._deferred += 1
            self._type_only += 1
            for child in node.body:
                self.visit(child)
            self._deferred -= 1
            self._type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def _imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(SRC.rglob("*.py")):
        collector = _Collector(_module_name(path).removesuffix(".__init__"),
                               path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found.extend(collector.found)
    return found


IMPORTS = _imports()


def _area(module: str) -> str:
    """'engine', 'lab', ... for a module of ours; 'top' for a top-level module."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "top"


def _ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _violations(from_areas: tuple[str, ...], to_areas: tuple[str, ...], *,
                only_import_time: bool = False) -> list[str]:
    return [str(i) for i in IMPORTS
            if _area(i.module) in from_areas and _ours(i.target)
            and _area(i.target) in to_areas and i.target != PACKAGE
            and (i.at_import_time or not only_import_time)]


def test_the_collector_sees_the_imports_it_must_judge() -> None:
    """Guards the test itself: relative imports resolve, function-level ones are seen."""
    pairs = {(i.module, i.target, i.at_import_time) for i in IMPORTS}
    assert ("connect_worker.engine.worker", "connect_worker.protocol", True) in pairs
    assert ("connect_worker.protocol.connection", "connect_worker.protocol.codec", True) in pairs
    # The CLI loads the demo only when asked to: found, and marked as deferred.
    assert ("connect_worker.cli", "connect_worker.lab.demo", False) in pairs
    assert ("connect_worker.cli", "connect_worker.devserver", False) in pairs
    # `if TYPE_CHECKING:` imports are deferred too.
    assert ("connect_worker", "connect_worker.engine.worker", False) in pairs
    areas = {_area(i.module) for i in IMPORTS}
    assert set(SUBPACKAGES) | {"top"} <= areas
    top = {i.module.rpartition(".")[2] for i in IMPORTS if _area(i.module) == "top"}
    assert {"cli", "config", "context", "errors"} <= top | {"connect_worker"}


def test_product_never_imports_the_dev_gateway_or_the_lab() -> None:
    assert _violations(PRODUCT, RIG) == []


def test_protocol_is_the_bottom_layer() -> None:
    assert _violations(("protocol",), ("engine", "ops", "llm", "devserver", "lab")) == []


def test_only_the_lab_and_the_cli_import_the_lab() -> None:
    outside = [str(i) for i in IMPORTS
               if _ours(i.target) and _area(i.target) == "lab"
               and _area(i.module) != "lab"
               and not (i.module == f"{PACKAGE}.cli" and not i.at_import_time)]
    assert outside == []


def test_public_modules_do_not_load_the_rig_at_import_time() -> None:
    assert _violations(("top",), RIG, only_import_time=True) == []


_PROBE = """
import json, sys
import connect_worker, connect_worker.cli, connect_worker.config, connect_worker.context
import connect_worker.errors
from connect_worker import Config, Worker  # the lazy attributes load the engine
print(json.dumps(sorted(sys.modules)))
"""


def test_public_modules_do_not_load_the_rig_in_a_fresh_interpreter() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert f"{PACKAGE}.engine.worker" in loaded  # the probe did load the engine
    leaked = [m for m in loaded if _ours(m) and _area(m) in RIG]
    assert leaked == []


@pytest.mark.parametrize("area", SUBPACKAGES)
def test_every_subpackage_named_in_the_rule_exists(area: str) -> None:
    assert (SRC / area / "__init__.py").is_file()


def _module_of(target: str, modules: set[str]) -> str:
    """The module ``target`` names (``from x import name`` records ``x.name`` too)."""
    parts = target.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def test_no_import_cycle_between_our_modules() -> None:
    """Any import that runs counts, inside functions too (a deferred import hides a cycle
    from the interpreter, not from the reader). Not an edge: an import under
    TYPE_CHECKING (annotations only: never runs), and a module importing its own package
    (``from . import x`` is how a sibling is reached)."""
    modules = {i.module for i in IMPORTS}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in IMPORTS:
        target = _module_of(i.target, modules) if _ours(i.target) else ""
        if (target and not i.type_only and target != i.module
                and not i.module.startswith(target + ".")):
            graph[i.module].add(target)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(modules):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


#: Bottom to top (rule 5). Top-level modules are named by their module; subpackages by area.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "config", "context"),
    ("protocol",),
    ("ops",),
    ("engine", "llm"),
    ("compat", "devclient"),
    ("devserver",),
    ("lab",),
    ("cli", "__main__"),
)
#: (importing module, imported module) pairs that may point up, and why.
UPWARD_ALLOWED = {
    # rss-curve's child process runs `connect-worker run` itself, under tracemalloc: it
    # measures the program as deployed, so it calls the program's entry point.
    ("connect_worker.lab.rss_curve", "connect_worker.cli"),
}


def _layer_area(module: str) -> str | None:
    """The name ``LAYERS`` knows ``module`` by; None for the package itself (its
    ``__init__`` is the public facade: it holds ``__version__`` and imports lazily)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return None
    return parts[1]


def _rank(area: str) -> int:
    return next(n for n, layer in enumerate(LAYERS) if area in layer)


def test_every_module_has_a_layer() -> None:
    modules = {i.module for i in IMPORTS} | {
        _module_name(p).removesuffix(".__init__") for p in SRC.glob("*.py")}
    unplaced = {a for m in modules if (a := _layer_area(m)) is not None
                and not any(a in layer for layer in LAYERS)}
    assert unplaced == set()


def test_no_import_points_up_the_layers() -> None:
    """Rule 5, over every import that can run (TYPE_CHECKING ones only name types)."""
    modules = {i.module for i in IMPORTS}
    upward: list[str] = []
    for i in IMPORTS:
        if not _ours(i.target) or i.type_only:
            continue
        target = _module_of(i.target, modules) or i.target
        src, dst = _layer_area(i.module), _layer_area(target)
        if src is None or dst is None or src == dst:
            continue
        peers = {src, dst} == {"engine", "llm"}
        if (_rank(dst) > _rank(src) or peers) and (i.module, target) not in UPWARD_ALLOWED:
            upward.append(f"{i} ({src} -> {dst})")
    assert upward == []


def test_the_layer_rule_sees_an_upward_import_hidden_in_importlib() -> None:
    """Guards rule 5 itself: a string import of the engine from ops would be caught."""
    tree = ast.parse('import importlib\n'
                     'def f():\n'
                     '    return importlib.import_module("connect_worker.engine.target")\n')
    collector = _Collector("connect_worker.ops.check", False)
    collector.visit(tree)
    assert [(i.target, i.at_import_time) for i in collector.found][-1] == (
        "connect_worker.engine.target", False)
    assert _rank("engine") > _rank("ops")
