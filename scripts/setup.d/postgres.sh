#!/usr/bin/env bash
# Makes a PostgreSQL server reachable for tests/llm (the shared LLM result cache) and writes
# its DSN to $CONNECT_WORKER_TEST_POSTGRES_DSN_FILE (default /tmp/connect-worker-test-postgres.dsn).
# Idempotent: a reachable server is reused; otherwise Debian's postgresql is installed when
# missing (apt-get update only if the package is unknown), a cluster is started on loopback,
# and a test role and database are created. Runs as root (CI) or with passwordless sudo.
set -euo pipefail

dsn_file="${CONNECT_WORKER_TEST_POSTGRES_DSN_FILE:-/tmp/connect-worker-test-postgres.dsn}"
user=connect_worker
password=connect_worker
db=connect_worker_test
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The check needs psycopg: the project's venv has it (scripts/test creates it first).
python_bin="$root/.venv/bin/python"
[ -x "$python_bin" ] || python_bin="$(command -v python3 || command -v python)"

reachable() {
  "$python_bin" - "$1" <<'PY' >/dev/null 2>&1
import sys, psycopg
psycopg.connect(sys.argv[1], connect_timeout=3).close()
PY
}

done_with() {
  printf '%s\n' "$1" > "$dsn_file"
  echo "postgres: ready, DSN in $dsn_file"
  exit 0
}

if [ -n "${CONNECT_WORKER_TEST_POSTGRES_DSN:-}" ]; then
  if reachable "$CONNECT_WORKER_TEST_POSTGRES_DSN"; then done_with "$CONNECT_WORKER_TEST_POSTGRES_DSN"; fi
  echo "postgres: CONNECT_WORKER_TEST_POSTGRES_DSN is set but not reachable" >&2
  exit 1
fi
if [ -s "$dsn_file" ] && reachable "$(cat "$dsn_file")"; then done_with "$(cat "$dsn_file")"; fi

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
  else
    echo "postgres: need root (or passwordless sudo) to install/start PostgreSQL; tests that" \
         "need it will fail in CI and be skipped locally" >&2
    exit 0
  fi
}

if ! command -v pg_lsclusters >/dev/null || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  export DEBIAN_FRONTEND=noninteractive
  if ! as_root apt-get install -y -q --no-install-recommends postgresql >/dev/null; then
    as_root apt-get update -q >/dev/null
    as_root apt-get install -y -q --no-install-recommends postgresql >/dev/null
  fi
fi

cluster="$(pg_lsclusters --no-header | head -n 1 || true)"
if [ -z "$cluster" ]; then
  version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
  as_root pg_createcluster "$version" main >/dev/null
  cluster="$(pg_lsclusters --no-header | head -n 1)"
fi
read -r version name port status _ <<<"$cluster"
if [ "$status" != online ]; then
  as_root pg_ctlcluster "$version" "$name" start
fi

psql_admin() { as_root runuser -u postgres -- psql -X -q -p "$port" -v ON_ERROR_STOP=1 "$@"; }
psql_admin -c "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN
    CREATE ROLE $user LOGIN PASSWORD '$password';
  END IF; END \$\$;"
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE $db OWNER $user"
fi

dsn="postgresql://$user:$password@127.0.0.1:$port/$db"
for _ in 1 2 3 4 5 6 7 8 9 10; do
  if reachable "$dsn"; then done_with "$dsn"; fi
  sleep 1  # the server may still be opening its socket right after start
done
echo "postgres: started cluster $version/$name but cannot connect with $dsn" >&2
exit 1
