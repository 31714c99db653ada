#!/usr/bin/env bash
# The test command (README, CI): bash scripts/run_tests.sh [pytest args...]
# Prepares ComfyUI and the venv (scripts/env.sh), then runs pytest on tests/ (config: tests/pytest.ini)
# with COMFYUI_PATH exported; extra arguments go to pytest (select with -k NAME). ComfyUI tests are never
# skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The browser tests drive Debian's Chromium; install it (and a CJK font) when missing. Where that is not
# possible (no root, no apt) the browser tests fail with this script's name rather than skip.
bash scripts/install_browser.sh || echo "warning: could not install Chromium; the browser tests will fail" >&2
exec "$VENV/bin/python" -m pytest -q tests "$@"
