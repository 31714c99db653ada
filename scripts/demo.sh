#!/usr/bin/env bash
# The README's first command: the whole job, on its embedded demo configuration, on the CPU.
#   1. renders synthetic laparoscopy-like clips (four instruments, Chinese captions, tip boxes),
#   2. builds a tiny random WAN 2.2 A14B-style DiT pair and a random WAN 2.1 VAE through ComfyUI's loaders
#      and caches latents and text,
#   3. trains stage 1 (a base LoRA per DiT), then stage 2 (experts + learned router) on it,
#   4. renders one clip per instrument, an auto-routed one and an experts-off one with the bundled A14B
#      workflow in a headless ComfyUI,
#   5. writes the clips, a contact sheet, gate/usage pictures, loss curves and report.html under
#      outputs/demo/report/.
# Arguments go to `python -m training.mission`: --fast (CI), --config my.toml (the real pipeline on your
# files), --set key=value, --print-config, --help.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/python" -m training.mission "$@"
