"""What a search returns beyond raw cosine order: model-agnostic result switches.

An index built from automatic proposals holds, for every image, the whole image, background
pieces, fragments and several overlapping versions of each object. Ranking them by cosine
similarity alone lets some kinds of region crowd out the objects; each switch answers one:

Near-duplicates (``dedupe_iou``)
    Proposals of one image overlap (a object, the object with its shadow, the object minus a
    highlight). A result list then shows one object several times. Greedy mask-IoU NMS over the
    *ranked* list: a region whose mask IoU with a better-ranked region *of the same image* is at
    least ``dedupe_iou`` is dropped. Regions of different images never suppress each other.

Degenerate regions (``min_cells``, ``max_area``)
    A region smaller than one cell of the model's patch grid at its region resolution
    (``(patch / region_resolution)**2`` of the image; 1/144 for the 96-px, 8-px-patch reference
    model) is below what the ViT can resolve: its embedding is noise that some query will
    match. A region covering nearly the whole image is the image, not a region. Both are
    dropped from results: ``area < min_cells * cell`` or ``area > max_area`` (fractions of the
    image area). The default is half a cell: at 1.5 cells, 42-54% of the objects of world-v2
    scenes (small objects on wide canvases) could never be returned while the ground-truth
    ceiling still counted them (``benchmarks/results/world_v2_search_diagnosis.md``).

Hubness (``calibration``)
    Some regions (backgrounds, the whole image, texture) sit close to *every* text and top
    every query's list. CSLS-style correction (Conneau et al., 2018, "Word translation without
    parallel data"): a region's score is its cosine similarity minus ``calibration`` times its
    mean similarity to a fixed bank of texts ``T``::

        score(q, x) = cos(q, x) - w * mean_t cos(t, x) = x . (q - w * mean_t t)

    With the *mean* over the bank the correction is linear in ``x``, so it is exact at query
    time with no per-region state: the query vector is shifted by ``-w * t_bar`` before the
    inner-product search (:func:`calibrate_query`). CSLS's query-side term ``r(q)`` is the same
    for every region of one query and does not change its ranking, so it is left out; scores
    are therefore comparable within a query, and ``min_score`` applies to the calibrated score.

Objectness (``objectness``)
    Automatic proposals carry the mask source's objectness ``p`` (an estimate of the chance
    that the region matches an object, ``source_score`` in the store). The score gains
    ``objectness * log(max(p, OBJECTNESS_FLOOR))``: never positive, so a region can only lose
    rank, and regions without a score (ground-truth, PNG or COCO masks) are left as they are.

Supersets (``superset_margin``, ``superset_cover``)
    Proposals nest: an object, the object with the background around it, a larger union. The
    union often scores as well as the object (it holds the object and more of the queried
    colour or texture), yet its IoU with the object is below any duplicate threshold. A region
    is dropped when a *smaller* region of the same image, at least ``superset_cover`` of whose
    pixels lie inside it, scores at least its score minus ``superset_margin``: given two
    nested answers that match about as well, the tighter one is the answer. The rule looks at
    every region that could be returned (not only better-ranked ones), so it does not depend
    on the order of ties. On world-v2 scenes it raised every measured embedder's search mAP on
    proposals (``benchmarks/results/superset_search.md``); ground-truth masks do not nest.

Repeated stuff (``repetition``, ``repetition_floor``, ``repetition_neighbours``)
    A textured or patterned background is cut into many proposals that all look alike; an
    object is one of a kind in its image. A region's *repetition* is the mean cosine
    similarity of its vector to the ``repetition_neighbours`` most similar other regions of its
    image that barely touch it (neither has more than ``REPETITION_DISJOINT`` of its pixels
    inside the other; missing neighbours count as -1), and the score gains
    ``-repetition * max(0, repetition_score - repetition_floor)``: never positive, independent
    of the query, computed from the index's own vectors. On world-v2 scenes, where background
    tiles of the queried colour were 50-60% of the top 10, it raised every embedder it was
    measured on (``benchmarks/results/repetition_search.md``). Its cost on real photos is a
    risk it could not be measured against here: several alike objects in one photo (a flock, a
    crowd) repeat too, and the floor is a cosine that another model may place differently.

Open-set competition (``open_set``, ``open_set_tau``)
    The linear correction moves every region along one axis; a background tile of the query's
    colour still matches the query as well as an object does. Here the query competes, region
    by region, with the bank's texts in a softmax at temperature ``tau`` over raw cosines, and
    the score gains ``open_set * tau * log p(query | x)`` with::

        p(query | x) = exp(cos(q, x) / tau) / (exp(cos(q, x) / tau) + sum_t exp(cos(t, x) / tau))

    A region that matches "texture" or "background" about as well as the query loses up to
    ``tau * log(B + 1)``; one that matches the query far better than any bank text keeps its
    score. It needs each candidate's vector (read back from the vector store), is never
    positive. It is on by default (weight 1, calibration 0.5) only for the embedders whose
    search mAP it raised on held-out world-v2 scenes (:data:`EMBEDDER_RESULTS`,
    ``benchmarks/results/open_set_search.md``): those that feed the region's own pixels to the
    tower; MaskInversion, global and red circle lose with it. The generic bank holds hypernyms
    of real queries ("an animal" for "dog"); their effect could not be measured on real photos
    with a real CLIP here.

All of this only ever *lowers* a region's score or removes it, given the calibrated score.
That is what makes over-fetching exact: once the ``k``-th kept region scores at least the
calibrated score of the last region FAISS returned (plus ``superset_margin``, so that every
region that could remove a kept one has been read), no region further down can change the top
``k`` (see :meth:`~regionsearch.search.RegionSearcher.search_vector`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from regionsearch.masks.rle import iou_matrix

#: A small fixed bank of generic texts for the hubness correction when no other is given: words
#: for "some region of a photo" and broad categories, none of them a likely query by itself.
GENERIC_TEXTS: tuple[str, ...] = (
    "object",
    "thing",
    "shape",
    "background",
    "texture",
    "pattern",
    "surface",
    "part of an image",
    "a region",
    "an image",
    "something",
    "stuff",
    "a colour",
    "a person",
    "an animal",
    "a vehicle",
    "a building",
    "furniture",
    "food",
    "a plant",
    "the sky",
    "the ground",
    "a wall",
    "a tool",
)


@dataclass(frozen=True)
class ResultOptions:
    """The result switches of a search (defaults chosen by ``benchmarks/search_quality.py``).

    Attributes:
        dedupe_iou: drop a region whose mask IoU with a better-ranked region of the same image
            is at least this; ``None`` keeps near-duplicates.
        min_cells: drop regions smaller than this many cells of the model's patch grid at its
            region resolution; ``0`` keeps them.
        max_area: drop regions covering more than this fraction of their image; ``1`` keeps them.
        calibration: weight ``w`` of the hubness correction; ``0`` is plain cosine similarity.
        objectness: weight of the log-objectness prior; ``0`` ignores the mask source's score.
        open_set: weight of the open-set term (query against the calibration bank); ``0`` off.
        open_set_tau: softmax temperature of the open-set term.
        superset_margin: drop a region when a smaller region of the same image that lies
            mostly inside it scores at least its score minus this; ``None`` keeps supersets.
        superset_cover: share of the smaller region's pixels that must lie inside the larger.
        repetition: weight of the repeated-stuff term; ``0`` off.
        repetition_floor: repetition (a cosine similarity) above which a region loses score.
        repetition_neighbours: how many look-alike regions of the image the repetition averages.
    """

    dedupe_iou: float | None = 0.5
    min_cells: float = 0.5
    max_area: float = 0.9
    calibration: float = 1.0
    objectness: float = 0.03
    open_set: float = 0.0
    open_set_tau: float = 0.05
    superset_margin: float | None = 0.02
    superset_cover: float = 0.8
    repetition: float = 0.0
    repetition_floor: float = 0.75
    repetition_neighbours: int = 3

    def __post_init__(self) -> None:
        if self.dedupe_iou is not None and not 0.0 < self.dedupe_iou <= 1.0:
            raise ValueError(f"dedupe_iou must be in (0, 1] or None, got {self.dedupe_iou}")
        if self.min_cells < 0:
            raise ValueError(f"min_cells must be >= 0, got {self.min_cells}")
        if not 0.0 < self.max_area <= 1.0:
            raise ValueError(f"max_area must be in (0, 1], got {self.max_area}")
        if self.calibration < 0:
            raise ValueError(f"calibration must be >= 0, got {self.calibration}")
        if self.objectness < 0:
            raise ValueError(f"objectness must be >= 0, got {self.objectness}")
        if self.open_set < 0:
            raise ValueError(f"open_set must be >= 0, got {self.open_set}")
        if not self.open_set_tau > 0:
            raise ValueError(f"open_set_tau must be > 0, got {self.open_set_tau}")
        if self.superset_margin is not None and self.superset_margin < 0:
            raise ValueError(f"superset_margin must be >= 0 or None, got {self.superset_margin}")
        if not 0.0 < self.superset_cover <= 1.0:
            raise ValueError(f"superset_cover must be in (0, 1], got {self.superset_cover}")
        if self.repetition < 0:
            raise ValueError(f"repetition must be >= 0, got {self.repetition}")
        if not -1.0 <= self.repetition_floor <= 1.0:
            raise ValueError(f"repetition_floor must be in [-1, 1], got {self.repetition_floor}")
        if self.repetition_neighbours < 1:
            raise ValueError(
                f"repetition_neighbours must be >= 1, got {self.repetition_neighbours}"
            )

    @classmethod
    def plain(cls) -> ResultOptions:
        """Every switch off: raw cosine order, every region."""
        return cls(
            dedupe_iou=None,
            min_cells=0.0,
            max_area=1.0,
            calibration=0.0,
            objectness=0.0,
            superset_margin=None,
        )

    @property
    def filters(self) -> bool:
        """Whether results may drop or demote regions (the searcher then over-fetches)."""
        return (
            self.dedupe_iou is not None
            or self.min_cells > 0
            or self.max_area < 1
            or self.objectness > 0
            or self.open_set > 0
            or self.superset_margin is not None
            or self.repetition > 0
        )

    @property
    def score_slack(self) -> float:
        """How far below a region's score another region can still remove it (the superset
        rule): the searcher must have read every candidate down to ``k``-th score minus this."""
        return 0.0 if self.superset_margin is None else float(self.superset_margin)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


#: Embedders whose search mAP the open-set term raised (``open_set_search.md``).
OPEN_SET_EMBEDDERS = frozenset({"alphaclip", "ipclip", "crop", "masked-crop", "blur"})

#: Embedders whose search mAP the repeated-stuff term raised (``repetition_search.md``).
REPETITION_EMBEDDERS = frozenset({"alphaclip", "ipclip", "crop", "masked-crop", "maskinversion"})

#: Result switches that differ, for an index of the named embedder, from ``ResultOptions()``:
#: the open-set term (with half the hubness correction) and the repeated-stuff term, each for
#: the embedders whose end-to-end search mAP it raised on world-v2 scenes, chosen on the train
#: family and checked on the held-out one (``open_set_search.md``, ``repetition_search.md``).
EMBEDDER_RESULTS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        name: MappingProxyType(
            ({"open_set": 1.0, "calibration": 0.5} if name in OPEN_SET_EMBEDDERS else {})
            | ({"repetition": 0.5} if name in REPETITION_EMBEDDERS else {})
        )
        for name in sorted(OPEN_SET_EMBEDDERS | REPETITION_EMBEDDERS)
    }
)


def results_for(embedder: str | None, **changes: Any) -> ResultOptions:
    """The default result switches of an index built with ``embedder`` (a registry name;
    unknown names and ``None`` get ``ResultOptions()``), with ``changes`` on top."""
    return replace(ResultOptions(**EMBEDDER_RESULTS.get(embedder or "", {})), **changes)


def grid_cell_fraction(patch_size: int, region_resolution: int) -> float:
    """Fraction of the image one patch-grid cell covers at the model's region resolution."""
    if patch_size < 1 or region_resolution < patch_size:
        raise ValueError(
            f"need 1 <= patch_size <= region_resolution, got {patch_size}, {region_resolution}"
        )
    return (patch_size / region_resolution) ** 2


