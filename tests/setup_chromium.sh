#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian packages chromium + chromium-driver) for the
# browser tests (tests/test_render.py, tests/test_explorer_browser.py) and scripts/screenshots.py,
# if they are missing. Selenium drives /usr/bin/chromium through /usr/bin/chromedriver (no driver is
# downloaded at run time).
# Usage: bash tests/setup_chromium.sh   (needs root or sudo; idempotent)
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium);" \
       "$(/usr/bin/chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else echo "need root (or sudo) to apt-get install chromium" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
/usr/bin/chromium --version
/usr/bin/chromedriver --version
