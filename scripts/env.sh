#!/usr/bin/env bash
# Sourced by scripts/run_tests.sh and scripts/demo.sh: finds ComfyUI and prepares the virtual environment.
#
# 1. finds ComfyUI (COMFYUI_PATH, the ComfyUI holding this pack, or ~/.cache/comfyui/ComfyUI; if none,
#    tries a shallow clone of the pinned commit there) and exits 2 with instructions if there is none;
# 2. creates or reuses a venv (WLM_VENV, default ~/.cache/comfyui-wanloramoe/venv) and installs into it
#    only when the requirement files or the torch pins changed.
# Afterwards $VENV/bin/python runs with COMFYUI_PATH exported.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${WLM_VENV:-$HOME/.cache/comfyui-wanloramoe/venv}
TORCH_PINS=(torch==2.13.0 torchvision==0.28.0)
DEFAULT_COMFY=$HOME/.cache/comfyui/ComfyUI

# moe_core.comfy_runtime is stdlib-only at import, so the system Python can run it before the venv exists.
# It prints find_comfyui()'s result, or its message (where it looked, how to provide ComfyUI) and exits 2.
find_comfy() { "$PYTHON" -m moe_core.comfy_runtime; }

# --- 1. ComfyUI -------------------------------------------------------------------------------------
if ! COMFY=$(find_comfy 2>/dev/null); then
  if [[ -z "${COMFYUI_PATH:-}" && ! -e "$DEFAULT_COMFY" ]] && command -v git >/dev/null; then
    COMMIT=$("$PYTHON" -c 'from moe_core.comfy_runtime import PINNED_COMFYUI_COMMIT as c; print(c)')
    echo "ComfyUI not found; trying to fetch commit ${COMMIT:0:8} into $DEFAULT_COMFY" >&2
    TMP_CLONE="$DEFAULT_COMFY.partial.$$"
    if git init -q "$TMP_CLONE" &&
       timeout 120 git -C "$TMP_CLONE" fetch -q --depth 1 https://github.com/comfyanonymous/ComfyUI "$COMMIT" &&
       git -C "$TMP_CLONE" checkout -q FETCH_HEAD; then
      mv "$TMP_CLONE" "$DEFAULT_COMFY"
    else
      echo "fetching ComfyUI failed" >&2
    fi
    rm -rf "$TMP_CLONE"
  fi
  if ! COMFY=$(find_comfy); then   # second try prints find_comfyui's message on failure
    exit 2
  fi
fi
export COMFYUI_PATH=$COMFY
echo "ComfyUI: $COMFY"

# --- 2. venv ----------------------------------------------------------------------------------------
HASH=$(cat requirements.txt requirements-test.txt "$COMFY/requirements.txt" <(echo "${TORCH_PINS[*]}") \
       | sha256sum | cut -d' ' -f1)
STAMP=$VENV/.wlm-requirements-sha256
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]]; then
  echo "Installing test dependencies into $VENV" >&2
  # torch from PyPI. --isolated ignores pip's user config and PIP_* variables on purpose: a local
  # find-links/index configured there may offer a torch build that does not match torchvision. If the
  # registry is only reachable through that configuration, fall back to it.
  "${PIP[@]}" install --isolated --progress-bar off "${TORCH_PINS[@]}" ||
    "${PIP[@]}" install --progress-bar off "${TORCH_PINS[@]}"
  # ComfyUI's requirements without torch/torchvision/torchaudio (keeps the torch above; torchaudio is
  # only needed by ComfyUI's audio nodes), plus `requests` (used by ComfyUI's server, not listed),
  # then the pack's own. The constraints file stops any of them from replacing torch.
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#].*)?$' "$COMFY/requirements.txt" \
    > "$TMP/comfyui-requirements.txt"
  printf '%s\n' "${TORCH_PINS[@]}" > "$TMP/constraints.txt"
  "${PIP[@]}" install --progress-bar off -c "$TMP/constraints.txt" -r "$TMP/comfyui-requirements.txt" \
    requests -r requirements.txt -r requirements-test.txt
  rm -rf "$TMP"; trap - EXIT
  echo "$HASH" > "$STAMP"
fi
