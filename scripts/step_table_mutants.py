"""Mutation testing of the step ledger's table (engine/steps.py TRANSITIONS).

    .venv/bin/python scripts/step_table_mutants.py

mutmut mutates function bodies; the ledger's behaviour is a module-level table, so this
mutates the table itself: each mutant deletes one row, turns one transition into a
self-loop, or drops one action. A mutant is killed when a test of
tests/engine/test_steps.py fails (the docs-table check aside: it would kill them all).
Prints the survivors; the pure ledger makes a run take a few minutes.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connect_worker.engine import steps
from tests.engine import test_steps

SKIP = {"test_design_doc_prints_the_current_table"}
TESTS: list[Callable[..., Any]] = [
    f for name, f in sorted(vars(test_steps).items())
    if name.startswith("test_") and callable(f) and name not in SKIP]


def failing_test() -> str | None:
    """The first test that fails against the current table, or None."""
    for test in TESTS:
        calls: list[dict[str, Any]] = [{}]
        if "state" in inspect.signature(test).parameters:  # the parametrized ones
            calls = [{"state": s} for s in (steps.StepState.ACKED, steps.StepState.OWNED)]
        for kwargs in calls:
            try:
                test(**kwargs)
            except BaseException:  # a failed assertion or a raised error
                return test.__name__
    return None


def main() -> int:
    if failing_test() is not None:
        print("the tests fail without a mutation", file=sys.stderr)
        return 2
    table = steps.TRANSITIONS
    original = dict(table)
    mutants: list[tuple[str, tuple[Any, Any], Any]] = []
    for key, (target, actions) in original.items():
        where = f"{key[0].value}+{key[1].value}"
        mutants.append((f"delete {where}", key, None))
        if target is not key[0]:
            mutants.append((f"self-loop {where} (not -> {target.value})", key,
                            (key[0], actions)))
        for action in actions:
            rest = tuple(a for a in actions if a is not action)
            mutants.append((f"drop {action.value} from {where}", key, (target, rest)))
    survivors = []
    for name, key, row in mutants:
        if row is None:
            del table[key]
        else:
            table[key] = row
        try:
            if failing_test() is None:
                survivors.append(name)
                print("survived:", name, flush=True)
        finally:
            table.clear()
            table.update(original)
    print(f"{len(mutants)} mutants, {len(mutants) - len(survivors)} killed, "
          f"{len(survivors)} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
