#!/usr/bin/env bash
# Install what the browser test (tests/test_ab_browser.py) needs: Debian's Chromium and its
# matching chromedriver, and Selenium in .venv. Safe to run again: installed pieces are skipped.
# Selenium rather than Playwright: Debian ships chromedriver built for exactly its Chromium, so no
# browser download and no driver/browser version drift.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
.venv/bin/python -c "import selenium" 2>/dev/null || .venv/bin/python -m pip install -q "selenium>=4.20"
echo "browser test ready: $(/usr/bin/chromium --version 2>/dev/null || echo chromium)," \
     "selenium $(.venv/bin/python -c 'import selenium; print(selenium.__version__)')"
