#!/usr/bin/env bash
# promtool validates deploy/prometheus/*.yml in tests/ops/test_deploy_files.py.
# Idempotent: does nothing when promtool is already on PATH. Installs Debian's
# prometheus package (which ships promtool) only when running as root with apt-get;
# elsewhere it says what to install and leaves the test to fail in CI or skip locally.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: promtool is all we need, not a running server.
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package's post-install may start a server where an init system runs; tests only
  # need the binary. Stop it only if this script's install started it.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
  command -v promtool >/dev/null 2>&1 || { echo "promtool still missing after install" >&2; exit 1; }
  exit 0
fi
echo "promtool not found: install Debian's 'prometheus' package (or Prometheus' release" \
     "tarball) to run the deploy-file checks" >&2
