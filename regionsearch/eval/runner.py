"""Run region embedders over a dataset's ground-truth masks and score the benchmark tasks.

Every requested embedder sees exactly the same images and masks: the runner walks the dataset
once, decodes each image once, and hands its masks to each embedder in turn (one ``embed`` call
per image and embedder, timed on its own). Text embeddings go through a per-model
:class:`TextCache`, so class prompts and sentences are encoded once however many embedders are
compared. Scoring happens at the end, with the pure functions of :mod:`regionsearch.eval.tasks`.

Results are flat rows ``{dataset, model, embedder, task, metric, value, n}`` plus the timing keys
``seconds_per_image`` and ``seconds_per_mask`` (embedding time only: no image decoding, no text,
no scoring), which :mod:`regionsearch.eval.report` turns into tables, JSON and charts.

MaskInversion and referring expressions: the paper optimises expression embeddings with
``alpha=5`` (a pull towards the whole-image embedding, which keeps the context that relations
such as "left of the star" need) and class embeddings with ``alpha=0``. :func:`expression_variant`
builds that second MaskInversion setting as its own spec, labelled e.g.
``"maskinversion (alpha=5)"``, that is run for the expression tasks only; the plain
``maskinversion`` spec still reports expression rows too (its class-task embeddings cost nothing
more to score), so both settings stay visible side by side.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from regionsearch.backbone import DEFAULT_TEMPLATES, Backbone
from regionsearch.embedders import RegionEmbedder, get_embedder, list_embedders
from regionsearch.eval.datasets import DatasetError, EvalError, RegionDataset
from regionsearch.eval.tasks import (
    TASKS,
    accuracy,
    classification_hits,
    colour_ambiguous,
    expression_to_mask_hits,
    mask_to_expression_hits,
    pointing_hits,
    retrieval_hits,
)

#: Label of the pointing-game rows: they measure the model's LeGrad maps, not an embedder.
POINTING_LABEL = "LeGrad map (model)"

ROW_KEYS: tuple[str, ...] = ("dataset", "model", "embedder", "task", "metric", "value", "n")
TIMING_KEYS: tuple[str, ...] = ("seconds_per_image", "seconds_per_mask")


@dataclass(frozen=True)
class EmbedderSpec:
    """One embedder to evaluate: registry ``name``, constructor ``options``, a display ``label``
    and the task groups it feeds (``None`` = all requested ones)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    tasks: tuple[str, ...] | None = None

    @property
    def display(self) -> str:
        return self.label or self.name

    def build(self, backbone: Backbone) -> RegionEmbedder:
        """The embedder; a setting it refuses (``--lr 0``) is an :class:`EvalError` naming it."""
        try:
            return get_embedder(self.name, backbone, **self.options)
        except (TypeError, ValueError) as exc:
            raise EvalError(f"embedder {self.display!r}: {exc}") from None


