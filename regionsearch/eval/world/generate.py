"""Write a world dataset in COCO format: images, instance masks, captions, referring expressions.

COCO is what the evaluation tools (and pycocotools) already read, so a synthetic dataset drops
into the same code paths as a real one. Each scene uses its own generator seeded by
``(seed, index)``: the files are identical for the same seed, and scene ``i`` does not change
when ``n`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from regionsearch.eval.world.scene import BACKGROUND_KINDS, Scene, render_scene
from regionsearch.eval.world.scene_v2 import get_family, render_scene_v2
from regionsearch.eval.world.text import referring_expressions, scene_caption
from regionsearch.eval.world.vocab import COLOUR_NAMES, SHAPES, class_index, class_names
from regionsearch.masks import rle as rle_mod


@dataclass(frozen=True)
class Difficulty:
    """Scene distribution of one difficulty level."""

    backgrounds: tuple[str, ...]
    size_range: tuple[float, float]
    min_visible: float


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(("flat", "gradient"), (0.25, 0.45), 0.85),
    "normal": Difficulty(BACKGROUND_KINDS, (0.18, 0.45), 0.7),
    "hard": Difficulty(("noise", "clutter"), (0.12, 0.35), 0.6),
}


def render_indexed_scene(
    seed: int,
    index: int,
    size: int = 224,
    min_objects: int = 1,
    max_objects: int = 6,
    difficulty: str = "normal",
    family: str | None = None,
) -> Scene:
    """Scene ``index`` of the dataset with ``seed`` (independent of the other scenes).

    ``family`` renders a world-v2 scene of that family (``size`` is then the short side and
    ``difficulty`` does not apply); ``None`` keeps the version-1 world.
    """
    if family is not None:
        if not 1 <= min_objects <= max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        rng = np.random.default_rng([seed, index])
        return render_scene_v2(
            rng, get_family(family), size, min_objects=min_objects, max_objects=max_objects
        )
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    level = DIFFICULTIES[difficulty]
    rng = np.random.default_rng([seed, index])
    background = level.backgrounds[int(rng.integers(len(level.backgrounds)))]
    return render_scene(
        rng,
        size,
        min_objects=min_objects,
        max_objects=max_objects,
        size_range=level.size_range,
        background=background,
        min_visible=level.min_visible,
    )


def categories() -> list[dict[str, Any]]:
    """All 64 categories, id = class index + 1, named ``"{colour} {shape}"``."""
    return [
        {
            "id": class_index(c, s) + 1,
            "name": f"{c} {s}",
            "supercategory": s,
            "colour": c,
            "shape": s,
        }
        for c in COLOUR_NAMES
        for s in SHAPES
    ]


def generate_dataset(
    out: Path,
    n: int = 500,
    seed: int = 7,
    size: int = 224,
    min_objects: int = 1,
    max_objects: int = 6,
    difficulty: str = "normal",
    family: str | None = None,
) -> dict[str, int]:
    """Render ``n`` scenes into ``out`` and write the COCO files; returns counts.

    With ``family`` (world v2) canvases are not square: ``size`` is their short side.
    """
    if family is not None:
        get_family(family)  # a clear error before anything is written
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, expressions, captions = [], [], [], []
    assert len(class_names()) == 64
    ann_id = 0
    for i in range(n):
        scene = render_indexed_scene(seed, i, size, min_objects, max_objects, difficulty, family)
        image_id = i + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(scene.image).save(out / "images" / file_name, optimize=False)
        height, width = scene.image.shape[:2]
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "background": scene.background,
                "family": family or "v1",
            }
        )
        caption_rng = np.random.default_rng([seed, i, 1])
        captions.append(
            {
                "id": image_id,
                "image_id": image_id,
                "caption": scene_caption(scene.objects, caption_rng, (height, width)),
            }
        )
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            ann_id += 1
            rle = rle_mod.encode(mask)
            x, y, w, h = (float(v) for v in rle_mod.bbox(rle))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": class_index(obj.colour, obj.shape) + 1,
                    "segmentation": rle,
                    "area": float(rle_mod.area(rle)),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                    "attributes": {
                        "colour": obj.colour,
                        "shape": obj.shape,
                        "centre": list(obj.centre),
                        "size": obj.size,
                        "rgb": list(obj.rgb),
                        "visible_fraction": round(obj.area / max(obj.full_area, 1), 4),
                        "pattern": obj.pattern,
                    },
                }
            )
            sentences = referring_expressions(
                obj, scene.objects, (height, width), context_relations=family is not None
            )
            if sentences:
                expressions.append({"ann_id": ann_id, "image_id": image_id, "sentences": sentences})
    info = {
        "description": "regionsearch synthetic world",
        "seed": seed,
        "n": n,
        "size": size,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "difficulty": difficulty,
        "world": "v1" if family is None else "v2",
        "family": family,
    }
    instances = {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    (out / "instances.json").write_text(json.dumps(instances))
    (out / "expressions.json").write_text(json.dumps(expressions, indent=0))
    (out / "captions.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": captions}, indent=0)
    )
    return {"images": len(images), "annotations": len(annotations), "expressions": len(expressions)}
