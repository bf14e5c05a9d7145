#!/usr/bin/env bash
# One CUDA GPU machine, under 5 minutes: what training does with the card.
#   1. bf16 train-step samples/s and MFU of `tiny` and `ViT-B-32` at the largest batch that fits
#      (bench/gpu_step.py: the bare step, batches already on the card);
#   2. a 100-step `train` flow run of ViT-B-32 (bf16, GPU defaults: TF32, fused AdamW; compile off
#      to keep within the time) on synthetic 256 px JPEG shapes: the full path (WebDataset shards,
#      DataLoader workers decoding and cropping, the DataModule, the Lightning Trainer, MLflow);
#   3. the full path's samples/s over the bare step's at the same batch.
#
#     bash bench/gpu.sh                      # BATCH=256 WORKERS=12 STEPS=100 by default
#     OUT=/tmp/gpu-bench BATCH=512 bash bench/gpu.sh
#
# Unmeasured so far: the development machine has no GPU (README, Benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
BATCH=${BATCH:-256}
WORKERS=${WORKERS:-12}
STEPS=${STEPS:-100}
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" PREFECT_SERVER_ANALYTICS_ENABLED=false
export TOKENIZERS_PARALLELISM=false
started=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "load: $(uptime)"

echo "== 1. bare bf16 train step, largest batch that fits"
timeout 150 "$PY" bench/gpu_step.py --models tiny ViT-B-32 --batch-sizes 128 4096 \
    --json "$OUT/step.json"
echo "== bare step at the flow's batch ($BATCH)"
timeout 60 "$PY" bench/gpu_step.py --models ViT-B-32 --batch-sizes "$BATCH" "$BATCH" \
    --json "$OUT/step_at_batch.json"

echo "== 2. a $STEPS-step train flow run (ViT-B-32, bf16, batch $BATCH, $WORKERS workers)"
"$PY" - "$OUT/shapes" "$((BATCH * 24))" <<'EOF'
import sys
sys.path.insert(0, ".")
from bench.train import write_shapes
write_shapes(sys.argv[1], int(sys.argv[2]), 256)
EOF
timeout 240 "$PY" -m flows.train --data "$OUT/shapes" --model ViT-B-32 --max-steps "$STEPS" \
    --batch-size "$BATCH" --precision bf16-mixed --accelerator gpu --devices 1 --out "$OUT/run" \
    --set workers="$WORKERS" --set val_fraction=0 --set compile=false \
    --set checkpoint.every_n_steps=1000 --set mlflow.log_model=false > "$OUT/flow.log" 2>&1 \
    || { tail -40 "$OUT/flow.log"; exit 1; }
tail -3 "$OUT/flow.log"

echo "== 3. full path over the bare step"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
records = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
rates = [r["perf/samples_per_s"] for r in records if "perf/samples_per_s" in r]
bare = json.loads((out / "step_at_batch.json").read_text())["models"]["ViT-B-32"]["samples_per_s"]
full = max(rates)
print(f"full path {full:,.0f} samples/s (best of {len(rates)} windows; all "
      f"{[round(r) for r in rates]}), bare step {bare:,.0f} samples/s: ratio {full / bare:.2f}")
print(f"data-wait fraction per window: "
      f"{[round(r['perf/data_wait_frac'], 3) for r in records if 'perf/data_wait_frac' in r]}")
EOF
echo "total $(( $(date +%s) - started )) s; outputs in $OUT"