def parse_embedders(value: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma list → registry names, in the given order, checked."""
    names = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if not names or names == ["all"]:
        return list_embedders()
    unknown = [n for n in names if n not in list_embedders()]
    if unknown:
        raise EvalError(
            f"unknown embedder(s) {', '.join(unknown)}; choose from: all, {', '.join(list_embedders())}"
        )
    return list(dict.fromkeys(names))


def variant(
    spec: EmbedderSpec, tasks: tuple[str, ...] | None = None, **overrides: Any
) -> EmbedderSpec:
    """A copy of ``spec`` with ``overrides``, labelled ``"name (key=value, ...)"``, that feeds
    ``tasks`` (``None``: all requested ones) — one more row of the same embedder."""
    suffix = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items()
    )
    return EmbedderSpec(
        spec.name, {**spec.options, **overrides}, label=f"{spec.display} ({suffix})", tasks=tasks
    )


def expression_variant(spec: EmbedderSpec, **overrides: Any) -> EmbedderSpec:
    """:func:`variant` for the expression tasks only (see the module docstring for why
    MaskInversion wants one)."""
    return variant(spec, ("expressions",), **overrides)


class TextCache:
    """Text embeddings of one backbone, memoised per (templates, text).

    The cache belongs to one model (embeddings of different models live in different spaces);
    :meth:`encode` batches only the texts it has not seen.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._store: dict[tuple[tuple[str, ...] | None, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def encode(self, texts: Sequence[str], templates: Sequence[str] | None) -> torch.Tensor:
        """``(T, d)`` L2-normalised embeddings of ``texts`` (``templates=None``: free-form)."""
        key = tuple(templates) if templates else None
        missing = list(dict.fromkeys(t for t in texts if (key, t) not in self._store))
        if missing:
            vectors = self.backbone.encode_text(missing, templates=key).cpu()
            self._store.update({(key, t): v for t, v in zip(missing, vectors, strict=True)})
        if not texts:
            return torch.zeros(0, self.backbone.embed_dim)
        return torch.stack([self._store[(key, t)] for t in texts])


def class_templates(backbone: Backbone) -> tuple[str, ...]:
    """The prompt template the model was trained/evaluated with, else CLIP's default.

    Bundled models record theirs in their JSON (``training.zero_shot_prompt``); open_clip
    models get ``"a photo of a {}."`` as in the MaskInversion paper.
    """
    training = backbone.extra.get("config", {}).get("training", {})
    prompt = training.get("zero_shot_prompt") if isinstance(training, dict) else None
    return (prompt,) if isinstance(prompt, str) and "{}" in prompt else DEFAULT_TEMPLATES


@dataclass
class EmbedderRun:
    """What one embedder produced on the dataset, with its settings and embedding time."""

    label: str
    settings: dict[str, object]
    tasks: tuple[str, ...]
    embeddings: list[torch.Tensor] = field(default_factory=list)  # one (M_i, d) per image
    seconds: float = 0.0
    masks: int = 0

    @property
    def images(self) -> int:
        return len(self.embeddings)

    def timing(self) -> dict[str, float]:
        return {
            "seconds_per_image": self.seconds / max(self.images, 1),
            "seconds_per_mask": self.seconds / max(self.masks, 1),
        }


@dataclass
class EvalResult:
    """Rows for the report plus what produced them."""

    dataset: str
    model: str
    rows: list[dict[str, Any]]
    runs: list[EmbedderRun]
    class_templates: tuple[str, ...]
    counts: dict[str, int]
    wall_seconds: float


@dataclass
class _GroundTruth:
    labels: list[np.ndarray] = field(default_factory=list)
    sentences: list[list[str]] = field(default_factory=list)
    owners: list[np.ndarray] = field(default_factory=list)
    ambiguous: list[np.ndarray] = field(default_factory=list)
    pointing: list[np.ndarray] = field(default_factory=list)
    pointing_ambiguous: list[np.ndarray] = field(default_factory=list)


class PointingGame:
    """LeGrad maps of each mask's own class text, scored by :func:`pointing_hits`.

    Uses the last block only (as MaskInversion does) at the model's region resolution: the
    map MaskInversion has to match is exactly this one, so a model that cannot point cannot
    be inverted either.
    """

    def __init__(
        self, backbone: Backbone, cache: TextCache, class_names: Sequence[str], templates: tuple
    ) -> None:
        from regionsearch.embedders.legrad import LeGrad

        self.backbone = backbone
        self.legrad = LeGrad(backbone.vit, layers=1)
        self.class_vectors = cache.encode(list(class_names), templates)

    @torch.no_grad()
    def hits(self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> tuple:
        """``(hits, scored)`` of :func:`pointing_hits` for one image."""
        pixels = self.backbone.preprocess(image, self.backbone.region_resolution)[None]
        queries = self.class_vectors[torch.as_tensor(labels)].to(self.backbone.device)
        maps = self.legrad.maps(pixels, queries, size=masks.shape[-2:])
        return pointing_hits(maps[0].cpu(), masks, labels)


def check_tasks(tasks: Iterable[str], known: Sequence[str] = tuple(TASKS)) -> tuple[str, ...]:
    """``tasks`` without repeats; :class:`EvalError` naming every task in ``known`` when one is
    not among them (the CLI passes the runner's tasks plus ``search``)."""
    tasks = tuple(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise EvalError(f"unknown task(s) {unknown or tasks}; choose from: {', '.join(known)}")
    return tasks


def run_eval(
    dataset: RegionDataset | Iterable[Any],
    backbone: Backbone,
    specs: Sequence[EmbedderSpec],
    tasks: Sequence[str] = ("classes", "expressions"),
    *,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    text_cache: TextCache | None = None,
    dataset_name: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Embed every ground-truth mask with every spec and score ``tasks``.

    Args:
        dataset: a :class:`RegionDataset` (or any iterable of
            :class:`~regionsearch.eval.datasets.ImageRegions` with ``class_names`` given).
        backbone: the model all embedders share; its text tower encodes the queries.
        specs: embedders to compare.
        tasks: task groups from :data:`regionsearch.eval.tasks.TASKS`.
        class_names: class texts (default ``dataset.class_names``).
        templates: prompt templates for class names (default :func:`class_templates`).
        text_cache: reuse text embeddings across calls with the same backbone.
        dataset_name: label in the rows (default ``dataset.name``).
        progress: show a tqdm bar over (image, embedder) steps.
    """
    from tqdm import tqdm

    tasks = check_tasks(tasks)
    if not specs:
        raise EvalError("no embedders to evaluate")
    if class_names is None:
        class_names = getattr(dataset, "class_names", None)
    if ("classes" in tasks or "pointing" in tasks) and not class_names:
        raise DatasetError(
            "the classes and pointing tasks need class names (the dataset has no categories)"
        )
    templates = tuple(templates) if templates else class_templates(backbone)
    cache = text_cache or TextCache(backbone)
    if cache.backbone is not backbone:
        raise ValueError("text_cache belongs to another backbone: text embeddings would not match")
    name = dataset_name or getattr(dataset, "name", "dataset")
    class_colours = getattr(dataset, "class_colours", None)
    has_colours = bool(class_colours) and any(c is not None for c in class_colours)
    pointing = (
        PointingGame(backbone, cache, class_names, templates) if "pointing" in tasks else None
    )

    runs = [
        EmbedderRun(s.display, {}, tuple(t for t in (s.tasks or tasks) if t in tasks))
        for s in specs
    ]
    active = [(s, r) for s, r in zip(specs, runs, strict=True) if r.tasks]
    embedders = []
    for spec, run in active:
        embedder = spec.build(backbone)
        run.settings = embedder.describe()
        embedders.append(embedder)

    truth = _GroundTruth()
    start = time.perf_counter()
    total = len(dataset) * len(active) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, desc="eval", unit="step", disable=not progress, mininterval=1.0)
    try:
        for item in dataset:
            truth.labels.append(np.asarray(item.labels, dtype=np.int64))
            if has_colours:
                truth.ambiguous.append(colour_ambiguous(item.labels, class_colours))
            if pointing is not None:
                hits, scored = pointing.hits(item.image, item.masks, truth.labels[-1])
                truth.pointing.append(hits)
                if has_colours:
                    truth.pointing_ambiguous.append(hits[truth.ambiguous[-1][scored]])
            sentences = [s for group in item.expressions for s in group]
            owners = [m for m, group in enumerate(item.expressions) for _ in group]
            truth.sentences.append(sentences)
            truth.owners.append(np.asarray(owners, dtype=np.int64))
            for (_spec, run), embedder in zip(active, embedders, strict=True):
                bar.set_postfix_str(f"{run.label} img {item.image_id}", refresh=False)
                tick = time.perf_counter()
                vectors = embedder.embed(item.image, item.masks)
                run.seconds += time.perf_counter() - tick
                run.masks += item.num_masks
                run.embeddings.append(vectors)
                bar.update(1)
    finally:
        bar.close()
    if not truth.labels:
        raise DatasetError(f"{name}: no image with a usable mask was found")

    all_sentences = [s for group in truth.sentences for s in group]
    if "expressions" in tasks and not all_sentences:
        raise DatasetError(
            f"{name} has no referring expressions for its masks: pass --expressions FILE "
            "or run --tasks classes"
        )
    class_vectors = cache.encode(list(class_names), templates) if "classes" in tasks else None
    if all_sentences and "expressions" in tasks:
        cache.encode(list(dict.fromkeys(all_sentences)), None)

    model = backbone.name
    rows: list[dict[str, Any]] = []
    for run in runs:
        if not run.tasks:
            continue

        def add(task: str, metric: str, hits: Any, run: EmbedderRun = run) -> None:
            value, n = accuracy(hits)
            rows.append(
                {
                    "dataset": name,
                    "model": model,
                    "embedder": run.label,
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "n": n,
                    **run.timing(),
                }
            )

        if "classes" in run.tasks:
            regions, labels = torch.cat(run.embeddings), np.concatenate(truth.labels)
            hits = classification_hits(regions, class_vectors, labels, ks=(1, 5))
            add("classes", "acc@1", hits[1])
            add("classes", "acc@5", hits[5])
            ambiguous = np.concatenate(truth.ambiguous) if has_colours else np.zeros(0, bool)
            if ambiguous.any():
                add("classes (same colour)", "acc@1", hits[1][ambiguous])
            average_precision, top1 = retrieval_hits(regions, class_vectors, labels)
            add("retrieval", "mAP", average_precision)
            add("retrieval", "acc@1", top1)
        if "expressions" in run.tasks:
            to_text, to_mask = [], []
            for vectors, sentences, owners in zip(
                run.embeddings, truth.sentences, truth.owners, strict=True
            ):
                if not sentences:
                    continue
                sentence_vectors = cache.encode(sentences, None)
                to_text.append(mask_to_expression_hits(vectors, sentence_vectors, owners))
                to_mask.append(expression_to_mask_hits(vectors, sentence_vectors, owners))
            add("expressions", "acc@1", to_text)
            add("grounding", "acc@1", to_mask)
    if pointing is not None:
        for task, hits in (
            ("pointing", truth.pointing),
            ("pointing (same colour)", truth.pointing_ambiguous if has_colours else []),
        ):
            value, n = accuracy(hits)
            if n:
                rows.append(
                    {
                        "dataset": name,
                        "model": model,
                        "embedder": POINTING_LABEL,
                        "task": task,
                        "metric": "acc",
                        "value": value,
                        "n": n,
                    }
                )
    counts = {
        "images": len(truth.labels),
        "masks": int(sum(len(x) for x in truth.labels)),
        "sentences": len(all_sentences),
        "classes": len(class_names or []),
    }
    return EvalResult(
        dataset=name,
        model=model,
        rows=rows,
        runs=runs,
        class_templates=templates,
        counts=counts,
        wall_seconds=time.perf_counter() - start,
    )


__all__ = [
    "ROW_KEYS",
    "TIMING_KEYS",
    "EmbedderRun",
    "EmbedderSpec",
    "EvalResult",
    "TextCache",
    "class_templates",
    "expression_variant",
    "parse_embedders",
    "run_eval",
    "variant",
]
