#!/usr/bin/env bash
# Debian's chromium drives the dev gateway page's test (tests/devserver/test_page.py,
# through Playwright with executable_path; Playwright never downloads a browser here).
# Idempotent: does nothing when /usr/bin/chromium exists. Installs it only when running
# as root with apt-get; elsewhere it says what to install and the page test skips.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: the browser and its libraries, no desktop extras.
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  [ -x /usr/bin/chromium ] || { echo "chromium still missing after install" >&2; exit 1; }
  exit 0
fi
echo "chromium not found: install Debian's 'chromium' package to run the dev gateway" \
     "page test" >&2
