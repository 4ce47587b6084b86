"""Loading the user's functions from a TARGET: ``pkg.module``, ``pkg.module:attr`` or
``path/to/file.py[:attr]``.

Without ``:attr`` the module must expose ``client`` (an ``inngest.Inngest``) and
``functions`` (a list of functions). With ``:attr`` the attribute may be a list of
functions (served with the module's ``client``) or a list of ``(client, functions)``
pairs for several apps. Every problem is a TargetError that says what to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import inngest

from ..errors import TargetError
from .executor import App

# Frames from these directories are the interpreter's and the libraries', not the user's.
_LIBRARY_DIRS = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
_NOT_USER = (
    *(str(Path(p).resolve()) + os.sep for p in _LIBRARY_DIRS),
    str(Path(__file__).resolve().parents[1]) + os.sep,  # connect_worker itself
)
MAX_FRAMES = 3


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    return not str(Path(filename).resolve()).startswith(_NOT_USER)


def _where(exc: BaseException) -> str:
    """The last frames of the traceback that are in the user's files, as
    ``  at app.py:12 in <module>: key = os.environ["X"]`` lines (most recent last), plus the
    line that raised when that is inside a library. A SyntaxError names its own line."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if _is_user_file(f.filename)]
    lines = [f"  at {_short(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
             for f in user[-MAX_FRAMES:]]
    if frames and user and frames[-1] is not user[-1]:
        last = frames[-1]
        lines.append(f"  raised in {_short(last.filename)}:{last.lineno} in {last.name}")
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        lines.append(f"  at {_short(exc.filename)}:{exc.lineno}: {(exc.text or '').strip()}")
    return "".join("\n" + line for line in lines)


def _short(filename: str) -> str:
    """Relative to the working directory when under it (what the user typed)."""
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return filename


def _failed(spec: str, exc: Exception) -> TargetError:
    return TargetError(f"importing {spec!r} failed: {type(exc).__name__}: {exc}{_where(exc)}")


def _import(spec: str) -> ModuleType:
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise TargetError(f"TARGET file {spec!r} does not exist")
        # Let the file import its siblings, as `python file.py` would.
        sys.path.insert(0, str(path.parent))
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise TargetError(f"TARGET file {spec!r} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise _failed(spec, exc) from exc
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and spec != exc.name and not spec.startswith(exc.name + "."):
            # The target exists; something it imports does not.
            raise _failed(spec, exc) from exc
        raise TargetError(
            f"TARGET module {spec!r} not found ({exc}); run from the project root or "
            "pass a path to the .py file"
        ) from exc
    except Exception as exc:
        raise _failed(spec, exc) from exc


def _check_functions(value: Any, where: str) -> list[inngest.Function[Any]]:
    if not isinstance(value, list | tuple) or not value:
        raise TargetError(f"{where} must be a non-empty list of inngest functions")
    for item in value:
        if not isinstance(item, inngest.Function):
            raise TargetError(
                f"{where} contains {item!r}, which is not an inngest function "
                "(decorate it with client.create_function)"
            )
    return list(value)


def _check_client(value: Any, where: str) -> inngest.Inngest:
    if not isinstance(value, inngest.Inngest):
        raise TargetError(f"{where} must be an inngest.Inngest client")
    return value


def load_target(spec: str) -> list[App]:
    """Import TARGET and return its apps as (client, functions) pairs."""
    if not spec:
        raise TargetError("TARGET is empty; give a module such as myapp.workers")
    module_part, _, attr = spec.partition(":")
    if spec.count(":") > 1 or (":" in spec and not attr):
        raise TargetError(f"TARGET {spec!r} must look like module, module:attr or file.py:attr")
    module = _import(module_part)
    if not attr:
        if not hasattr(module, "client") or not hasattr(module, "functions"):
            raise TargetError(
                f"{module_part} must define `client` (inngest.Inngest) and `functions` "
                "(a list), or name an attribute: TARGET=module:attr"
            )
        client = _check_client(module.client, f"{module_part}.client")
        return [(client, _check_functions(module.functions, f"{module_part}.functions"))]
    if not hasattr(module, attr):
        raise TargetError(f"{module_part} has no attribute {attr!r}")
    value = getattr(module, attr)
    where = f"{module_part}:{attr}"
    if isinstance(value, list | tuple) and value and all(
        isinstance(item, tuple) and len(item) == 2 for item in value
    ):
        apps: list[App] = []
        for index, (client, functions) in enumerate(value):
            apps.append((
                _check_client(client, f"{where}[{index}][0]"),
                _check_functions(functions, f"{where}[{index}][1]"),
            ))
        names = [c.app_id for c, _ in apps]
        if len(set(names)) != len(names):
            raise TargetError(f"{where} lists the same app id twice: {names}")
        return apps
    client = _check_client(getattr(module, "client", None), f"{module_part}.client")
    return [(client, _check_functions(value, where))]
