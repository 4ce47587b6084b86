"""Mutation testing of one engine module against its fast unit tests.

    .venv/bin/python scripts/mutants.py                      # engine/delivery.py
    .venv/bin/python scripts/mutants.py MODULE TESTS [--only N]

Each mutant changes one thing in the module's source: a comparison flipped (== / !=,
is / is not, < / <=, in / not in), ``and`` / ``or`` swapped, a ``not`` dropped, ``+`` /
``-`` swapped, a number or a boolean changed, or one statement deleted. The mutant is
executed into the imported module (and the test module's imported names rebound), and
the tests run in this process (pytest, each test under a 10 s timeout); a mutant is
killed when a test fails. Prints the survivors with their line; a run over delivery.py
takes a few minutes. (mutmut does the same with a copy of the tree per run; the step
ledger's table has its own script, step_table_mutants.py.)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

SWAPS: dict[type[ast.AST], type[ast.AST]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
}
DELETABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.If,
             ast.With, ast.AsyncWith, ast.Raise, ast.Assert)


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            out.add(id(body[0]))
    return out


def mutants(tree: ast.Module) -> Iterator[tuple[str, int, ast.Module]]:
    """(what, line, mutated tree) for every mutant of ``tree``."""
    docstrings = _docstrings(tree)
    sites: list[tuple[str, int, list[int]]] = []  # (what, line, path of indices)
    nodes = list(ast.walk(tree))
    index = {id(n): i for i, n in enumerate(nodes)}
    for node in nodes:
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    sites.append((f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", line,
                                  [index[id(node)], k]))
        elif isinstance(node, ast.BoolOp | ast.BinOp) and type(node.op) in SWAPS:
            sites.append((f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}",
                          line, [index[id(node)]]))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            sites.append(("drop not", line, [index[id(node)]]))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            sites.append((f"constant {node.value!r}", line, [index[id(node)]]))
        if isinstance(node, DELETABLE) and id(node) not in docstrings and \
                not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            sites.append((f"delete {type(node).__name__.lower()}", line, [index[id(node)]]))
    for what, line, path in sites:
        mutated = copy.deepcopy(tree)
        target = list(ast.walk(mutated))[path[0]]
        _mutate(mutated, target, what, path[1:])
        ast.fix_missing_locations(mutated)
        yield what, line, mutated


def _mutate(tree: ast.Module, node: ast.AST, what: str, rest: list[int]) -> None:
    if isinstance(node, ast.Compare):
        node.ops[rest[0]] = SWAPS[type(node.ops[rest[0]])]()
    elif isinstance(node, ast.BoolOp | ast.BinOp) and not what.startswith("delete"):
        node.op = SWAPS[type(node.op)]()  # type: ignore[assignment]
    elif isinstance(node, ast.UnaryOp):
        _replace(tree, node, node.operand)
    elif isinstance(node, ast.Constant):
        value = node.value
        node.value = (not value) if isinstance(value, bool) else (
            value + 1 if value == 0 else value * 2 if isinstance(value, float) else value + 1)
    else:
        _replace(tree, node, ast.Pass())


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                setattr(parent, name, [new if v is old else v for v in value])
                return


def run_tests(tests: str) -> bool:
    """True if every test passes (output swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = pytest.main([tests, "-x", "-q", "-p", "no:cacheprovider", "-o", "timeout=10",
                            "-W", "ignore"])
    return code == 0


def install(module: ModuleType, tree: ast.Module, users: list[ModuleType],
            original: dict[str, object]) -> None:
    """Run ``tree`` as ``module``'s code and point the test modules at its names."""
    namespace = module.__dict__
    namespace.clear()
    # Only the module's identity: a deleted assignment must leave its name undefined.
    namespace.update({k: v for k, v in original.items() if k.startswith("__")})
    exec(compile(tree, str(module.__file__), "exec"), namespace)
    for user in users:
        for name, value in list(vars(user).items()):
            if original.get(name) is value and name in namespace:
                setattr(user, name, namespace[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", nargs="?", default="connect_worker.engine.delivery")
    parser.add_argument("tests", nargs="?", default="tests/engine/test_delivery.py")
    parser.add_argument("--only", type=int, help="run mutant number N only")
    args = parser.parse_args()
    module = importlib.import_module(args.module)
    source = Path(str(module.__file__)).read_text()
    tree = ast.parse(source)
    if not run_tests(args.tests):
        print("the tests fail without a mutation", file=sys.stderr)
        return 2
    test_module = importlib.import_module(
        args.tests.removesuffix(".py").replace("/", "."))
    original = dict(module.__dict__)
    saved = dict(vars(test_module))
    survivors, total = [], 0
    for number, (what, line, mutated) in enumerate(mutants(tree)):
        if args.only is not None and number != args.only:
            continue
        total += 1
        try:
            install(module, mutated, [test_module], original)
            killed = not run_tests(args.tests)
        except Exception as exc:
            killed, what = True, f"{what} (does not load: {exc})"
        finally:
            module.__dict__.clear()
            module.__dict__.update(original)
            vars(test_module).update(saved)
        if not killed:
            text = source.splitlines()[line - 1].strip() if line else ""
            survivors.append(f"#{number} line {line}: {what}: {text}")
            print("survived:", survivors[-1], flush=True)
    print(f"{total} mutants, {total - len(survivors)} killed, {len(survivors)} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
