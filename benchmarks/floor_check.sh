#!/usr/bin/env bash
# The oldest supported triton (pyproject.toml's floor) in a virtual environment of its own: the
# Triton kernels against the float64 oracle in the interpreter, every target's configuration table.
#   bash benchmarks/floor_check.sh [VENV]      (default VENV: /tmp/fastcal-floor; about 5 minutes)
# The compile sweep's resource checks (no spill, the bandwidth model's >= 85%) hold for the triton
# CI installs; docs/tests.md says what the floor's compiler gives there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/fastcal-floor}"
FLOOR="3.6.0"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[test]" "triton==$FLOOR" "numpy<2.4"
"$VENV/bin/python" -c "import triton; assert triton.__version__ == '$FLOOR', triton.__version__"
TRITON_CACHE_DIR="$(mktemp -d)" "$VENV/bin/python" -m pytest -q -o addopts= -p no:cacheprovider \
    tests/test_kernel_stats.py tests/test_kernel_predict.py tests/test_kernel_prototypes.py
