#!/usr/bin/env bash
# rsvg-convert renders the demo's timeline SVG to PNG in tests/lab/test_timeline.py, so the
# picture is checked the way a person sees it (fonts, overlaps), not only as XML.
# Idempotent: does nothing when rsvg-convert is already on PATH. Installs Debian's
# librsvg2-bin only when running as root with apt-get; elsewhere it says what to install
# and the rendering test skips locally (CI installs it, so it runs there).
set -euo pipefail
if command -v rsvg-convert >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # fonts-dejavu-core: the SVG asks for DejaVu Sans first; without a real font the
  # PNG would show boxes and text widths would not match what the layout assumed.
  apt-get install -y -qq --no-install-recommends librsvg2-bin fonts-dejavu-core >/dev/null
  command -v rsvg-convert >/dev/null 2>&1 || { echo "rsvg-convert still missing after install" >&2; exit 1; }
  exit 0
fi
echo "rsvg-convert not found: install Debian's 'librsvg2-bin' package to render the" \
     "timeline picture in tests" >&2
