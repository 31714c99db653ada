#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's Chromium (driven over the DevTools protocol by
# tests/cdp.py, no npm package and no browser download) and a CJK font so Chinese prompts render in
# screenshots. Needs root (or sudo) and an apt source; safe to re-run.
#
#   bash scripts/install_browser.sh          # then: bash scripts/run_tests.sh tests/test_browser.py
#
# Without Chromium the browser tests fail (not skip) and name this script. WLM_CHROMIUM=/path/to/chrome
# points them at another Chromium/Chrome binary instead.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qiE 'wqy|noto sans cjk'; then
  echo "chromium: $(chromium --version 2>/dev/null | head -n1)"
  exit 0
fi
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-wqy-zenhei >/dev/null
echo "chromium: $(chromium --version 2>/dev/null | head -n1)"
