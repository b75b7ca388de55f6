#!/usr/bin/env bash
# One prepared GPU check for a bare machine with CUDA torch, nvcc and ninja but
# nothing of this project installed (see DEVELOPERS.md, the `device` tool). It
# gives a full answer within DEADLINE_S (6 minutes) of its start, in this order:
#   1. build: the extension with its CUDA kernels, for the card's arch only;
#   2. gpu tests: every test marked `gpu` (tests/conftest.py: CUDA, Triton);
#   3. the advantage and policy-loss benchmarks on CUDA;
#   4. training smoke runs: riskpo_train's warm-up + 3 RL steps (riskpo, grpo,
#      FSDP in bf16) on CUDA;
#   5. other tests: the rest of the suite (-m "not gpu"), with the time left
#      before the deadline (skipped with a line if too little is left);
#   6. a one-screen summary, printed last and saved as summary.txt.
#
#   OUT=/some/dir bash benchmarks/device_check.sh           # on the GPU machine
#   OUT=/some/dir bash benchmarks/device_check.sh --quick   # build + gpu tests only (a rerun)
#   bash benchmarks/device_check.sh --cpu [--quick]         # dry run here: no CUDA steps
#
# $OUT gets at most 8 files (the device tool's limit): build.log (machine, wheels,
# build, extension check), tests.log (both pytest runs), failures.log (each
# failed / timed-out / crashed test's traceback, written as it happens, and the
# stacks of a hung test), bench.log (both benchmarks), advantages_cuda.csv,
# policy_loss_cuda.csv (*_cpu.csv with --cpu), train_smoke.log, summary.txt.
#
# Pytest runs under pytest-xdist where it is importable, with workers x threads
# <= cores (N = min(8, cores/2) workers, OMP_NUM_THREADS = cores/N), and with a
# per-test time limit (pytest-timeout's --timeout where importable, else the
# SIGALRM fallback of tests/_device_plugin.py; a hard limit ends a test hung in
# C/CUDA code either way). Neither plugin is needed.
#
# Environment knobs (all optional):
#   OUT                  where the files go (default: a new temporary folder)
#   PYTHON               the interpreter (default python3)
#   DEADLINE_S           the whole run's budget in seconds (default 360)
#   RISKPO_SKIP_BUILD=1  use the installed package, build nothing
#   RISKPO_SKIP_TESTS=1  leave out both pytest steps
#   RISKPO_CHECK_PYTEST_ARGS  what the pytest steps collect, split on spaces
#                        (default "tests --ignore=tests/test_device_check.py": the
#                        dry-run tests of this script stay out of its own run)
#   PYTEST_WORKERS       xdist workers (default min(8, cores/2); < 2: no xdist)
#   TEST_TIMEOUT         per-test limit in seconds (default 90; the hard limit is
#                        30 s later: RISKPO_TEST_TIMEOUT_GRACE)
#   GPU_TESTS_TIMEOUT    limit of the gpu-test step (default 150)
#   TESTS_TIMEOUT        limit of the other-test step (default: the time left)
#   MIN_TESTS_TIME       the other tests are skipped with less left (default 30)
#   BENCH_TIMEOUT        limit of each benchmark (default 150)
#   SMOKE_TIMEOUT        limit of each training smoke run (default 90)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   the build's (default 16, the card's arch)
# Every step's limit is also cut to the time left before the deadline.
#
# Python packages missing on the GPU machine travel as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS

MODE=gpu
QUICK=
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu, --quick)"; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DEADLINE_S=${DEADLINE_S:-360}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-150}
MIN_TESTS_TIME=${MIN_TESTS_TIME:-30}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-90}
RESERVE=10   # seconds kept for the summary
read -r -a PYTEST_SELECTION <<<"${RISKPO_CHECK_PYTEST_ARGS:-tests --ignore=tests/test_device_check.py}"

WORK=$(mktemp -d)        # scratch: step records, pytest counts, smoke runs
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.tsv
: >"$STEPS"
: >"$OUT/failures.log"
status=0

