#!/usr/bin/env bash
# GPU check for the Triton kernels, on a bare GPU machine whose python3 has PyTorch + Triton:
#  1. makes medir_fast importable (editable install, offline; missing pure-Python packages are
#     taken from ./.whl/ if wheels were put there beforehand, since such machines may be offline),
#  2. runs the kernel tests on the GPU (same tests as CI's interpreter run, real compiler),
#  3. per-kernel timings, then `medir-fast bench` on the paper's configuration (random weights) at
#     1x512x512 and 8x256x256, fp32, bf16 and fp16: the official algorithm, torch.compile and every
#     backend that runs there (bm3d and the plot need their packages in ./.whl/ too).
# Logs, JSON and Markdown go to $OUT (default benchmarks/out).
# Usage: bash benchmarks/gpu_check.sh [medir-fast bench options]
# By default the bench leaves out the builds that take minutes (compile: ~2.5 min per shape and
# precision; aoti: minutes per precision): about 5 minutes on an H100 (estimate). `--backends all`
# (or a list) after it replaces that choice.
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
"$PY" -m medir_fast.cli bench --device cuda --config default --precision fp32,bf16,fp16 \
  --backends official,eager,triton,onnxruntime,tensorrt,bm3d \
  --json "$OUT/bench.json" --markdown "$OUT/bench.md" --overwrite "$@" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
