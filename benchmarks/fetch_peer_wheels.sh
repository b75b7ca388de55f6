#!/usr/bin/env bash
# Download the peers the GPU benchmark compares against into .whl/ (ignored by
# git), for a GPU machine without network: carry .whl to it, and
# device_check.sh installs them first. Liger-Kernel is pure Python; the GPU
# image already has its torch and triton.
#
#   bash benchmarks/fetch_peer_wheels.sh        # then run device_check.sh with .whl carried
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER_SPEC:-liger-kernel==0.8.5}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "$LIGER"
ls -la .whl
