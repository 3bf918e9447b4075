#!/usr/bin/env bash
# Create .venv and install HRA Studio with every extra (train, app, eval) and its test tools (dev).
#
# torch: if the venv already has one, it is kept. On a machine without an NVIDIA GPU we install
# torch==2.13.0 (the CPU wheel these build machines carry) and pin torchvision 0.28.0, its matching
# release, through a constraints file so no later install drags in a CUDA build. With a GPU, pip picks
# the torch build for it. Set HRA_TORCH_SPEC to choose yourself (e.g. HRA_TORCH_SPEC="torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${HRA_EXTRAS:-all,dev}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null

CONSTRAINTS=()
# Asked of the package metadata, not by importing torch: before numpy is in, importing torch warns about it.
has() { "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
if ! has torch; then
  if [ -n "${HRA_TORCH_SPEC:-}" ]; then
    "$VPY" -m pip install -q "$HRA_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  else
    "$VPY" -m pip install -q "torch==2.13.0"
  fi
fi
TORCH_VERSION=$("$VPY" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")
if [ "$TORCH_VERSION" = "2.13.0" ]; then
  printf 'torch==2.13.0\ntorchvision==0.28.0\n' > .venv/constraints.txt
  CONSTRAINTS=(-c .venv/constraints.txt)
fi

"$VPY" -m pip install -q "${CONSTRAINTS[@]}" -e ".[$EXTRAS]"
"$VPY" scripts/fix_torchvision.py

# The app's browser test drives Debian's chromium (playwright's own browser download needs network it lacks).
# Installed only where asked (CI=true or HRA_BROWSER_TESTS=1), as root, on Debian; elsewhere the test skips.
if [ "${CI:-}" = "true" ] || [ "${HRA_BROWSER_TESTS:-}" = "1" ]; then
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  fi
fi
echo "HRA Studio is installed in .venv (torch $TORCH_VERSION)."
