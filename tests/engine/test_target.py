"""TARGET loading: the accepted forms and one clear error for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from connect_worker.engine.target import load_target
from connect_worker.errors import TargetError

APP = '''
import inngest
client = inngest.Inngest(app_id="{app}", is_production=False)

@client.create_function(fn_id="f", trigger=inngest.TriggerEvent(event="e/{app}"))
async def f(ctx):
    return 1

functions = [f]
'''


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_module_default_attributes() -> None:
    [(client, functions)] = load_target("examples.pipeline")
    assert client.app_id == "pipeline"
    assert {fn.id for fn in functions} == {"pipeline-report", "pipeline-long-report",
                                           "pipeline-blocking", "pipeline-sync-report"}


def test_file_path_and_attr(tmp_path: Path) -> None:
    path = write(tmp_path, "worker_a.py", APP.format(app="a") + "\nalias = functions\n")
    [(client, fns)] = load_target(str(path))
    assert client.app_id == "a" and len(fns) == 1
    [(client, fns)] = load_target(f"{path}:alias")
    assert client.app_id == "a"


def test_several_apps(tmp_path: Path) -> None:
    body = (
        "import inngest\n"
        + APP.format(app="one").replace("client", "c1").replace("functions", "f1")
        .replace("def f(", "def g(").replace("[f]", "[g]")
        + APP.format(app="two").replace("client", "c2").replace("functions", "f2")
        + "\napps = [(c1, f1), (c2, f2)]\n"
    )
    path = write(tmp_path, "multi.py", body)
    apps = load_target(f"{path}:apps")
    assert [c.app_id for c, _ in apps] == ["one", "two"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "TARGET is empty"),
        ("no_such_module_xyz", "not found"),
        ("examples.pipeline:nope", "has no attribute 'nope'"),
        ("examples.pipeline:a:b", "must look like"),
        ("/nonexistent/file.py", "does not exist"),
        ("examples.pipeline:client", "non-empty list of inngest functions"),
    ],
)
def test_errors_are_actionable(target: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        load_target(target)


def test_missing_client(tmp_path: Path) -> None:
    path = write(tmp_path, "bare.py", "functions = []\n")
    with pytest.raises(TargetError, match="must define `client`"):
        load_target(str(path))


def test_import_error_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    with pytest.raises(TargetError, match="RuntimeError: boom"):
        load_target(str(path))


def test_import_error_points_at_the_users_lines(tmp_path: Path) -> None:
    """The failing line in the user's files (file:line and the code), most recent last,
    then where it finally raised when that is inside a library."""
    write(tmp_path, "settings_xyz.py",
          "import os\n\ndef load():\n    return os.environ['NO_SUCH_KEY_XYZ']\n")
    path = write(tmp_path, "app_xyz.py", "import settings_xyz\nKEY = settings_xyz.load()\n")
    with pytest.raises(TargetError) as caught:
        load_target(str(path))
    lines = str(caught.value).splitlines()
    assert lines[0] == f"importing {str(path)!r} failed: KeyError: 'NO_SUCH_KEY_XYZ'"
    assert lines[1] == f"  at {path}:2 in <module>: KEY = settings_xyz.load()"
    assert lines[2] == (f"  at {tmp_path / 'settings_xyz.py'}:4 in load: "
                        "return os.environ['NO_SUCH_KEY_XYZ']")
    assert lines[3].startswith("  raised in ") and "__getitem__" in lines[3]
    assert len(lines) == 4


def test_syntax_error_and_missing_dependency_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "typo_xyz.py", "x = 1\ndef f(:\n    pass\n")
    with pytest.raises(TargetError) as caught:
        load_target(str(path))
    assert str(caught.value).splitlines()[-1] == f"  at {path}:2: def f(:"
    # A module that exists but imports one that does not: not "TARGET not found".
    write(tmp_path, "needs_xyz.py", "import not_installed_pkg_xyz\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(TargetError) as caught:
            load_target("needs_xyz")
    finally:
        sys.path.remove(str(tmp_path))
    message = str(caught.value)
    assert message.startswith("importing 'needs_xyz' failed: ModuleNotFoundError: "
                              "No module named 'not_installed_pkg_xyz'")
    assert "needs_xyz.py:1 in <module>: import not_installed_pkg_xyz" in message