def model_cell_fraction(backbone: Any) -> float:
    """:func:`grid_cell_fraction` of a :class:`~regionsearch.backbone.Backbone`."""
    return grid_cell_fraction(int(backbone.patch_size), int(backbone.region_resolution))


def degenerate(
    area_fraction: np.ndarray | Sequence[float], options: ResultOptions, cell_fraction: float
) -> np.ndarray:
    """Whether each region (given its area as a fraction of its image) is degenerate."""
    area = np.asarray(area_fraction, dtype=np.float64)
    return (area < options.min_cells * cell_fraction) | (area > options.max_area)


#: Objectness below this counts as this (keeps ``log`` finite for scores of exactly 0).
OBJECTNESS_FLOOR = 1e-4


def objectness_prior(objectness: np.ndarray | Sequence[float | None], weight: float) -> np.ndarray:
    """``weight * log(max(p, OBJECTNESS_FLOOR))`` per region; 0 where ``p`` is None or NaN."""
    p = np.asarray([np.nan if v is None else v for v in objectness], dtype=np.float64)
    out = weight * np.log(np.clip(np.nan_to_num(p, nan=1.0), OBJECTNESS_FLOOR, 1.0))
    return out if weight else np.zeros(len(p))


def open_set_penalty(
    query_cos: np.ndarray, bank_cos: np.ndarray, tau: float, weight: float
) -> np.ndarray:
    """``weight * tau * log p(query | x)`` per region (never positive), from the regions'
    ``(n,)`` raw cosine to the query and ``(n, B)`` raw cosines to the bank's texts."""
    query_cos = np.asarray(query_cos, dtype=np.float64)
    bank_cos = np.asarray(bank_cos, dtype=np.float64).reshape(len(query_cos), -1)
    logits = np.concatenate([query_cos[:, None], bank_cos], axis=1) / tau
    top = logits.max(axis=1)
    log_p = logits[:, 0] - top - np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return weight * tau * log_p


