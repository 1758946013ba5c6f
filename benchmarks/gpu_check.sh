#!/usr/bin/env bash
# GPU check for the Triton kernels, on a bare GPU machine whose python3 has PyTorch + Triton:
#  1. makes medir_fast importable (editable install, offline; missing pure-Python packages are
#     taken from ./.whl/ if wheels were put there beforehand, since such machines may be offline),
#  2. runs the kernel tests on the GPU (same tests as CI's interpreter run, real compiler),
#  3. per-kernel timings, then the whole-model table (eager fp32, autocast bf16, torch.compile,
#     triton backend) at 1x512x512 and 8x256x256.
# Logs and JSON go to $OUT (default benchmarks/out).
# Usage: bash benchmarks/gpu_check.sh [gpu_bench.py options, e.g. --modes eager,triton,engines]
# Without torch.compile it takes about 5 minutes on an H100 (estimate); compile adds ~2.5 min per shape.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"

for pkg in nibabel tqdm pytest; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    if [ -d .whl ]; then "$PY" -m pip install -q --no-index --find-links .whl "$pkg"
    else echo "missing Python package $pkg and no ./.whl wheels to install it from" >&2; exit 1; fi
  fi
done
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

# Every stage runs even if one before it failed; the exit status says whether any did.
status=0
"$PY" -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" || { echo "KERNEL TESTS FAILED"; status=1; }
"$PY" benchmarks/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" || status=1
"$PY" benchmarks/gpu_bench.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
