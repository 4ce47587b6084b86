# Sourced by scripts/test, scripts/demo and scripts/bench: creates .venv with the
# project and its dev tools, reinstalling only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.connect-worker-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=25.1"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root" --group "$root/pyproject.toml:dev"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
