"""End-to-end search: class names as queries against the regions an index would hold.

``classes``/``retrieval`` score embedders on ground-truth masks. A user's index holds automatic
proposals instead, so a query can also be answered by a region that covers an object badly, by
a background piece or by a fragment. This task indexes every image of a COCO-format dataset the
way ``regionsearch index`` does (:func:`regionsearch.indexer.pipeline.prepare_image`: the
indexer's decoder and the same mask source, ``AutomaticProposals()`` by default), asks every
category name that labels an object as a query against all regions of all images, and ranks
the regions as :class:`~regionsearch.search.RegionSearcher` would with the given
:class:`~regionsearch.search.postprocess.ResultOptions`. The same queries against an index of
the ground-truth masks give the ceiling.

Scoring is detection-style, with pycocotools' matching rule (``COCOeval.evaluateImg``): walking
the ranking best first, a region is a hit when its mask IoU with an object of the queried class
that no better-ranked region has matched is at least ``iou`` (it takes the free object it
overlaps most); a region overlapping only already-matched objects (a duplicate) is a false
positive. Per query:

* ``AP`` = ``sum over hits at rank r of precision@r / objects of the class`` — the
  non-interpolated area under the precision/recall curve, normalised by *all* objects of the
  class, so objects no region finds count as missed. (COCOeval instead samples an interpolated
  precision envelope at 101 recall points and caps detections per image at ``maxDets``; the
  envelope can only raise AP. No crowd regions exist here: the dataset drops them.)
* ``P@10`` = hits in the top 10 / 10; ``top-1`` = whether the first region is a hit.

Means over the queries are reported as rows ``search mAP``/``search P@10``/``search top-1``
(proposals) and ``search-gt mAP`` (ground-truth masks, same queries, ranked with
:func:`ceiling_options`: the same calibration, no proposal-only switch).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from regionsearch.eval.datasets import RegionDataset
from regionsearch.eval.detection_ap import detection_metrics, match_ranking
from regionsearch.eval.search_collection import (
    RegionSet,
    SearchCollection,
    collect,
    embed_regions,
)
from regionsearch.search.postprocess import (
    ResultOptions,
    calibrate_query,
    degenerate,
    drop_supersets,
    greedy_dedupe,
    hubness_direction,
    model_cell_fraction,
    objectness_prior,
    open_set_penalty,
    repetition_penalty,
)

#: Result rows of the task: (task, metric).
SEARCH_ROWS: tuple[tuple[str, str], ...] = (
    ("search", "mAP"),
    ("search", "P@10"),
    ("search", "top-1"),
    ("search-gt", "mAP"),
)


def rank(
    scores: np.ndarray,
    regions: RegionSet,
    options: ResultOptions,
    cell_fraction: float,
) -> np.ndarray:
    """Region indices best first, as the searcher returns them with ``options`` (calibration
    and the open-set and repeated-stuff terms are already in ``scores``): the objectness prior
    added, degenerate regions dropped,
    supersets of a tighter region that scores about as well dropped, then near-duplicates
    suppressed."""
    if regions.objectness is not None and options.objectness:
        scores = scores + objectness_prior(regions.objectness, options.objectness)
    order = np.argsort(-scores, kind="stable")
    order = order[~degenerate(regions.area[order], options, cell_fraction)]
    if options.superset_margin is not None and order.size:
        superseded = drop_supersets(
            regions.image_of[order],
            scores[order],
            regions.area[order],
            regions.cover(order),
            options.superset_margin,
            options.superset_cover,
        )
        order = order[~superseded]
    if options.dedupe_iou is not None and order.size:
        keep = greedy_dedupe(regions.image_of[order], regions.pairwise(order), options.dedupe_iou)
        order = order[keep]
    return order


def rankings(
    collection: SearchCollection,
    source: str,
    vectors: np.ndarray,
    texts: np.ndarray,
    options: ResultOptions,
    cell_fraction: float,
    direction: np.ndarray | None = None,
    bank: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(query, ranking)`` for every class query against one region set, as the searcher
    would rank them with ``options``.

    ``texts`` are the ``(C, d)`` class vectors; ``direction`` the calibration axis (the bank's
    mean text vector), applied with weight ``options.calibration``; ``bank`` the ``(B, d)``
    bank vectors the open-set term (``options.open_set``) needs.
    """
    regions = collection.sources[source]
    bank_cos = None
    if options.open_set:
        if bank is None:
            raise ValueError("options.open_set needs the bank's text vectors (bank=...)")
        bank_cos = vectors @ np.asarray(bank, dtype=np.float32).T
    stuff = 0.0  # the repeated-stuff term: one value per region, whatever the query
    if options.repetition:
        stuff = repetition_penalty(
            regions.repetition(vectors, options.repetition_neighbours), options
        )
    for q in collection.queries:
        query = calibrate_query(texts[q], direction, options.calibration)
        scores = vectors @ query + stuff
        if bank_cos is not None:
            scores = scores + open_set_penalty(
                vectors @ texts[q], bank_cos, options.open_set_tau, options.open_set
            )
        yield int(q), rank(scores, regions, options, cell_fraction)


