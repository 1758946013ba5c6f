#!/usr/bin/env bash
# Fine-tune `slim` weights on one GPU, on protocol-v1 pairs degraded afresh
# (`medir-fast train --simulate`, starting from the shipped weights unless a run says --init),
# several settings side by side in one short session, each given as "NAME: train options".
# Needs python3 with PyTorch (CUDA), numpy, scipy, tqdm; nibabel is taken from ./.whl if missing.
# Source volumes come from $MEDIR_FAST_CACHE/sources (default ./.gpu-cache, a copy of the cache's
# `sources/`, since such a machine may be offline). Weights, run records (NAME.json) and logs go
# to $OUT (default runs/gpu).
# Usage: MINUTES=6.5 bash experiments/gpu_train.sh "A: --crop 96 --batch-size 24 --lr 1e-4" \
#                                             "B: --crop 64 --batch-size 48 --lr 2e-4"
# STEPS=N gives every run N steps instead of MINUTES of training; INIT= (empty) trains from scratch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
MINUTES="${MINUTES:-6.5}"
INIT="${INIT-default}"
BUDGET=(--time-budget "$MINUTES"); [ -n "${STEPS:-}" ] && BUDGET=(--steps "$STEPS")
mkdir -p "$OUT"
export MEDIR_FAST_CACHE="${MEDIR_FAST_CACHE:-$PWD/.gpu-cache}" PYTHONUNBUFFERED=1
if ! python3 -c "import nibabel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
# The projector on the GPU must give the CPU's noiseless reconstruction (same code, other device).
python3 - <<'EOF' 2>&1 | tee -a "$OUT/device.txt"
import time, numpy as np, torch
from medir_fast.lab import paired, simulate
print("torch", torch.__version__, torch.cuda.get_device_name())
volume, zooms = paired.clean_volume("ct_cranium", paired.fetch(names=("ct_cranium",))["ct_cranium"])
hu = volume[40:44]
lq_cpu, hq_cpu = simulate.simulate_ct(hu, zooms[0], seed=1)
torch.cuda.synchronize(); t = time.perf_counter()
lq_gpu, hq_gpu = simulate.simulate_ct(hu, zooms[0], seed=1, device="cuda")
torch.cuda.synchronize()
print(f"CT projector cuda vs cpu, 4 slices 256x256: target max |diff| {np.abs(hq_gpu - hq_cpu).max():.4f} HU; "
      f"noise std cuda {np.std(lq_gpu - hq_gpu):.2f} vs cpu {np.std(lq_cpu - hq_cpu):.2f} HU; {time.perf_counter() - t:.2f} s")
EOF

train() {  # name, then train options
  local name=$1; shift
  python3 -m medir_fast.cli train --simulate ${INIT:+--init "$INIT"} --device cuda --threads 4 "${BUDGET[@]}" \
      --pool-slices 48 --refresh-every 50 --save-every 500 --out "/tmp/runs/$name" "$@" 2>&1 \
    | tr '\r' '\n' | awk '!/s of training/ || NR % 100 == 0' > "$OUT/$name.log"
  cp "/tmp/runs/$name/weights.pth" "$OUT/$name.pth" && cp "/tmp/runs/$name/run.json" "$OUT/$name.json"
}
names=()
for run in "$@"; do
  names+=("${run%%:*}")
  train "${run%%:*}" ${run#*:} &
done
wait
for name in "${names[@]}"; do echo "== $name"; tail -n 3 "$OUT/$name.log"; done
ls -la "$OUT"
