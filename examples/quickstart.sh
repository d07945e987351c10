#!/usr/bin/env bash
# The README's main job: for bundled models with different attention families,
# export to ONNX, show what attnc finds, compile (fusion passes + ONNX Runtime
# artefact) and validate the artefact against PyTorch with an accuracy-diff report.
#
#   bash examples/quickstart.sh [OUT_DIR] [MODEL ...]
#
# Exits non-zero if any validation fails.
set -euo pipefail

out=${1:-runs/quickstart}
shift || true
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(vit-agent-small vit-neighborhood-small vit-flow-small lm-linear-small vit-mhsa-small)
fi

for model in "${models[@]}"; do
  dir="$out/$model"
  echo "=== $model"
  attnc export "$model" -o "$dir/model.onnx"
  attnc inspect "$dir/model.onnx" | sed -n '1,20p'
  attnc compile "$dir/model.onnx" -o "$dir/compiled"
  attnc validate "$dir/compiled" --model "$model"
done
echo "reports: $out/*/compiled/report.html"
