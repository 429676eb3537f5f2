"""Queries by example: "more like this" for a stored region, a mask of any photo as the query,
and referring expressions on a photo that is not (and will not be) in the index.

More like this (:func:`similar`)
    The query is the region's own stored vector (read back from FAISS, so it is exactly what
    the index holds). Filters, ``min_score``, ``one_per_image`` and the result switches work as
    in a text search, with :data:`EXAMPLE_RESULTS` (see below). The region itself is never in
    the answer. It is ranked with the rest and removed afterwards, so its near-duplicates in its
    own photo are suppressed as duplicates of it; with ``one_per_image`` its own photo takes no
    place in the answer (the "best region" of that photo is the region itself).

By example (:func:`search_by_example`)
    An image and one mask, embedded by the index's own embedder with the options the index
    records; the vector is searched like a stored region's. Nothing is stored.

Stateless referring expressions (:func:`refer_image`, :func:`refer`)
    Candidate masks (given, else the mask source's proposals, as uploads get them) are embedded
    like the indexer embeds them and ranked by cosine similarity to the expression, embedded
    as typed (no template): the order :meth:`RegionSearcher.refer` gives for the same photo once
    indexed with the same masks. Nothing is stored.

Result switches for image queries (:data:`EXAMPLE_RESULTS`)
    The searcher's defaults without the hubness calibration: its axis is the mean of a *text*
    bank, which answers text-side hubness; an image region as the query has none of it.
    ``benchmarks/similar_quality.py`` measured P@10 of "similar" on a generated world: this
    setting is above the text defaults for every embedder, and on automatic proposals above
    raw cosine order too (MaskInversion 13.8 vs 11.7 vs 7.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from regionsearch import DEFAULT_EMBEDDER, DEFAULT_MODEL
from regionsearch.errors import QueryError
from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import ResultOptions
from regionsearch.search.query_masks import as_masks
from regionsearch.search.searcher import RegionHit, RegionSearcher, SearchFilters
from regionsearch.store import VectorStoreError

if TYPE_CHECKING:
    from regionsearch.backbone import Backbone
    from regionsearch.embedders import RegionEmbedder
    from regionsearch.masks import MaskSource
    from regionsearch.store import ManifestInfo, RegionIndex

#: Result switches of image queries: the defaults, hubness calibration off (module docstring).
EXAMPLE_RESULTS = dataclasses.replace(ResultOptions(), calibration=0.0)


def region_vector(index: RegionIndex, region_id: int) -> np.ndarray:
    """The stored ``(d,)`` vector of a live region; ``KeyError`` when there is none."""
    if not index.fetch_regions([int(region_id)]):
        raise KeyError(f"no region {region_id}")
    store = index.vectors  # one reference: a reload swaps the attribute, not this object
    try:
        vec = np.asarray(store.reconstruct([int(region_id)]), np.float32)[0]
    except VectorStoreError as exc:
        raise ValueError(f"this index cannot read its vectors back: {exc}") from None
    return vec / max(float(np.linalg.norm(vec)), 1e-12)  # compressed indexes decode inexactly


def similar(
    searcher: RegionSearcher,
    region_id: int,
    k: int = 10,
    min_score: float | None = None,
    filters: SearchFilters | None = None,
    one_per_image: bool = False,
    results: ResultOptions | None = EXAMPLE_RESULTS,
) -> list[RegionHit]:
    """Regions most like region ``region_id``, best first, the region itself excluded."""
    vec = region_vector(searcher.index, region_id)
    hits = searcher.search_vector(
        vec,
        k=int(k) + 1,
        min_score=min_score,
        filters=filters,
        one_per_image=one_per_image,
        results=results,
    )
    return [h for h in hits if h.region_id != int(region_id)][: int(k)]


def embedder_for_index(manifest: ManifestInfo, backbone: Backbone) -> RegionEmbedder:
    """The index's embedder on ``backbone``, built with the options its manifest records.

    The recorded ``describe()`` keys that are constructor options are passed back; the result
    must describe itself as recorded (``EmbedderMismatchError`` otherwise, e.g. a server on
    another model, or settings the constructor cannot take back such as Alpha-CLIP weights
    from a file). Indexes without a recorded description get the defaults.
    """
    from regionsearch.embedders import constructor_options, get_embedder
    from regionsearch.store.manifest import check_embedder_description

    recorded = manifest.embedder_description or {}
    options = constructor_options(manifest.embedder, recorded)
    embedder = get_embedder(manifest.embedder, backbone, **options)
    check_embedder_description(manifest, embedder.describe())
    return embedder


def embed_masks(embedder: RegionEmbedder, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(M, d)`` float32 unit vectors of ``masks`` on ``pixels``, as the indexer stores them."""
    return np.asarray(embedder.embed(pixels, masks).detach().cpu().numpy(), np.float32)


def search_by_example(
    searcher: RegionSearcher,
    embedder: RegionEmbedder,
    pixels: np.ndarray,
    mask: np.ndarray,
    k: int = 10,
    min_score: float | None = None,
    filters: SearchFilters | None = None,
    one_per_image: bool = False,
    results: ResultOptions | None = EXAMPLE_RESULTS,
) -> list[RegionHit]:
    """Indexed regions most like ``mask`` of ``pixels`` (embedded by ``embedder``)."""
    vec = embed_masks(embedder, pixels, mask[None])[0]
    return searcher.search_vector(
        vec, k=k, min_score=min_score, filters=filters, one_per_image=one_per_image,
        results=results,
    )  # fmt: skip


