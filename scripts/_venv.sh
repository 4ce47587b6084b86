# Sourced by scripts/test, scripts/demo and scripts/bench: creates .venv with exactly the
# versions in requirements-dev.lock (hash-checked; renew with scripts/lock) and the
# project on top, reinstalling only when pyproject.toml or the lock changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.connect-worker-installed"
want="$(cat "$root/pyproject.toml" "$root/requirements-dev.lock" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade "pip>=25.1"
  "${pip[@]}" --require-hashes -r "$root/requirements-dev.lock"
  "${pip[@]}" --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