now() { date -u +%H:%M:%S; }
elapsed() { echo $((SECONDS - T0)); }
left() { echo $((DEADLINE_S - (SECONDS - T0) - RESERVE)); }
# limit SECONDS: SECONDS, cut to the time left before the deadline (at least 1).
limit() { local l; l=$(left); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
step() { echo; echo "== $* ($(now), $(elapsed) s in)"; }
# record NAME RESULT SECONDS [NOTE]: one line of the summary's step table.
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STEPS"
  case $2 in FAILED*|timed*) status=1 ;; esac
}
# result RC: ok / timed out / FAILED for a command run under `timeout`.
result() { case $1 in 0) echo ok ;; 124|137) echo "timed out" ;; *) echo "FAILED (exit $1)" ;; esac; }
# enough NAME NEEDED: whether NEEDED seconds are left; else records the step skipped.
enough() {
  local l; l=$(left)
  if [ "$l" -lt "$2" ]; then
    echo "== $1: skipped: too little time left before the ${DEADLINE_S} s deadline (${l} s, needs ${2} s)"
    record "$1" skipped 0 "too little time left (${l} s)"
    return 1
  fi
}

summary() {
  step "summary"
  if ! $PY benchmarks/summarize_device_check.py --work "$WORK" --out "$OUT" --mode "$MODE" \
      --elapsed "$(elapsed)" --deadline "$DEADLINE_S" 2>"$WORK/summary.err" | tee "$OUT/summary.txt"; then
    { echo "(the summary script failed: $(tail -3 "$WORK/summary.err"))"; cat "$STEPS"; } | tee -a "$OUT/summary.txt"
  fi
  echo "outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
}

