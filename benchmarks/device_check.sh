#!/usr/bin/env bash
# One prepared GPU check for a bare machine with CUDA torch, nvcc and ninja but
# nothing of this project installed (see DEVELOPERS.md, the `device` tool):
#   1. builds the extension with its CUDA kernels against the machine's torch;
#   2. runs the whole test suite (the CUDA tests run there, skip here);
#   3. runs the advantage and policy-loss benchmarks on CUDA;
#   4. runs a few RL steps of riskpo_train on the embedded task (the loop on CUDA);
#   5. leaves logs and CSVs in $OUT (8 files: the device tool's limit) and
#      prints a summary last.
#
#   OUT=/some/dir bash benchmarks/device_check.sh          # on the GPU machine
#   bash benchmarks/device_check.sh --cpu                  # dry run here: no CUDA steps
#
# RISKPO_SKIP_BUILD=1 and RISKPO_SKIP_TESTS=1 leave out those steps (the test
# suite runs the dry run that way: tests/test_device_check.py).
#
# Python packages missing on the GPU machine travel as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Each step has a time limit, so that one that hangs still leaves the others'
# results in $OUT within the device lease (the whole run should take < 8 min).
TESTS_TIMEOUT=${TESTS_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-90}
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
fail() { echo "FAILED: $*"; status=1; }

if compgen -G ".whl/*.whl" >/dev/null; then
  step "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/riskpo-site .whl/*.whl && export PYTHONPATH=/tmp/riskpo-site${PYTHONPATH:+:$PYTHONPATH}
fi

step "machine"
if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    | tee "$OUT/machine.txt"
fi
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" \
  | tee -a "$OUT/machine.txt"

step "build (pip install --no-build-isolation -e .)"
export MAX_JOBS=${MAX_JOBS:-16}
if [ "$MODE" = gpu ]; then
  # Only the card at hand: one architecture compiles faster and uses Hopper's own code.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
if [ -n "${RISKPO_SKIP_BUILD:-}" ]; then
  echo "build skipped (RISKPO_SKIP_BUILD is set): using the installed package" | tee "$OUT/build.log"
elif ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  fail "build"
  exit 1
fi
$PY -c "
import riskpo_kernels as rk
print('extension', rk.extension_available, 'with CUDA', rk.extension_with_cuda)
assert rk.extension_available
assert rk.extension_with_cuda or '$MODE' == 'cpu', 'built without CUDA kernels'
" || fail "extension"

step "tests"
if [ -n "${RISKPO_SKIP_TESTS:-}" ]; then
  echo "skipped (RISKPO_SKIP_TESTS is set: the test suite itself runs this script)" | tee "$OUT/pytest.log"
else
timeout "$TESTS_TIMEOUT" $PY -m pytest -q -rfE -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "tests"
fi

step "advantage benchmark"
if [ "$MODE" = gpu ]; then
  timeout "$BENCH_TIMEOUT" $PY benchmarks/bench_advantages.py --device cuda --csv "$OUT/advantages_cuda.csv" 2>&1 | tee "$OUT/bench_cuda.log"
else
  $PY benchmarks/bench_advantages.py --quick --csv "$OUT/advantages_cpu.csv" 2>&1 | tee "$OUT/bench_cpu.log"
fi
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "benchmark"

step "policy-loss benchmark"
if [ "$MODE" = gpu ]; then
  timeout "$BENCH_TIMEOUT" $PY benchmarks/bench_policy_loss.py --device cuda --rounds 5 --csv "$OUT/policy_loss_cuda.csv" 2>&1 \
    | tee "$OUT/bench_policy_loss_cuda.log"
else
  $PY benchmarks/bench_policy_loss.py --quick --csv "$OUT/policy_loss_cpu.csv" 2>&1 | tee "$OUT/bench_policy_loss_cpu.log"
fi
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "policy-loss benchmark"

step "training smoke test (riskpo_train: warm-up, 3 RL steps of each algorithm, and FSDP in bf16)"
TRAIN_DEVICE=cuda
[ "$MODE" = cpu ] && TRAIN_DEVICE=cpu
smoke=$(mktemp -d)
# smoke LABEL COMMAND...: a warm-up and 3 RL steps of riskpo_train, run by COMMAND.
smoke() {
  local label=$1; shift
  if timeout "$SMOKE_TIMEOUT" "$@" --device $TRAIN_DEVICE --out "$smoke/$label" \
      --warmup-cache "$smoke/cache" --warmup-steps 200 --rl-steps 3 --eval-every 0 \
      --eval-questions 40 --no-progress >"$smoke/$label.log" 2>&1; then
    echo "$label: ok"
  else
    echo "FAILED: training smoke test ($label)"
  fi
  grep -v -i "warn" "$smoke/$label.log" | tail -3
  cat "$smoke/$label/metrics.jsonl" 2>/dev/null
}
{
  smoke riskpo $PY -m riskpo_train --algo riskpo
  smoke grpo $PY -m riskpo_train --algo grpo
  # The FSDP path (NCCL on the GPU, gloo here) with bf16 mixed precision.
  smoke fsdp-bf16 $PY -m torch.distributed.run --nproc_per_node 1 --standalone -m riskpo_train \
    --param-dtype bfloat16
} 2>&1 | tee "$OUT/train_smoke.log"
grep -q "FAILED: training" "$OUT/train_smoke.log" && status=1

step "summary"
grep -E "passed|failed|skipped" "$OUT/pytest.log" | tail -1
for log in "$OUT"/bench_*.log; do
  echo; echo "$(basename "$log"):"; grep '^|' "$log"
done
grep -E '^(riskpo|grpo|fsdp-bf16): ok|FAILED' "$OUT/train_smoke.log"
echo "outputs in $OUT"
exit $status
