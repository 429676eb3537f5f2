"""Held-out world splits for ``regionsearch eval``: rendered once into a cache, never a
training scene.

The world's training code renders its scenes from seeds 1234–1238 (reference CLIP: training
shard, in-training eval, final zero-shot sets; ``data_seed`` to ``data_seed + 4``), 5678–5682,
2468–2472, 3579–3583, 4680–4684 and 5791–5795 (the same for the fresh shards of reference-v5,
-v6, -v7, -v8 and the next GPU phase) and 4321–4322 (Alpha-CLIP), and ``regionsearch world generate`` defaults to 7. The evaluation split
uses :data:`EVAL_WORLD_SEED` = 90417, which none of them uses; on top of that the generator
seeds each scene with ``(seed, index)`` while training draws its scenes from one ``(seed)``
stream, or (a parallel render) from one ``(seed, chunk)`` stream per 2,000 scenes, so no
training scene can reappear. A ``--seed`` from the training set is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Seed of held-out world splits (distinct from every seed the training code uses, see above).
EVAL_WORLD_SEED = 90417
#: Seeds the world's training code renders from; refused for evaluation splits.
TRAINING_WORLD_SEEDS = frozenset(
    {
        7,
        *range(1234, 1239),
        *range(5678, 5683),
        *range(2468, 2473),
        *range(3579, 3584),
        *range(4680, 4685),
        *range(5791, 5796),
        4321,
        4322,
    }
)
WORLD_MIN_OBJECTS = 3
WORLD_MAX_OBJECTS = 6
WORLD_SIZE = 224


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/regionsearch/eval-worlds`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "regionsearch" / "eval-worlds"


def heldout_world(
    n: int,
    seed: int = EVAL_WORLD_SEED,
    cache_dir: Path | None = None,
    min_objects: int = WORLD_MIN_OBJECTS,
    max_objects: int = WORLD_MAX_OBJECTS,
    size: int = WORLD_SIZE,
    family: str | None = None,
) -> Path:
    """Folder of a held-out world split, generated on first use and reused afterwards.

    ``family`` renders world v2 scenes of that family (``heldout``: renderings the v2
    reference model never saw in training); ``None`` keeps the version-1 world.

    Written to a temporary sibling and renamed when complete, so an interrupted run never
    leaves a half-written split that a later run would trust.
    """
    from regionsearch.eval.datasets import EvalError
    from regionsearch.eval.world.generate import generate_dataset

    if n < 1:
        raise EvalError(f"--world-generate needs at least 1 scene, got {n}")
    if seed in TRAINING_WORLD_SEEDS:
        raise EvalError(
            f"seed {seed} renders scenes the reference models were trained or tuned on; "
            f"use another one (default {EVAL_WORLD_SEED})"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"heldout-seed{seed}-n{n}-obj{min_objects}-{max_objects}-s{size}"
    if family is not None:
        folder = folder.with_name(f"{folder.name}-v2-{family}")
    if (folder / "captions.json").is_file():
        return folder
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(
        tmp,
        n=n,
        seed=seed,
        size=size,
        min_objects=min_objects,
        max_objects=max_objects,
        family=family,
    )
    if folder.exists():  # a concurrent run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder
