#!/usr/bin/env bash
# Node.js and the official TypeScript SDK (npm `inngest`, pinned in
# tests/contracts/ts/package-lock.json) for tests/contracts/test_ts_sdk.py.
# Idempotent: installs Debian's nodejs + npm only when node or npm is missing (as root
# with apt-get; apt-get update only if the packages are unknown), and runs `npm ci` only
# when the lock file changed since the last install. The SDK needs Node >= 20 (its
# Connect client uses the global WebSocket: `--experimental-websocket` on 20).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="$root/tests/contracts/ts"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends nodejs npm >/dev/null; then
      apt-get update -q >/dev/null
      apt-get install -y -q --no-install-recommends nodejs npm >/dev/null
    fi
  else
    echo "node: Node.js >= 20 and npm are missing: install them (Debian: nodejs, npm) to run" \
         "the TypeScript SDK contract test; it fails in CI and is skipped locally" >&2
    exit 0
  fi
fi

major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  echo "node: Node.js $(node --version) is too old for the inngest SDK (needs >= 20);" \
       "the TypeScript SDK contract test will say so" >&2
  exit 0
fi

stamp="$dir/node_modules/.connect-worker-lock"
want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# --ignore-scripts: no package needs a build step here, so none runs.
(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
echo "$want" > "$stamp"
echo "node: $(node --version), $(cd "$dir" && node -p '"inngest " + require("./node_modules/inngest/package.json").version') installed in tests/contracts/ts"
