#!/usr/bin/env bash
# Every GPU check of the project in one call, for a lent GPU machine (torch, triton and CUDA
# installed; no network, no install step). Stages run in order of value, each under its own
# time limit, and the whole run stops starting new stages once GPU_CHECK_BUDGET seconds have
# passed, so the results always come back. Each stage's log goes to $OUT/logs.tar.gz and its
# tail, exit status and time to $OUT/summary.md; JSON results go to $OUT.
#
#   bash scripts/gpu_check.sh                  # every stage
#   bash scripts/gpu_check.sh bench-rednet e2e # only these (e.g. to rerun what failed)
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh   # the same plumbing on the CPU, tiny sizes
#
# Stages: env tests bench-rednet verify e2e bench-fmnist kernels jpeg profile e2e-224.
# Not run by default: eval-aware, the full-split defense-aware evaluation of docs/evaluation.md
# (`evaluate` resumes from parts): carry the run's folder (EVAL_OUT, default
# runs/eval-fmnist-10k-aware-method) so done batches are skipped; the parts this call adds come
# back as $OUT/eval_parts.tar.gz, to unpack into that folder's parts/ and rerun to resume.
#   bash scripts/gpu_check.sh eval-aware     # with GPU_CHECK_BUDGET/EVAL_LIMIT_S to suit
# Fashion-MNIST is read from .gpu_data/fashion-mnist when that folder exists (copy the t10k
# files there and carry it); otherwise the stages that need it use the bundled samples or
# synthetic images, as their own options describe.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-480}
SMOKE=${GPU_CHECK_SMOKE:-0}
LOGS=$(mktemp -d)  # outside $OUT: only 8 files come back from it, so logs travel as a tarball
mkdir -p "$OUT" "$LOGS/logs"
export PYTHONUNBUFFERED=1 PY=${PY:-python3}

# The packages import from the checkout through links, so nothing needs installing.
SITE=$(mktemp -d)
ln -s "$ROOT/engine" "$SITE/apudae_engine"
ln -s "$ROOT/kernels" "$SITE/apudae_kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
VERIFY_SOURCE=(--input engine/samples)
if [ -d "$ROOT/.gpu_data/fashion-mnist" ]; then
  export APUDAE_FASHION_MNIST_DIR="$ROOT/.gpu_data/fashion-mnist"
  VERIFY_SOURCE=(--dataset fashion-mnist --split test)
fi

EVAL_OUT=${EVAL_OUT:-runs/eval-fmnist-10k-aware-method}
# The defense-aware command of docs/evaluation.md on the full split; its settings (batch sizes
# included) must stay as they are for the parts to join those already computed elsewhere.
EVAL_ARGS=(--model fmnist --dataset fashion-mnist --attacks none --sweep none --limit 10000
           --aware-limit 10000 --aware-attacks aware-suite --aware-steps 50 --eot 4 --draws 4
           --aware-batch 50 --batch 250 --method-defaults)
if [ "$SMOKE" = 1 ]; then
  EVAL_OUT=$OUT/eval-smoke
  EVAL_ARGS=(--model fmnist --dataset fashion-mnist --attacks none --sweep none --limit 8
             --aware-limit 8 --aware-attacks aware-suite --aware-steps 2 --eot 1 --draws 2
             --aware-batch 4 --batch 8 --threads 2)
fi
if [ "$SMOKE" = 1 ]; then
  DEV=cpu BATCH=8 LIMIT=16 LOADERS="cpu" REPEATS=1 WORKERS=2
  E2E=(--sizes 28 --count 64) E2E224=(--sizes 224 --count 4 --batch 2)
  TESTS=(tests/engine/backends/test_gpu.py)
else
  DEV=cuda BATCH=512 LIMIT=512 LOADERS="cpu nvjpeg" REPEATS=3 WORKERS=8
  # Counts are multiples of the batch: a partial last batch would cost another graph capture.
  E2E=(--sizes 28 32 --count 8192 4096) E2E224=(--sizes 224 --count 512 --batch 64)
  TESTS=(tests/kernels tests/engine/backends/test_gpu.py tests/engine/backends/test_backends.py
         tests/engine/backends/test_step_graph.py tests/engine/method/test_reference.py)
fi
# Four pytest workers where pytest-xdist is installed: most of the tests stage is compiling
# Triton kernels and Inductor graphs, which parallelises.
XDIST=()
if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
START=$(date +%s)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests bench-rednet verify e2e bench-fmnist kernels jpeg
                                   profile e2e-224)

