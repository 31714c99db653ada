#!/usr/bin/env bash
# Gathers what the GPU check (bench/gpu_check.sh) needs on a GPU machine that has its own python3 with torch,
# torchvision and common packages but no package registry and nothing of this project:
#
#   .gl/ComfyUI   ComfyUI's source (the pinned checkout found as the tests find it), minus tests, examples,
#                 git data and user folders;
#   .whl/         the wheels a headless `comfy` import needs beyond such a python3: torchsde and trampoline
#                 (pure Python). With --with-av also PyAV (34 MB), needed only by ComfyUI's node modules
#                 (comfy_api.latest, nodes, comfy_extras), which the GPU check does not import.
#
# Both paths are ignored by git; the device tool takes them with carry [".gl", ".whl"]. Everything that travels
# (tracked + untracked files + these) must stay under 64 MiB: the script adds it up and refuses above 56 MiB.
#
# usage: bash scripts/prepare_gpu_bundle.sh [--with-av]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WITH_AV=0
for arg in "$@"; do
  case $arg in
    --with-av) WITH_AV=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
# The GPU machine's python3 (3.12, x86-64) installs these; versions as in the tested environment.
WHEELS=(torchsde==0.2.6 trampoline==0.1.2)
(( WITH_AV )) && WHEELS+=(av==18.1.0)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)

# --- 1. ComfyUI's source ----------------------------------------------------------------------------------
COMFY=$("$PYTHON" -m moe_core.comfy_runtime)  # prints the checkout, or where it looked and how to provide one
echo "ComfyUI: $COMFY"
rm -rf .gl/ComfyUI
mkdir -p .gl/ComfyUI
tar -C "$COMFY" --exclude=./.git --exclude=./.github --exclude=./.ci --exclude=./tests --exclude=./tests-unit \
    --exclude=./script_examples --exclude=./input --exclude=./output --exclude=./temp --exclude=./user \
    --exclude='./custom_nodes/*' --exclude=__pycache__ --exclude='*.pyc' -cf - . | tar -C .gl/ComfyUI -xf -
for f in comfy/sd.py main.py comfyui_version.py; do
  [[ -f .gl/ComfyUI/$f ]] || { echo "copy of ComfyUI lacks $f" >&2; exit 1; }
done

# --- 2. wheels ----------------------------------------------------------------------------------------------
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "${WHEELS[@]}"

# --- 3. what travels ----------------------------------------------------------------------------------------
"$PYTHON" - <<'EOF'
import os, subprocess, sys
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.path.getsize(f) for f in listed if f and os.path.isfile(f))
def folder(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))
parts = {"working tree (tracked + untracked)": tree, ".gl": folder(".gl"), ".whl": folder(".whl")}
if os.path.isdir("shared"):
    parts["shared/"] = folder("shared")
total = sum(parts.values())
for name, size in parts.items():
    print(f"  {name:<36}{size / 2**20:8.1f} MiB")
print(f"  {'total (limit 64 MiB)':<36}{total / 2**20:8.1f} MiB")
for w in sorted(os.listdir(".whl")):
    print(f"  .whl/{w}")
if total > 56 * 2**20:
    sys.exit("too close to the 64 MiB the device tool carries: leave out --with-av or clean untracked files")
EOF

cat <<'EOF'

Ready. For the device tool's run:
  carry:   [".gl", ".whl"]
  command: bash bench/gpu_check.sh $OUT
  timeout_s: 600 (the check keeps to about 8 minutes; it writes gpu_check.json, gpu_check.md, gpu_check.log)
EOF
