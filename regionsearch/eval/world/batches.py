"""Pre-rendered training data for the reference CLIP: shards on disk, batches from memory.

Rendering inside the training loop would cost as much CPU as the model itself on this machine,
and encoding captions with the frozen MiniLM tower per step would cost far more. So scenes are
rendered once from a *pool* of class lists (each pool entry is rendered many times with new
layouts), the pool's captions are few enough to encode once, and a batch is only an index
lookup plus a flip into a preallocated tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionsearch.eval.world.scene import Scene, render_scene
from regionsearch.eval.world.scene_v2 import render_scene_v2
from regionsearch.eval.world.text import list_caption
from regionsearch.eval.world.train_losses import patch_classes
from regionsearch.eval.world.vocab import COLOUR_NAMES, SHAPES, class_names
from regionsearch.eval.world.worlds import world_family

#: Templates for single-object training captions; the first one is the zero-shot prompt.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {}.",
    "a picture of a {}.",
    "a rendering of a {}.",
    "itap of a {}.",
)
#: Templates for multi-object captions (``{}`` is the object list).
MULTI_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "{}.", "a picture with {}.")

#: Object-count groups the curriculum mixes: 1 object, 2-3 objects, 4-6 objects.
GROUPS: tuple[tuple[int, int], ...] = ((1, 1), (2, 3), (4, 6))
MAX_OBJECTS = 6


def _names(class_ids: list[int]) -> list[str]:
    names = class_names()
    return [names[c] for c in class_ids]


def hard_negative(
    class_ids: list[int], rng: np.random.Generator, shape_share: float = 0.5
) -> list[int]:
    """The same class list with one object's colour *or* shape changed to a class not present.

    Such captions differ from the true one in a single attribute, so they teach the image tower
    to bind colour to shape instead of recognising a bag of words. ``shape_share`` is the chance
    of changing the shape: in scenes where several objects share a colour, only a shape change
    makes a negative that colour cannot reject.
    """
    n_shapes = len(SHAPES)
    present = set(class_ids)
    for _ in range(100):
        k = int(rng.integers(len(class_ids)))
        colour, shape = divmod(class_ids[k], n_shapes)
        if rng.random() >= shape_share:
            colour = int(rng.integers(len(COLOUR_NAMES)))
        else:
            shape = int(rng.integers(n_shapes))
        new = colour * n_shapes + shape
        if new not in present:
            out = list(class_ids)
            out[k] = new
            return out
    raise RuntimeError("could not build a hard negative")  # pragma: no cover


@dataclass
class CaptionPool:
    """Class lists the training scenes are drawn from, with their caption texts.

    ``entries[i]`` is a list of class ids; ``texts`` holds every caption to encode; for entry
    ``i``, ``pos_text[i]`` lists its positive caption indices (several templates for single
    objects) and ``neg_text[i]`` its hard-negative caption index (-1 for single objects, whose
    hard negatives are the 63 other class prompts).
    """

    entries: list[list[int]]
    texts: list[str]
    pos_text: list[list[int]]
    neg_text: list[int]
    group: list[int]

    @property
    def bank_text(self) -> list[int]:
        """Caption index of ``"a photo of a {class}."`` for each of the 64 classes."""
        return [self.pos_text[c][0] for c in range(len(class_names()))]


def same_colour_list(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` distinct classes of which at least two share a colour (with different shapes)."""
    n_shapes = len(SHAPES)
    k = int(rng.integers(2, n + 1))
    colour = int(rng.integers(len(COLOUR_NAMES)))
    ids = [colour * n_shapes + int(s) for s in rng.choice(n_shapes, size=k, replace=False)]
    while len(ids) < n:
        c = int(rng.integers(len(class_names())))
        if c not in ids:
            ids.append(c)
    return [ids[int(i)] for i in rng.permutation(n)]