@dataclass
class ReferredRegion:
    """One candidate region of a photo that is not in the index, with its score.

    ``candidate`` is its position in the candidate list (the given masks, or the proposals).
    """

    candidate: int
    rle: dict[str, Any]
    bbox: tuple[float, float, float, float]
    area: float
    score: float
    source: str

    def mask(self) -> np.ndarray:
        return rle_mod.decode(self.rle)


@dataclass
class ImageReferResult:
    """The answer of a stateless referring expression: the best region and alternatives."""

    expression: str
    width: int
    height: int
    candidates: int
    source: str  # "given" or "proposals"
    best: ReferredRegion | None
    alternatives: list[ReferredRegion] = field(default_factory=list)

    @property
    def regions(self) -> list[ReferredRegion]:
        return ([self.best] if self.best else []) + self.alternatives


def expression_vector(backbone: Backbone, expression: str) -> np.ndarray:
    """A referring expression as typed (no template) → ``(d,)`` unit vector; what
    :meth:`RegionSearcher.encode_query` gives with ``templated=False``."""
    text = expression.strip()
    if not text:
        raise QueryError("empty expression: describe the region, e.g. 'the dog on the left'")
    vec = backbone.encode_text([text], templates=None)
    return np.asarray(vec.detach().cpu().numpy(), np.float32)[0]


def candidate_masks(
    pixels: np.ndarray, masks: Any = None, mask_source: MaskSource | None = None
) -> tuple[np.ndarray, str, list[str]]:
    """``(M, H, W)`` masks, where they came from (``given`` or ``proposals``) and each mask's
    source kind; proposals as uploads get them when ``masks`` is ``None``."""
    hw = (int(pixels.shape[0]), int(pixels.shape[1]))
    if masks is not None:
        stacked = as_masks(masks, hw)
        return stacked, "given", ["given"] * len(stacked)
    from regionsearch.masks import AutomaticProposals

    source = mask_source if mask_source is not None else AutomaticProposals()
    proposals = [p for p in source.masks_for(Path("query"), pixels) if p.mask.any()]
    if not proposals:
        raise ValueError("the mask source found no regions in this image")
    return np.stack([p.mask for p in proposals]), "proposals", [p.source for p in proposals]


def refer_image(
    embedder: RegionEmbedder,
    pixels: np.ndarray,
    expression: str | np.ndarray,
    masks: Any = None,
    *,
    mask_source: MaskSource | None = None,
    k: int = 5,
) -> ImageReferResult:
    """The region of ``pixels`` best matching ``expression`` (a text, or its vector from
    :func:`expression_vector` / ``encode_query``), and up to ``k - 1`` alternatives."""
    if int(k) < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    query = (
        expression_vector(embedder.backbone, expression)
        if isinstance(expression, str)
        else np.asarray(expression, np.float32)
    )
    stacked, origin, kinds = candidate_masks(pixels, masks, mask_source)
    scores = embed_masks(embedder, pixels, stacked) @ query
    order = np.argsort(-scores, kind="stable")[: int(k)]
    rles = rle_mod.encode_many(stacked[order])
    found = [
        ReferredRegion(
            candidate=int(i),
            rle=r,
            bbox=tuple(float(v) for v in rle_mod.bbox(r)),  # type: ignore[arg-type]
            area=float(stacked[i].sum()),
            score=float(scores[i]),
            source=kinds[i],
        )
        for i, r in zip(order.tolist(), rles, strict=True)
    ]
    return ImageReferResult(
        expression=expression if isinstance(expression, str) else "",
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        candidates=len(stacked),
        source=origin,
        best=found[0] if found else None,
        alternatives=found[1:],
    )


def _pixels(image: Any) -> np.ndarray:
    """A path (decoded as the indexer decodes files), a PIL image or an ``(H, W, 3)`` array."""
    if isinstance(image, str | Path):
        from regionsearch.image_io import read_rgb

        return read_rgb(Path(image))
    from regionsearch.masks.sources import as_rgb

    if hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    return as_rgb(np.asarray(image))


def refer(
    image: Any,
    expression: str,
    masks: Any = None,
    *,
    model: str | Backbone = DEFAULT_MODEL,
    embedder: str | RegionEmbedder = DEFAULT_EMBEDDER,
    mask_source: MaskSource | None = None,
    k: int = 5,
    device: str | None = None,
) -> ImageReferResult:
    """The region of ``image`` that ``expression`` describes, in one call (no index).

    ``image``: a file path, a PIL image or an ``(H, W, 3)`` uint8 array. ``masks``: candidate
    regions as an ``(M, H, W)`` array, a list of ``(H, W)`` arrays or of COCO RLE dicts; ``None``
    uses automatic proposals (or ``mask_source``). ``model`` and ``embedder`` are names, or
    objects built once and reused across calls (loading a model is the slow part).

    >>> found = regionsearch.refer("park.jpg", "the dog on the left")
    >>> found.best.bbox, found.best.score
    """
    from regionsearch.embedders import RegionEmbedder, get_embedder

    if isinstance(embedder, RegionEmbedder):
        region_embedder = embedder
    else:
        from regionsearch.backbone import Backbone

        backbone = model if isinstance(model, Backbone) else Backbone.load(model, device=device)
        region_embedder = get_embedder(embedder, backbone)
    return refer_image(
        region_embedder, _pixels(image), expression, masks, mask_source=mask_source, k=k
    )
