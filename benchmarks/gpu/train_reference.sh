#!/usr/bin/env bash
# Continue the reference CLIP on a lent GPU machine (H200 here): a large shard rendered on all
# cores, the model and the whole shard on the GPU, batch 512. Needs .gpu/ from
# benchmarks/gpu/prepare.sh (carried). Writes $NAME.{safetensors,json} and the logs to $OUT.
# A 40-step smoke run on a small shard goes first (SMOKE=0 skips it), so a broken setup costs
# seconds. Then (ALPHA_STEPS > 0) the Alpha-CLIP variant of the new model on the GPU too, v8's
# CPU recipe (batch 64, 10,000 v2dr scenes), from the class prompts prepare.sh wrote.
# reference-v7: INIT=<v6 weights> NAME=reference-v7 DATA_SEED=3579 N_SCENES=100000 MINUTES=4;
# reference-v8: INIT=<v7 weights> NAME=reference-v8 DATA_SEED=4680 MINUTES=2.5 SMOKE=0;
# the defaults are the next phase (v9 from v8, data seed 5791: run prepare.sh with the same).
# LAYERS=8 grows the tower first (identity blocks between v8's four, same function at step 0;
# regionsearch/eval/world/model_growth.py). Why: v7/v8 plateaued at ~68% held-out while naming
# only 78.5% of their own training family (underfit). A CPU pilot at batch 64 showed no gain from
# depth (benchmarks/results/model_growth.md); at this script's batch 512 it is untested.
set -euo pipefail
OUT=${OUT:-runs/gpu}
N_SCENES=${N_SCENES:-100000}
MINUTES=${MINUTES:-4}
INIT=${INIT:-regionsearch/models/reference-v8.safetensors}
NAME=${NAME:-reference-v9}
LAYERS=${LAYERS:-4}  # deeper than INIT: grown by --grow (a no-op at INIT's depth)
WORLD=${WORLD:-v2dr}  # v2dr2: + lattice-of-marks fill; v2drp: flat fills rare (marks_fill_pilot.md)
DATA_SEED=${DATA_SEED:-5791}  # a fresh shard per phase; its text features from prepare.sh
ALPHA_STEPS=${ALPHA_STEPS:-1010}
SMOKE=${SMOKE:-1}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu N_SCENES=600 MINUTES=0.2 rehearses the script here
CORES=$(nproc)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cores $CORES"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
common=(--world "$WORLD" --image-size 112 --patch-size 8 --layers "$LAYERS" --width 96 --heads 4
  --init-from "$INIT" --grow --freeze-text-proj
  --n-captions 4000 --same-colour-share 0.5 --shape-negative-share 0.6
  --single-sizes 0.06,0.7 --multi-sizes 0.06,0.45 --data-seed "$DATA_SEED" --dense-weight 1.0
  --n-final 0 --no-text-weights --device "$DEVICE" --threads "$CORES" --render-workers "$CORES"
  --batch-size 512 --lr 8e-4 --curriculum-start 0.3)
for dir in /tmp/smoke /tmp/cache; do mkdir -p $dir && cp .gpu/cache/text-feats-*.npy $dir/; done
t0=$(date +%s)
if [ "$SMOKE" = 1 ]; then
  python3 -m regionsearch.eval.world.cli train-reference "${common[@]}" --out /tmp/smoke/out \
    --name smoke --cache-dir /tmp/smoke --checkpoint /tmp/smoke/resume.pt --n-scenes 600 \
    --steps 40 --minutes 0 --warmup-steps 10 --checkpoint-every 20 >"$OUT/smoke.log" 2>&1 ||
    { tail -40 "$OUT/smoke.log"; exit 1; }
  grep -E "^(step 40 |trainable)" "$OUT/smoke.log"
  echo "smoke run: $(($(date +%s) - t0)) s"
  python3 -m pytest -q -p no:cacheprovider tests/test_train_device.py -k gpu 2>&1 | tail -2 || true
fi
python3 -m regionsearch.eval.world.cli train-reference "${common[@]}" --out "$OUT" \
  --name "$NAME" --cache-dir /tmp/cache --checkpoint /tmp/cache/resume.pt \
  --n-scenes "$N_SCENES" --steps 100000 --minutes "$MINUTES" --warmup-steps 300 \
  --checkpoint-every 500 >"$OUT/train.log" 2>&1 || { tail -40 "$OUT/train.log"; exit 1; }
grep -E "^(rendered|trainable|eval step)" "$OUT/train.log" | tail -12 || true
grep -E "^step " "$OUT/train.log" | tail -3 || true
echo "reference phase: $(($(date +%s) - t0)) s"
if [ "$ALPHA_STEPS" -gt 0 ]; then
  python3 -m regionsearch.eval.world.cli train-alphaclip --models "$OUT" --name "$NAME" \
    --world "$WORLD" --steps "$ALPHA_STEPS" --minutes 0 --n-scenes 10000 --batch-size 64 --seed 0 \
    --device "$DEVICE" --threads "$CORES" --render-workers "$CORES" --cache-dir /tmp/alpha \
    --text-features .gpu/cache/class-text.npz >"$OUT/alphaclip.log" 2>&1 ||
    { tail -40 "$OUT/alphaclip.log"; exit 1; }
  grep -E "^(rendered|before|after)" "$OUT/alphaclip.log" || true
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
echo "total: $(($(date +%s) - t0)) s"
