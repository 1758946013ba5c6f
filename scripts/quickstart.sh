#!/usr/bin/env bash
# Install into .venv, fetch a real low-dose CT example (head CT from Debian's invesalius-examples,
# degraded with protocol v1), restore it with the shipped default weights, write a preview.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p example
.venv/bin/medir-fast example ct_denoise -o example/ct_lowdose.nii.gz --overwrite
.venv/bin/medir-fast infer example/ct_lowdose.nii.gz --task ct_denoise -o example/ct_restored.nii.gz \
    --preview example/ct_restored.png --overwrite
echo "restored volume: example/ct_restored.nii.gz, preview: example/ct_restored.png"