def mask_cover(masks: Sequence[Mapping[str, Any]] | Sequence[np.ndarray]) -> np.ndarray:
    """``(n, n)`` matrix whose ``[a, b]`` is the share of region ``b``'s pixels inside region
    ``a`` (pycocotools' crowd rule: intersection over the area of one side)."""
    inside = iou_matrix(masks, masks, crowd_b=[True] * len(masks))  # [a, b]: |a & b| / |a|
    return inside.T


#: Two regions are "apart" for the repetition term when neither has more than this share of its
#: pixels inside the other (a region's own parts and supersets are not look-alikes).
REPETITION_DISJOINT = 0.1


def repetition_scores(vectors: np.ndarray, cover: np.ndarray, neighbours: int) -> np.ndarray:
    """Repetition of each region of *one* image (module docstring, "Repeated stuff").

    Args:
        vectors: ``(n, d)`` unit vectors of the image's regions.
        cover: ``(n, n)`` :func:`mask_cover` of those regions.
        neighbours: how many of the most similar apart regions are averaged.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    cover = np.asarray(cover, dtype=np.float64)
    apart = np.maximum(cover, cover.T) <= REPETITION_DISJOINT
    np.fill_diagonal(apart, False)
    similarity = np.where(apart, vectors @ vectors.T, -1.0)
    width = max(neighbours, similarity.shape[1])
    padded = np.full((len(vectors), width), -1.0)
    padded[:, : similarity.shape[1]] = similarity
    return np.sort(padded, axis=1)[:, -neighbours:].mean(axis=1)


def repetition_penalty(scores: np.ndarray | Sequence[float], options: ResultOptions) -> np.ndarray:
    """The repeated-stuff term for repetition ``scores``: ``<= 0``, zero at or below the floor."""
    excess = np.asarray(scores, dtype=np.float64) - options.repetition_floor
    return -options.repetition * np.maximum(excess, 0.0)


def drop_supersets(
    image_of: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    area: Sequence[float] | np.ndarray,
    cover_of: Callable[[list[int]], np.ndarray],
    margin: float,
    cover: float,
) -> np.ndarray:
    """Flags, one per region: ``True`` for a region that a smaller region of the same image
    supersedes (at least ``cover`` of the smaller lies inside it and the smaller scores at
    least its score minus ``margin``). ``cover_of(positions)`` gives :func:`mask_cover` of the
    regions at those positions (one image's regions); ``area`` only needs to compare within an
    image (pixels or fractions)."""
    image_of = np.asarray(image_of)
    scores = np.asarray(scores, dtype=np.float64)
    area = np.asarray(area, dtype=np.float64)
    drop = np.zeros(len(image_of), dtype=bool)
    rows: dict[int, list[int]] = defaultdict(list)
    for i, image in enumerate(image_of.tolist()):
        rows[image].append(i)
    for members in rows.values():
        if len(members) < 2:
            continue
        s, a = scores[members], area[members]
        inner = (
            (cover_of(members) >= cover)
            & (a[None, :] < a[:, None])
            & (s[None, :] >= s[:, None] - margin)
        )
        drop[members] = inner.any(axis=1)
    return drop


def hubness_direction(bank: np.ndarray) -> np.ndarray:
    """``t_bar``: the mean of the bank's ``(B, d)`` unit text vectors (the correction's axis)."""
    bank = np.asarray(bank, dtype=np.float32)
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"the calibration bank must be a non-empty (B, d) array, got {bank.shape}")
    return bank.mean(axis=0)


def calibrate_query(query: np.ndarray, direction: np.ndarray | None, weight: float) -> np.ndarray:
    """The query vector whose inner product with ``x`` is the calibrated score of ``x``."""
    query = np.asarray(query, dtype=np.float32)
    if direction is None or weight == 0:
        return query
    return (query - np.float32(weight) * np.asarray(direction, dtype=np.float32)).astype(np.float32)


def suppress_duplicates(
    image_of: Sequence[int] | np.ndarray,
    masks: Sequence[Mapping[str, Any]] | Sequence[np.ndarray],
    iou: float,
) -> np.ndarray:
    """Greedy NMS over a *ranked* list: keep flags, one per region, best first.

    Region ``i`` is dropped when its mask IoU with a better-ranked *kept* region of the same
    image is at least ``iou``. ``masks`` are RLE dicts or boolean arrays, in rank order; IoU is
    computed by pycocotools once per image over that image's regions.
    """
    if len(masks) != len(image_of):
        raise ValueError(f"{len(masks)} masks for {len(image_of)} regions")
    return greedy_dedupe(
        image_of,
        lambda members: iou_matrix([masks[i] for i in members], [masks[i] for i in members]),
        iou,
    )


def greedy_dedupe(
    image_of: Sequence[int] | np.ndarray,
    pairwise_iou: Callable[[list[int]], np.ndarray],
    iou: float,
) -> np.ndarray:
    """:func:`suppress_duplicates` with the IoU supplied by ``pairwise_iou(positions)``, the
    ``(n, n)`` IoU matrix of the regions at those list positions (one image's regions, in rank
    order); lets a caller that ranks the same regions many times compute IoU once."""
    image_of = np.asarray(image_of)
    keep = np.ones(len(image_of), dtype=bool)
    rows: dict[int, list[int]] = defaultdict(list)
    for i, image in enumerate(image_of.tolist()):
        rows[image].append(i)
    for members in rows.values():
        if len(members) < 2:
            continue
        overlap = pairwise_iou(members)
        kept: list[int] = []
        for a in range(len(members)):
            if kept and overlap[a, kept].max() >= iou:
                keep[members[a]] = False
            else:
                kept.append(a)
    return keep


__all__ = [
    "EMBEDDER_RESULTS",
    "GENERIC_TEXTS",
    "OBJECTNESS_FLOOR",
    "OPEN_SET_EMBEDDERS",
    "REPETITION_DISJOINT",
    "REPETITION_EMBEDDERS",
    "ResultOptions",
    "calibrate_query",
    "degenerate",
    "drop_supersets",
    "greedy_dedupe",
    "grid_cell_fraction",
    "hubness_direction",
    "mask_cover",
    "model_cell_fraction",
    "objectness_prior",
    "open_set_penalty",
    "repetition_penalty",
    "repetition_scores",
    "results_for",
    "suppress_duplicates",
]