def score_queries(
    collection: SearchCollection,
    source: str,
    vectors: np.ndarray,
    texts: np.ndarray,
    options: ResultOptions,
    cell_fraction: float,
    direction: np.ndarray | None = None,
    iou: float = 0.5,
    bank: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean AP, P@10 and top-1 of every class query against one region set (arguments as
    :func:`rankings`)."""
    regions = collection.sources[source]
    objects_of = collection.objects_of
    per_query = []
    top_area = []
    ranked = rankings(
        collection, source, vectors, texts, options, cell_fraction, direction, bank=bank
    )
    for q, order in ranked:
        per_query.append(
            detection_metrics(
                order,
                regions.image_of,
                regions.overlap,
                regions.label_of == q,
                int(objects_of[q]),
                iou,
            )
        )
        if order.size:
            top_area.append(regions.area[order[0]])
    ap, p10, top1 = (float(np.mean([m[i] for m in per_query])) for i in range(3))
    top_area_arr = np.asarray(top_area)
    return {
        "mAP": ap,
        "P@10": p10,
        "top-1": top1,
        "queries": len(per_query),
        "top_under_1pct": float((top_area_arr < 0.01).mean()) if top_area else float("nan"),
        "top_over_20pct": float((top_area_arr > 0.2).mean()) if top_area else float("nan"),
    }


def ceiling_options(options: ResultOptions) -> ResultOptions:
    """The switches the ground-truth ceiling ranks with: the same hubness calibration, none of
    the proposal-only ones (a ground-truth mask is no duplicate or junk and has no objectness
    score; dropping small objects would only lower the bar; alike objects are no repeated
    background)."""
    return dataclasses.replace(
        ResultOptions.plain(),
        calibration=options.calibration,
        open_set=options.open_set,
        open_set_tau=options.open_set_tau,
    )


def search_rows(
    collection: SearchCollection,
    vectors: dict[str, np.ndarray],
    texts: np.ndarray,
    options: ResultOptions,
    cell_fraction: float,
    direction: np.ndarray | None,
    *,
    dataset: str,
    model: str,
    embedder: str,
    iou: float = 0.5,
    timing: dict[str, float] | None = None,
    bank: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The task's report rows (see :data:`SEARCH_ROWS`) for one embedder."""
    n = len(collection.queries)
    results = {
        source: score_queries(
            collection,
            source,
            vectors[source],
            texts,
            options if source == "proposals" else ceiling_options(options),
            cell_fraction,
            direction,
            iou,
            bank,
        )
        for source in vectors
    }
    rows = []
    for task, metric in SEARCH_ROWS:
        source = "proposals" if task == "search" else "ground-truth masks"
        if source not in results:
            continue
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "embedder": embedder,
                "task": task,
                "metric": metric,
                "value": results[source][metric],
                "n": n,
                **(timing or {}),
            }
        )
    return rows


def query_texts(collection: SearchCollection, backbone: Any, cache: Any = None) -> np.ndarray:
    """``(C, d)`` class-name vectors with the model's class template (as ``classes`` uses)."""
    from regionsearch.eval.runner import TextCache, class_templates

    cache = cache or TextCache(backbone)
    return cache.encode(collection.class_names, class_templates(backbone)).numpy()