def build_caption_pool(
    seed: int, n_multi: int, same_colour_share: float = 0.0, shape_negative_share: float = 0.5
) -> CaptionPool:
    """64 single-class entries plus ``n_multi`` distinct multi-object class lists (no repeats).

    ``same_colour_share`` of the multi-object lists give one colour to several shapes (world v2),
    and ``shape_negative_share`` of their hard negatives change a shape rather than a colour.
    """
    rng = np.random.default_rng(seed)
    n_classes = len(class_names())
    entries: list[list[int]] = [[c] for c in range(n_classes)]
    texts: list[str] = []
    pos_text: list[list[int]] = []
    neg_text: list[int] = []
    group: list[int] = []
    for c in range(n_classes):
        idx = []
        for template in SINGLE_TEMPLATES:
            idx.append(len(texts))
            texts.append(template.format(class_names()[c]))
        pos_text.append(idx)
        neg_text.append(-1)
        group.append(0)
    seen: set[tuple[int, ...]] = set()
    per_group = [n_multi // 2, n_multi - n_multi // 2]
    for g, count in zip((1, 2), per_group, strict=True):
        lo, hi = GROUPS[g]
        made = 0
        while made < count:
            n = int(rng.integers(lo, hi + 1))
            if rng.random() < same_colour_share:
                ids = same_colour_list(rng, n)
            else:
                ids = [int(c) for c in rng.choice(n_classes, size=n, replace=False)]
            key = tuple(sorted(ids))
            if key in seen:
                continue
            seen.add(key)
            template = MULTI_TEMPLATES[int(rng.integers(len(MULTI_TEMPLATES)))]
            entries.append(ids)
            pos_text.append([len(texts)])
            texts.append(template.format(list_caption(_names(ids))))
            neg_text.append(len(texts))
            texts.append(
                template.format(list_caption(_names(hard_negative(ids, rng, shape_negative_share))))
            )
            group.append(g)
            made += 1
    return CaptionPool(entries, texts, pos_text, neg_text, group)


#: Scenes per independently seeded chunk of a parallel render: fixed, so a shard depends on
#: its seed and this size, never on how many workers rendered it.
RENDER_CHUNK = 2000


def render_training_shard(
    out_dir: Path,
    pool: CaptionPool,
    n_scenes: int,
    seed: int,
    image_size: int,
    single_size_range: tuple[float, float] = (0.15, 0.75),
    multi_size_range: tuple[float, float] = (0.15, 0.45),
    with_masks: bool = False,
    progress: bool = True,
    world: str = "v1",
    workers: int = 1,
    chunk: int = RENDER_CHUNK,
) -> Path:
    """Render ``n_scenes`` scenes (a third per object-count group) into ``out_dir/shard.npz``.

    Single objects get a wider size range than the world default: it is free scale augmentation
    (objects spanning one to six patches), which the region embedders need because they run
    the ViT at larger inputs than it was trained on.

    ``workers > 1`` renders chunks of ``chunk`` scenes in parallel processes, chunk
    ``k`` from the seed ``[seed, k]`` (a GPU machine's many cores render a large shard in the
    time one core renders a small one); ``workers == 1`` renders one stream from ``seed``. The
    two give different (equally distributed) shards, so callers cache them under different names.
    """
    family = world_family(world)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = _RenderJob(pool, image_size, single_size_range, multi_size_range, family, with_masks)
    if workers <= 1:
        arrays = job.render(0, n_scenes, np.random.default_rng(seed), progress)
    else:
        arrays = _render_parallel(job, n_scenes, seed, workers, chunk, progress)
    path = out_dir / "shard.npz"
    np.savez(path, **arrays)
    (out_dir / "meta.json").write_text(
        json.dumps(
            {
                "n_scenes": n_scenes,
                "seed": seed,
                "image_size": image_size,
                "world": world,
                "chunk": chunk if workers > 1 else None,
            },
            indent=1,
        )
    )
    return path


@dataclass(frozen=True)
class _RenderJob:
    """What every scene of a shard shares (picklable, so worker processes can render chunks)."""

    pool: CaptionPool
    image_size: int
    single_size_range: tuple[float, float]
    multi_size_range: tuple[float, float]
    family: str | None
    with_masks: bool

    def render(
        self, start: int, stop: int, rng: np.random.Generator, progress: bool = False
    ) -> dict[str, np.ndarray]:
        """Scenes ``start .. stop - 1`` of the shard (scene ``i`` is of group ``i % 3``)."""
        n, size = stop - start, self.image_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        entry = np.zeros(n, dtype=np.int32)
        classes = np.full((n, MAX_OBJECTS), -1, dtype=np.int16)
        areas = np.zeros((n, MAX_OBJECTS), dtype=np.float32)
        masks = np.zeros((n, MAX_OBJECTS, size, size), dtype=bool) if self.with_masks else None
        pool = self.pool
        by_group = [[i for i, g in enumerate(pool.group) if g == k] for k in range(len(GROUPS))]
        iterator = range(start, stop)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="render", mininterval=10)
        for i in iterator:
            g = i % len(GROUPS)
            e = by_group[g][int(rng.integers(len(by_group[g])))]
            ids = pool.entries[e]
            size_range = self.single_size_range if g == 0 else self.multi_size_range
            pairs = [(COLOUR_NAMES[c // len(SHAPES)], SHAPES[c % len(SHAPES)]) for c in ids]
            for _ in range(20):
                if self.family is not None:
                    scene = square_scene(
                        render_scene_v2(
                            rng, self.family, size, classes=pairs, size_range=size_range
                        ),
                        size,
                    )
                else:
                    scene = render_scene(
                        rng, size, classes=pairs, size_range=size_range, supersample=4
                    )
                if len(scene.objects) == len(ids):
                    break
                size_range = (size_range[0] * 0.8, size_range[1] * 0.8)
            else:  # pragma: no cover - placements virtually always succeed
                continue
            j = i - start
            images[j] = scene.image
            entry[j] = e
            for k, obj in enumerate(scene.objects):
                classes[j, k] = ids[k]
                areas[j, k] = obj.area
                if masks is not None:
                    masks[j, k] = scene.masks[k]
        arrays = {"images": images, "entry": entry, "classes": classes, "areas": areas}
        if masks is not None:
            arrays["masks"] = np.packbits(masks, axis=-1)
        return arrays


def _render_parallel(
    job: _RenderJob, n_scenes: int, seed: int, workers: int, chunk: int, progress: bool
) -> dict[str, np.ndarray]:
    """Chunks of ``chunk`` scenes rendered in ``workers`` processes, concatenated in order."""
    from concurrent.futures import ProcessPoolExecutor

    bounds = [(s, min(s + chunk, n_scenes)) for s in range(0, n_scenes, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as executor:
        futures = [
            executor.submit(job.render, start, stop, np.random.default_rng([seed, k]))
            for k, (start, stop) in enumerate(bounds)
        ]
        if progress:
            from concurrent.futures import as_completed

            from tqdm import tqdm

            for _ in tqdm(as_completed(futures), total=len(futures), desc="render chunks"):
                pass
        parts = [f.result() for f in futures]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def square_scene(scene: Scene, size: int) -> Scene:
    """The scene resized to ``size`` x ``size`` as the backbone resizes photos (no crop).

    Masks follow with nearest-neighbour resizing; object areas are recounted on them, so the
    area-weighted class targets describe what the model actually sees.
    """
    if scene.image.shape[:2] == (size, size):
        return scene
    image = np.asarray(Image.fromarray(scene.image).resize((size, size), Image.Resampling.BICUBIC))
    masks = (
        np.stack(
            [
                np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST))
                for m in scene.masks
            ]
        )
        if len(scene.masks)
        else np.zeros((0, size, size), dtype=bool)
    )
    objects = [
        replace(o, area=max(int(m.sum()), 1)) for o, m in zip(scene.objects, masks, strict=True)
    ]
    return Scene(image=image, masks=masks, objects=objects, background=scene.background)


class TrainingBatches:
    """Random batches from a rendered shard, held in memory as uint8.

    ``sample`` draws scenes with per-group weights (the curriculum), applies random horizontal
    and vertical flips (captions carry no spatial words, and the shapes' names are flip
    invariant), and returns normalised float images plus the label arrays.

    With a CUDA ``device`` the whole shard (and its masks, unpacked) lives on the GPU, so a
    batch never crosses the bus; on the CPU masks stay bit-packed (eight times less memory)
    unless ``unpack_masks`` says otherwise.
    """

    def __init__(
        self,
        shard: Path,
        pool: CaptionPool,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        transpose: bool = False,
        device: str | torch.device = "cpu",
        unpack_masks: bool | None = None,
    ) -> None:
        self.transpose = transpose
        self.device = torch.device(device)
        data = np.load(shard)
        on = self.device
        self.images = torch.from_numpy(data["images"]).to(on).permute(0, 3, 1, 2).contiguous()
        #: Pool entry per scene, on the host (caption lookups: no device sync per batch) and on
        #: ``device`` (the loss's same-caption matrix).
        self.entry_host = data["entry"].astype(np.int64)
        self.entry = torch.from_numpy(self.entry_host).to(on)
        self.classes = torch.from_numpy(data["classes"].astype(np.int64)).to(on)
        self.areas = torch.from_numpy(data["areas"]).to(on)
        self.masks_packed = data["masks"] if "masks" in data.files else None
        self.masks: torch.Tensor | None = None
        if unpack_masks is None:
            unpack_masks = on.type != "cpu"
        if self.masks_packed is not None and unpack_masks:
            size = self.images.shape[-1]
            self.masks = torch.from_numpy(
                np.unpackbits(self.masks_packed, axis=-1, count=size).view(bool)
            ).to(on)
            self.masks_packed = None
        self.pool = pool
        group = np.asarray(pool.group)[data["entry"]]
        self.by_group = [np.nonzero(group == g)[0] for g in range(len(GROUPS))]
        self.mean = torch.tensor(mean, device=on).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=on).view(1, 3, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.entry)

    def sample_indices(
        self, rng: np.random.Generator, batch_size: int, weights: list[float]
    ) -> np.ndarray:
        """Scene indices for one batch, ``weights`` giving the share of each object-count group."""
        w = np.asarray(weights, dtype=np.float64)
        counts = rng.multinomial(batch_size, w / w.sum())
        parts = [
            rng.choice(self.by_group[g], size=c, replace=True) for g, c in enumerate(counts) if c
        ]
        return np.concatenate(parts)

    def _index(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device)

    def _symmetries(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """Random horizontal flips, vertical flips and (with ``transpose``) diagonal mirrors."""
        flip_h = rng.random(n) < 0.5
        flip_v = rng.random(n) < 0.5
        swap = rng.random(n) < 0.5 if self.transpose else np.zeros(n, dtype=bool)
        return tuple(torch.from_numpy(f).to(self.device) for f in (flip_h, flip_v, swap))

    @staticmethod
    def _apply(x: torch.Tensor, symmetries: tuple[torch.Tensor, ...]) -> torch.Tensor:
        flip_h, flip_v, swap = symmetries
        x[flip_h] = x[flip_h].flip(-1)
        x[flip_v] = x[flip_v].flip(-2)
        x[swap] = x[swap].transpose(-1, -2)
        return x

    def images_for(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Normalised float images for scene indices, flipped at random when ``rng`` is given.

        With ``transpose`` (world v2) half of them are also mirrored across the diagonal, which
        with the flips gives all eight symmetries of the square: a squashed landscape canvas
        becomes a squashed portrait one, and shape names do not change.
        """
        return self.views_for(idx, rng)[0]

    def views_for(
        self, idx: np.ndarray, rng: np.random.Generator | None = None, patch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images as :meth:`images_for`, and with ``patch`` each patch's object class
        (:func:`~regionsearch.eval.world.train_losses.patch_classes`), flipped like its image."""
        x = self.images[self._index(idx)].float()
        labels = None
        if rng is not None:
            symmetries = self._symmetries(len(idx), rng)
            x = self._apply(x, symmetries)
        if patch is not None:
            masks = self.masks_for(idx)
            if rng is not None:
                masks = self._apply(masks, symmetries)
            labels = patch_classes(masks, self.classes[self._index(idx)], patch)
        return (x - self.mean) / self.std, labels

    def masks_for(self, idx: np.ndarray) -> torch.Tensor:
        """Unpacked ``(B, MAX_OBJECTS, S, S)`` bool masks (only for shards rendered with masks)."""
        if self.masks is not None:
            return self.masks[self._index(idx)]
        if self.masks_packed is None:
            raise ValueError("this shard was rendered without masks")
        size = self.images.shape[-1]
        return torch.from_numpy(
            np.unpackbits(self.masks_packed[idx], axis=-1, count=size).astype(bool)
        )

    def class_targets(self, idx: np.ndarray, n_classes: int) -> torch.Tensor:
        """Area-weighted class distribution per scene: the dominant object gets the most mass."""
        at = self._index(idx)
        cls, area = self.classes[at], self.areas[at]
        target = torch.zeros(len(idx), n_classes, device=self.device)
        valid = cls >= 0
        target.scatter_add_(1, cls.clamp(min=0), torch.where(valid, area, torch.zeros_like(area)))
        return target / target.sum(dim=1, keepdim=True).clamp(min=1e-6)


def curriculum_weights(progress: float) -> list[float]:
    """Share of (1, 2-3, 4-6)-object scenes at training progress in [0, 1].

    Early on mostly single and few-object scenes (a clean signal for colour and shape); later
    mostly multi-object scenes, so the global embedding describes whole scenes and finding one
    object stays the region embedders' job. Single objects never drop below a quarter, which
    keeps the zero-shot gate stable.
    """
    t = min(max(progress, 0.0), 1.0)
    start, end = np.array([0.55, 0.35, 0.10]), np.array([0.25, 0.40, 0.35])
    mix = 0.5 - 0.5 * math.cos(math.pi * t)
    return list(start * (1 - mix) + end * mix)
