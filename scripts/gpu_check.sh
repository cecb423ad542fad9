#!/usr/bin/env bash
# The one GPU check (about 10 minutes on an H100/H200): build the CUDA extension, run the gpu test tier, run the
# benchmark suite, time training steps of the tiny default and of a ~1B model, and leave logs and JSON under $OUT
# (default bench/results). Each stage has a time limit (seconds) that the environment can change.
# The GPU machine has torch with CUDA preinstalled, so only this package is installed (no dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16} LIBRA_BENCH_DIR="$OUT"
status=0

{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} 2>&1 | tee "$OUT/environment.txt"

echo "== build"
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.txt" || status=1
echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.txt"

echo "== gpu tests"
timeout "${GPU_TESTS_TIMEOUT:-180}" python3 -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 \
  | tail -40 | tee "$OUT/gpu-tests.txt" || status=1

echo "== benchmarks (one suite at a time, so a slow suite cannot cost the others their results)"
for suite in bench/test_bench_*.py; do
  name=$(basename "$suite" .py)
  timeout "${GPU_BENCH_TIMEOUT:-90}" python3 -m pytest -q "$suite" --benchmark -p no:cacheprovider 2>&1 \
    | tail -40 | tee "$OUT/$name.txt" || status=1
done

echo "== training step time and MFU (tiny default, then ~1B)"
timeout "${GPU_TRAIN_TIMEOUT:-60}" python3 train.py --max-steps 100 --output-dir "$OUT/train_tiny" 2>&1 \
  | grep -E "^(Libra|step)" | tail -6 | tee "$OUT/train_tiny.txt" || status=1
timeout "${GPU_TRAIN_1B_TIMEOUT:-120}" python3 train.py --config configs/bench_1b.yaml --output-dir "$OUT/train_1b" 2>&1 \
  | grep -E "^(Libra|step)" | tail -8 | tee "$OUT/train_1b.txt" || status=1
rm -rf "$OUT"/train_*/checkpoints "$OUT"/train_*/hf "$OUT"/train_*/processor

exit $status
