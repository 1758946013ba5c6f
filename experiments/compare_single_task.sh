#!/usr/bin/env bash
# The paper's claim, at equal budget: one all-in-one model vs a single-task model of the same size,
# both trained from scratch with the same steps, batch, crop, learning rate and seed (the single-task
# model sees only MODALITY crops, the all-in-one a third of them), evaluated on MODALITY's held-out slices.
# Usage: bash experiments/compare_single_task.sh [MODALITY=PET] [STEPS=1500] [OUT=~/.cache/medir-fast/runs/compare]
# The two runs go in parallel, one torch thread each.
set -euo pipefail
MODALITY=${1:-PET}
STEPS=${2:-1500}
OUT=${3:-$HOME/.cache/medir-fast/runs/compare}
DATA=$HOME/.cache/medir-fast/protocol-v1
PY=${PYTHON:-python}
train() {  # NAME MODALITIES
    "$PY" -m medir_fast.cli train "$DATA" --out "$OUT/$1" --config slim --steps "$STEPS" --lr 4e-4 \
        --batch-size 6 --crop 64 --seed 0 --threads 1 --save-every 250 --resume --modalities "$2" \
        > "$OUT/$1.log" 2>&1
}
mkdir -p "$OUT"
train all_in_one CT,MRI,PET &
train "single_${MODALITY}" "$MODALITY" &
wait
for run in all_in_one "single_${MODALITY}"; do
    "$PY" -m medir_fast.cli eval "$DATA" --weights "$OUT/$run/weights.pth" --modalities "$MODALITY" \
        --no-baselines --threads 2 --json "$OUT/${run}_${MODALITY}.json"
done
