#!/usr/bin/env bash
# The prepared device check: bash benchmarks/gpu_check.sh OUTDIR
# On a CUDA machine with torch, triton, numpy and numba already installed and no network:
# installs this checkout without dependencies, then runs benchmarks/gpu_check.py (tests, benchmarks,
# ncu, the bandwidth model), writing everything under OUTDIR and printing the summary table last.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
python -m pip install --no-deps --no-build-isolation -q -e . > "$out/install.log" 2>&1 \
  || { echo "gpu_check: FAILED: pip install (see $out/install.log)" >&2; exit 1; }
export TRITON_DEFAULT_FP_FUSION=1
exec timeout 480 python -m benchmarks.gpu_check "$out"