{
  echo "# GPU check, $(date -u +%FT%TZ)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)'), device $DEV"
  echo
} >"$OUT/summary.md"

# stage NAME LIMIT_S COMMAND...: run one stage under its limit, log it, summarise it.
stage() {
  local name=$1 limit=$2 t0 rc left
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "## $name: skipped, ${left}s of the ${BUDGET}s budget left" >>"$OUT/summary.md"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" >"$LOGS/logs/$name.log" 2>&1
  rc=$?
  {
    echo "## $name: exit $rc in $(($(date +%s) - t0))s$([ $rc = 124 ] && echo ' (time limit)')"
    echo '```'
    echo "\$ $*"
    tail -n 25 "$LOGS/logs/$name.log"
    echo '```'
  } >>"$OUT/summary.md"
  tar czf "$OUT/logs.tar.gz" -C "$LOGS" logs
}

env_info() {
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib, json, torch
from apudae_engine.core.host import gpu_info
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), **gpu_info()}
for mod in ("triton", "torchvision", "onnxruntime", "art", "nvidia.dali",
            "torch_tensorrt", "pytest_benchmark", "hypothesis"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as exc:  # absent or broken: say which
        info[mod] = f"absent ({type(exc).__name__})"
print(json.dumps(info, indent=1))
EOF
}

export -f env_info  # stage runs its command under timeout, in a new bash

for s in "${STAGES[@]}"; do
  case $s in
    env) stage env 30 bash -c env_info ;;
    tests) stage tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider "${XDIST[@]}" \
      "${TESTS[@]}" ;;
    bench-rednet) stage bench-rednet 200 "$PY" -m apudae_engine bench --device "$DEV" \
      --cases rednet30-32 --batch "$BATCH" --repeats "$REPEATS" --out "$OUT/bench_rednet30.json" ;;
    verify) stage verify 90 "$PY" -m apudae_engine verify --device "$DEV" --backend compiled \
      "${VERIFY_SOURCE[@]}" --limit "$LIMIT" ;;
    e2e) stage e2e 150 "$PY" -m apudae_engine.perf.bench_e2e --device "$DEV" "${E2E[@]}" \
      --batch "$BATCH" --loaders $LOADERS --workers "$WORKERS" --backend compiled \
      --json "$OUT/e2e.json" ;;
    e2e-224) stage e2e-224 90 "$PY" -m apudae_engine.perf.bench_e2e --device "$DEV" "${E2E224[@]}" \
      --loaders $LOADERS --workers "$WORKERS" --backend compiled --json "$OUT/e2e_224.json" ;;
    bench-fmnist) stage bench-fmnist 120 "$PY" -m apudae_engine bench --device "$DEV" \
      --cases fmnist,fmnist-perturbed --batch "$BATCH" --repeats "$REPEATS" \
      --out "$OUT/bench_fmnist.json" ;;
    kernels) stage kernels 60 "$PY" -m pytest -q -p no:cacheprovider \
      benchmarks/bench_adaptive_update.py --benchmark-enable \
      --benchmark-json "$OUT/adaptive_update.json" ;;
    jpeg) stage jpeg 45 "$PY" benchmarks/jpeg_decoder_diff.py --loaders nvjpeg --device "$DEV" ;;
    profile) stage profile 90 "$PY" benchmarks/profile_purify.py --device "$DEV" \
      --case rednet30-32 --backend compiled --precision bf16 --batch "$BATCH" \
      --json "$OUT/profile_rednet30.json" ;;
    eval-aware)
      stage eval-aware "${EVAL_LIMIT_S:-400}" "$PY" -m apudae_engine evaluate "${EVAL_ARGS[@]}" \
        --device "$DEV" --no-wait --out "$EVAL_OUT"
      [ -d "$EVAL_OUT/parts" ] && tar -czf "$OUT/eval_parts.tar.gz" -C "$EVAL_OUT" parts \
        && cp "$EVAL_OUT"/results.* "$OUT/" 2>/dev/null ;;
    *) echo "## $s: unknown stage" >>"$OUT/summary.md" ;;
  esac
done
rm -rf "$SITE" "$LOGS"
echo "total $(($(date +%s) - START))s" >>"$OUT/summary.md"
cat "$OUT/summary.md"
