#!/usr/bin/env bash
# The test command (README, CI): bash scripts/run_tests.sh [pytest args...]
# Prepares ComfyUI and the venv (scripts/env.sh), then runs pytest on tests/ (config: tests/pytest.ini)
# with COMFYUI_PATH exported; extra arguments go to pytest (select with -k NAME). ComfyUI tests are never
# skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/python" -m pytest -q tests "$@"