# ---- machine, carried wheels, build ----------------------------------------------
step "machine"
{
  echo "device_check.sh mode=$MODE${QUICK:+ quick} started $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $(nproc) cores"
  if [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing carried wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/riskpo-site .whl/*.whl && echo "wheels installed in /tmp/riskpo-site"
  fi
} 2>&1 | tee "$OUT/build.log"
if [ -d /tmp/riskpo-site ] && compgen -G ".whl/*.whl" >/dev/null; then
  export PYTHONPATH=/tmp/riskpo-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, sys, os; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'cores', os.cpu_count())" \
  2>&1 | tee -a "$OUT/build.log" | tee "$WORK/machine.txt"

step "build (pip install --no-build-isolation -e .)"
export MAX_JOBS=${MAX_JOBS:-16}
if [ "$MODE" = gpu ]; then
  # Only the card at hand: one architecture compiles faster and uses Hopper's own code.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
t=$SECONDS
if [ -n "${RISKPO_SKIP_BUILD:-}" ]; then
  echo "build skipped (RISKPO_SKIP_BUILD is set): using the installed package" | tee -a "$OUT/build.log"
  build=skipped
else
  echo "== pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}, MAX_JOBS=$MAX_JOBS)" >>"$OUT/build.log"
  timeout -k 10 "$(limit 300)" $PY -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1
  rc=$?
  build=$(result $rc)
  [ $rc -eq 0 ] || tail -40 "$OUT/build.log"
fi
$PY -c "
import riskpo_kernels as rk
print('extension', rk.extension_available, 'with CUDA', rk.extension_with_cuda)
assert rk.extension_available, 'the extension is not built'
assert rk.extension_with_cuda or '$MODE' == 'cpu', 'built without CUDA kernels'
" 2>&1 | tee -a "$OUT/build.log"
ext=${PIPESTATUS[0]}
if [ "$build" = skipped ] && [ "$ext" -eq 0 ]; then
  record build skipped 0 "RISKPO_SKIP_BUILD: $(tail -1 "$OUT/build.log")"
elif [ "$build" = ok ] && [ "$ext" -eq 0 ]; then
  record build ok $((SECONDS - t)) "$(tail -1 "$OUT/build.log")"
else
  [ "$build" = ok ] || [ "$build" = skipped ] && build="FAILED (extension)"
  record build "$build" $((SECONDS - t)) "see build.log"
  echo "FAILED: build; nothing else can run"
  summary
  exit 1
fi

# ---- pytest ----------------------------------------------------------------------
CORES=$(nproc)
WORKERS=${PYTEST_WORKERS:-$(( CORES / 2 < 8 ? CORES / 2 : 8 ))}
XDIST=()
THREADS=$CORES
if [ "$WORKERS" -ge 2 ] && $PY -c "import xdist" 2>/dev/null; then
  # Workers x threads <= cores: each worker's torch reads OMP_NUM_THREADS at start.
  THREADS=$(( CORES / WORKERS > 0 ? CORES / WORKERS : 1 ))
  XDIST=(-n "$WORKERS")
  $PY -c "import xdist, sys; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null \
    && XDIST+=(--dist worksteal)
fi
TIMEOUT_ARGS=()
if $PY -c "import pytest_timeout" 2>/dev/null; then
  TIMEOUT_ARGS=(--timeout "$TEST_TIMEOUT" --timeout-method signal)
  timeouts="pytest-timeout ${TEST_TIMEOUT} s"
else
  timeouts="SIGALRM ${TEST_TIMEOUT} s (tests/_device_plugin.py)"
fi
echo "pytest: ${XDIST[*]:-no xdist} x ${THREADS} threads, per-test limit: $timeouts" >>"$WORK/machine.txt"

# pytest_step NAME MARKEXPR LIMIT: runs the selection's tests of MARKEXPR under LIMIT s.
pytest_step() {
  local name=$1 marks=$2 lim=$3 t=$SECONDS counts="$WORK/${1// /-}.counts.json" rc res
  step "$name: pytest -m '$marks' ${PYTEST_SELECTION[*]} (limit ${lim} s)"
  echo "##### $name: pytest -m '$marks' ${XDIST[*]} ${TIMEOUT_ARGS[*]} ${PYTEST_SELECTION[*]} ($(now), limit ${lim} s, OMP_NUM_THREADS=$THREADS)" >>"$OUT/tests.log"
  # -s INT: pytest prints what it has (and the plugin notes the interruption);
  # -k: SIGKILL 15 s later if it does not stop.
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TORCHINDUCTOR_COMPILE_THREADS=1 \
  PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" \
  RISKPO_FAILURE_LOG="$OUT/failures.log" RISKPO_TEST_COUNTS="$counts" RISKPO_TEST_RUN="$name" \
  RISKPO_TEST_TIMEOUT="$TEST_TIMEOUT" \
    timeout -s INT -k 15 "$lim" $PY -m pytest -q -rfE --durations=15 -p no:cacheprovider \
      -p _device_plugin "${XDIST[@]}" "${TIMEOUT_ARGS[@]}" -m "$marks" "${PYTEST_SELECTION[@]}" 2>&1 \
    | tee -a "$OUT/tests.log" | tail -n 25
  rc=${PIPESTATUS[0]}
  case $rc in
    0|5) res=ok ;;             # 5: nothing collected
    124|137) res="timed out" ;;
    1) res=FAILED ;;
    *) res="FAILED (exit $rc)" ;;
  esac
  record "$name" "$res" $((SECONDS - t)) "counts=$counts limit=$lim"
  # What was slowest, also when the run was cut off (no --durations table then).
  $PY - "$counts" >>"$OUT/tests.log" 2>/dev/null <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"##### {c['label']}: slowest so far:", "; ".join(f"{d} s {n}" for d, n in c["slowest"][:10]))
if c["running"]:
    print(f"##### {c['label']}: still running at the end: {', '.join(c['running'])}")
EOF
}

if [ -n "${RISKPO_SKIP_TESTS:-}" ]; then
  echo "pytest steps skipped (RISKPO_SKIP_TESTS is set)" | tee "$OUT/tests.log"
  record "gpu tests" skipped 0 "RISKPO_SKIP_TESTS"
elif enough "gpu tests" 20; then
  pytest_step "gpu tests" gpu "$(limit "$GPU_TESTS_TIMEOUT")"
fi

# ---- benchmarks and training smoke runs -----------------------------------------------
if [ -z "$QUICK" ]; then
  : >"$OUT/bench.log"
  # bench NAME CSV ARGS...: one benchmark, its output appended to bench.log
  # (CSV -: no CSV file, its table in bench.log only: $OUT holds 8 files at most).
  bench() {
    local name=$1 csv=$2 t=$SECONDS rc; shift 2
    step "$name"
    enough "$name" 20 || return 0
    echo "##### $name: $* ($(now))" >>"$OUT/bench.log"
    [ "$csv" = - ] || set -- "$@" --csv "$OUT/$csv"
    timeout -k 10 "$(limit "${BENCH_LIMIT:-$BENCH_TIMEOUT}")" $PY "$@" 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$(result $rc)" $((SECONDS - t))
  }
  if [ "$MODE" = gpu ]; then
    bench "advantage benchmark" advantages_cuda.csv benchmarks/bench_advantages.py --device cuda
    # Dense and realistic batches (~40% padding, ~5% clipped), with the folded
    # kernel as a method: the CSV holds what backends.FUSED_LINEAR_AUTO is set from.
    # Two batches: twice the default limit (BENCH_LIMIT is read by bench()).
    BENCH_LIMIT=$((2 * BENCH_TIMEOUT)) bench "policy-loss benchmark" policy_loss_cuda.csv \
      benchmarks/bench_policy_loss.py --device cuda --rounds 3 --batch both
    # Candidate (issue 18): a chunk's per-row PPO math in one Triton kernel vs the torch ops.
    bench "token-loss kernel benchmark" - benchmarks/bench_token_loss.py --device cuda
    # Candidate (issue 18): the folded kernels' configurations against the chunked path.
    bench "folded kernel benchmark" - benchmarks/bench_folded.py
  else
    bench "advantage benchmark" advantages_cpu.csv benchmarks/bench_advantages.py --quick
    bench "policy-loss benchmark" policy_loss_cpu.csv benchmarks/bench_policy_loss.py --quick
    bench "token-loss kernel benchmark" - benchmarks/bench_token_loss.py --cpu --rows 64
    bench "folded kernel benchmark" - benchmarks/bench_folded.py --cpu
  fi

  step "training smoke test (riskpo_train: warm-up, 3 RL steps of each algorithm, and FSDP in bf16)"
  TRAIN_DEVICE=cuda
  [ "$MODE" = cpu ] && TRAIN_DEVICE=cpu
  smoke=$WORK/smoke
  mkdir -p "$smoke"
  : >"$OUT/train_smoke.log"
  # smoke LABEL COMMAND...: a warm-up and 3 RL steps of riskpo_train, run by COMMAND.
  smoke() {
    local label=$1 t=$SECONDS rc; shift
    enough "smoke $label" 15 >>"$OUT/train_smoke.log" || { echo "$label: skipped (too little time left)"; return 0; }
    timeout -k 10 "$(limit "$SMOKE_TIMEOUT")" "$@" --device $TRAIN_DEVICE --out "$smoke/$label" \
      --warmup-cache "$smoke/cache" --warmup-steps 200 --rl-steps 3 --eval-every 0 \
      --eval-questions 40 --no-progress >"$smoke/$label.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      echo "$label: ok"
    else
      echo "FAILED: training smoke test ($label): $(result $rc)"
    fi
    if [ $rc -eq 0 ]; then
      record "smoke $label" ok $((SECONDS - t)) "$(grep -o '"test_pass@1": [0-9.]*' "$smoke/$label.log" | tail -1)"
    else
      record "smoke $label" "$(result $rc)" $((SECONDS - t)) "$(grep -v -i warn "$smoke/$label.log" | grep . | tail -1)"
    fi
    grep -v -i "warn" "$smoke/$label.log" | tail -3
    cat "$smoke/$label/metrics.jsonl" 2>/dev/null
  }
  # (not in a pipeline: record must run in this shell)
  smoke riskpo $PY -m riskpo_train --algo riskpo >>"$OUT/train_smoke.log" 2>&1
  smoke grpo $PY -m riskpo_train --algo grpo >>"$OUT/train_smoke.log" 2>&1
  # The FSDP path (NCCL on the GPU, gloo here) with bf16 mixed precision.
  smoke fsdp-bf16 $PY -m torch.distributed.run --nproc_per_node 1 --standalone -m riskpo_train \
    --param-dtype bfloat16 >>"$OUT/train_smoke.log" 2>&1
  grep -E '^(riskpo|grpo|fsdp-bf16): |^FAILED' "$OUT/train_smoke.log"

  # ---- the rest of the suite, with the time left ---------------------------------------
  if [ -z "${RISKPO_SKIP_TESTS:-}" ]; then
    if enough "other tests" "$MIN_TESTS_TIME"; then
      pytest_step "other tests" "not gpu" "$(limit "${TESTS_TIMEOUT:-100000}")"
    fi
  else
    record "other tests" skipped 0 "RISKPO_SKIP_TESTS"
  fi
fi

summary
exit $status
