#!/usr/bin/env bash
# Builds the CUDA extension without a GPU: every .cu launcher compiled by nvcc and every operator driver compiled with
# CUDA enabled, linked against a CUDA build of torch, then loaded to check that each C++ operator with a CPU kernel has
# a CUDA kernel too. Catches what the per-file nvcc check cannot (driver code, build flags, link errors). Infrastructure that is not
# there (no nvcc, no CUDA torch for pip, too little disk) skips the check; a compile, link or registration error fails.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_torch=${LIBRA_CUDA_TORCH:-torch==2.14.1}  # a cu130 build, matching nvcc 13

command -v nvcc >/dev/null 2>&1 || { echo "nvcc not found: CUDA build check skipped"; exit 0; }
free_gb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 {print int($4 / 1048576)}')
[ "$free_gb" -ge 12 ] || { echo "only ${free_gb} GB free: CUDA build check skipped"; exit 0; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
if ! "$work/venv/bin/pip" install -q "$cuda_torch" numpy ninja setuptools wheel >"$work/pip.log" 2>&1; then
  tail -3 "$work/pip.log"
  echo "$cuda_torch could not be installed: CUDA build check skipped"
  exit 0
fi
if ! "$work/venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "$cuda_torch is not a CUDA build: CUDA build check skipped"
  exit 0
fi

mkdir "$work/src"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
cd "$work/src"
if ! CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a} MAX_JOBS=${MAX_JOBS:-2} \
    "$work/venv/bin/pip" install -q --no-build-isolation --no-deps -e . >"$work/build.log" 2>&1; then
  grep -vE "WARNING: Location" "$work/build.log" | grep -E "error|fatal" -A2 | head -40
  echo "the CUDA build of the extension failed"
  exit 1
fi
"$work/venv/bin/python" - <<'PY'
import torch

from libra_kernels import _ext

assert _ext.cpp_extension_loaded(), "the CUDA build of libra_kernels._C did not load"
ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("libra::"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
cpu_only = [name for name in ops if has(name, "CPU") and not has(name, "CUDA")]
assert not cpu_only, f"C++ operators without a CUDA kernel: {cpu_only}"
print(f"CUDA build of torch {torch.__version__}: {sum(has(n, 'CUDA') for n in ops)} libra operators have CUDA kernels")
PY
