#!/usr/bin/env bash
# Download the peers the GPU benchmark compares against into .whl/ (ignored by
# git), for a GPU machine without network: carry .whl to it, and
# device_check.sh installs them first. Liger-Kernel and cut-cross-entropy are
# pure Python (Triton kernels); the GPU image already has their torch and triton.
# Not fetched: Liger's SM90 LigerFusedLinearScaledCrossEntropy needs
# nvidia-cutlass-dsl, whose CUDA 13 libraries wheel alone is 92 MB
# (nvidia-cutlass-dsl-libs-cu13 4.8.1), more than the 64 MiB the device tool
# carries.
#
#   bash benchmarks/fetch_peer_wheels.sh        # then run device_check.sh with .whl carried
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER_SPEC:-liger-kernel==0.8.5}
CCE=${CCE_SPEC:-cut-cross-entropy==25.1.1}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "$LIGER" "$CCE"
ls -la .whl