def bank_vectors(
    backbone: Any, bank: str | Sequence[str], collection: SearchCollection, cache: Any = None
) -> np.ndarray:
    """``(B, d)`` unit vectors of the calibration bank: ``"queries"`` (the class-name queries
    themselves, CSLS's choice), ``"generic"``
    (:data:`~regionsearch.search.postprocess.GENERIC_TEXTS`) or a list of texts."""
    from regionsearch.eval.runner import TextCache, class_templates
    from regionsearch.search.postprocess import GENERIC_TEXTS

    cache = cache or TextCache(backbone)
    if bank == "queries":
        return query_texts(collection, backbone, cache)[collection.queries]
    texts = list(GENERIC_TEXTS) if bank == "generic" else list(bank)
    return cache.encode(texts, class_templates(backbone)).numpy()


__all__ = [
    "SEARCH_ROWS",
    "RegionSet",
    "SearchCollection",
    "bank_vectors",
    "ceiling_options",
    "collect",
    "detection_metrics",
    "embed_regions",
    "match_ranking",
    "query_texts",
    "rank",
    "rankings",
    "run_search_task",
    "score_queries",
    "search_rows",
]


def run_search_task(
    dataset: RegionDataset,
    backbone: Any,
    specs: Sequence[Any],
    options: ResultOptions | Callable[[str], ResultOptions],
    *,
    bank: str = "generic",
    mask_source: Any = None,
    iou: float = 0.5,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``search`` task of ``regionsearch eval``: rows for every embedder spec, and notes.

    ``options`` are the result switches, one set for all or a function of the embedder's
    registry name (the searcher's defaults differ by embedder); ``mask_source`` defaults to
    ``AutomaticProposals()``, what ``regionsearch index`` uses; ``bank`` is the calibration
    bank (see :func:`bank_vectors`).
    """
    from regionsearch.eval.runner import TextCache
    from regionsearch.masks import AutomaticProposals

    options_of = {
        spec.display: options(spec.name) if callable(options) else options for spec in specs
    }
    source = mask_source if mask_source is not None else AutomaticProposals()
    start = time.perf_counter()
    collection = collect(dataset, source, progress=progress)
    cache = TextCache(backbone)
    texts = query_texts(collection, backbone, cache)
    needs_bank = any(o.calibration or o.open_set for o in options_of.values())
    bank_texts = bank_vectors(backbone, bank, collection, cache) if needs_bank else None
    direction = hubness_direction(bank_texts) if bank_texts is not None else None
    cell = model_cell_fraction(backbone)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for spec in specs:
        embedder = spec.build(backbone)
        tick = time.perf_counter()
        vectors = {name: embed_regions(embedder, collection, name) for name in collection.sources}
        seconds[spec.display] = time.perf_counter() - tick
        rows += search_rows(
            collection,
            vectors,
            texts,
            options_of[spec.display],
            cell,
            direction,
            dataset=dataset.name,
            model=backbone.name,
            embedder=spec.display,
            iou=iou,
            bank=bank_texts,
        )
    proposals = collection.sources["proposals"]
    notes = [
        f"search: {len(collection.images)} images indexed with {collection.mask_source} "
        f"({proposals.size} regions, {100 * proposals.covered(iou):.1f}% of the objects covered "
        f"at IoU >= {iou}; {collection.proposal_seconds:.1f} s); each of the "
        f"{len(collection.queries)} class names present asks all regions; a hit is a region at "
        f"IoU >= {iou} with an unmatched object of that class (search-gt: the ground-truth "
        "masks as the index, the ceiling)",
        "search result switches: "
        + "; ".join(
            f"{', '.join(names)}: " + ", ".join(f"{k}={v}" for k, v in switches.describe().items())
            for switches, names in _grouped(options_of).items()
        )
        + f"; calibration bank {bank!r}; embedding "
        + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
        f"search wall time {time.perf_counter() - start:.1f} s",
    ]
    return rows, notes


def _grouped(options_of: Mapping[str, ResultOptions]) -> dict[ResultOptions, list[str]]:
    """Embedders by the switches they were ranked with (for one note line per set)."""
    out: dict[ResultOptions, list[str]] = {}
    for name, options in options_of.items():
        out.setdefault(options, []).append(name)
    return out
