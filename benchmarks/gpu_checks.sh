#!/usr/bin/env bash
# One device call: the GPU tests and the router / quantizer benchmarks, logs and JSON under $OUT.
#   bash benchmarks/gpu_checks.sh [pytest selection...]
# Uses the machine's own python3 (torch + triton preinstalled); moeprec from this checkout.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/env.txt"
sel=${*:-tests}
timeout 300 python3 -m pytest -q -ra -m gpu -p no:cacheprovider $sel 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 150 python3 benchmarks/bench_router.py --out "$OUT" 2>&1 | tee "$OUT/router.log" | tail -20
timeout 120 python3 benchmarks/bench_quant.py --out "$OUT" 2>&1 | tee "$OUT/quant.log" | tail -20
