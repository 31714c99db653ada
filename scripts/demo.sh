#!/usr/bin/env bash
# The README's first command: the main job on its embedded default configuration, on the CPU.
# Renders synthetic laparoscopy-like clips, builds tiny random WAN models through ComfyUI's loaders,
# caches latents, trains the stage-1 LoRA and writes it with its metrics log and loss curve under
# outputs/demo/. Extra arguments go to `python -m training.stage1 --demo` (e.g. --set train.max_steps=10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/python" -m training.stage1 --demo "$@"
