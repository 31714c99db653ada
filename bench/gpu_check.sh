#!/usr/bin/env bash
# The GPU check: bash bench/gpu_check.sh OUTDIR [--small | --a14b] [--only a,b] [--budget check=seconds] ...
#
# On a GPU it measures the A14B targets in about 8 minutes; on a CPU it runs the same checks at a small size.
# It writes OUTDIR/gpu_check.json, gpu_check.md and gpu_check.log (docs/gpu_check.md).
#
# On a machine without this project's environment (the lent GPU machine: its own python3 with torch, no
# package registry) it uses what scripts/prepare_gpu_bundle.sh put beside the repository: ComfyUI's source in
# .gl/ComfyUI and wheels in .whl/, installed into a private folder on the first run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR [--small|--a14b] [--only CHECKS] [--budget CHECK=SECONDS]" >&2
  exit 2
fi

if [[ -z "${COMFYUI_PATH:-}" && -f .gl/ComfyUI/comfy/sd.py ]]; then
  export COMFYUI_PATH=$PWD/.gl/ComfyUI
fi
if [[ -z "${PYTHON:-}" ]]; then
  VENV=${WLM_VENV:-$HOME/.cache/comfyui-wanloramoe/venv}
  if [[ -x $VENV/bin/python ]]; then PYTHON=$VENV/bin/python; else PYTHON=python3; fi
fi
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )) && ! "$PYTHON" -c 'import torchsde' 2>/dev/null; then
  SITE=${WLM_WHEEL_SITE:-/tmp/wlm-gpu-site}
  if [[ ! -f $SITE/.installed ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"
    touch "$SITE/.installed"
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
