"""The query layer: text → vector → FAISS (filtered inside FAISS) → one SQL fetch → hits.

No HTTP here; the CLI and the API both call :class:`RegionSearcher`.

Prompt templates (the rule)
    A *short noun phrase* — at most :data:`SHORT_PHRASE_WORDS` words and no sentence punctuation
    (``.,;:!?``) — is what CLIP saw as a class name during training, so it is wrapped in the
    prompt templates (default ``"a photo of a {}."``) after dropping a leading article
    (``"the red umbrella"`` → ``"a photo of a red umbrella."``). Anything longer, or with
    punctuation, is *free text* (a caption or a referring expression) and is embedded as typed.
    Referring expressions (:meth:`RegionSearcher.refer`) are always embedded without a template.

Filters
    ``SearchFilters(path_glob=, folder=, image_ids=)`` become one SQL read of the matching image
    rows (``GLOB`` on SQLite, a regex on PostgreSQL, a path prefix for folders), each carrying the
    span of its regions' ids: a :class:`~regionsearch.store.RegionFilter` of id ranges (an image's
    regions have contiguous ids; adjacent images merge), see ``store/region_filters.py``. The vector backend applies it
    *inside* the engine: the top-k are the best k among the allowed regions, and no Python list
    of region ids is ever built. A broad filter (its share estimated from a sample of image
    rows) is post-filtered instead, with the same results on an exact index: the unfiltered
    top ``k'`` is checked until ``k`` allowed regions are found (``store/filter_strategy.py``).

Thresholds
    ``min_score`` drops hits whose cosine similarity is below it, so a query with no good match
    returns an empty list instead of the k least-bad regions.

One hit per image
    ``one_per_image=True`` keeps the best region of each image in score order.

Result switches
    :class:`~regionsearch.search.postprocess.ResultOptions` (the searcher's ``results``, or per
    call) shift the query against hubness (``score`` is then the calibrated score, and
    ``min_score`` applies to it), add the objectness prior, drop degenerate regions and
    near-duplicates; see :mod:`regionsearch.search.postprocess`. Defaults were chosen by
    ``benchmarks/search_quality.py``; ``ResultOptions.plain()`` is raw cosine order.
    ``refer``/``refer_collection`` use plain order (the switches were measured on class-name
    queries only).

Over-fetching (exact)
    When results can drop or demote regions (or ``one_per_image``), the searcher asks FAISS for
    ``k * OVERFETCH`` regions and doubles the fetch (up to :data:`MAX_FETCH`) until the ``k``-th
    kept hit scores at least the last fetched region's FAISS score, FAISS ran out of regions,
    or the rest are below ``min_score``. Every switch only lowers a score or drops a region, so
    no region further down could enter the top ``k``: the result equals post-processing the
    whole ranking.

    The same bound decides how many SQL rows are read: FAISS's candidates are read in growing
    prefixes (``k * FIRST_ROWS`` first, then doubling), and reading stops as soon as the
    ``k``-th kept hit scores at least the next unread candidate's FAISS score. FAISS's cost
    hardly depends on how many it returns; each SQL row does (a row with its RLE is most of a
    cached query's cost), so a typical query reads ``2k`` rows instead of ``4k``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from regionsearch.backbone.text import DEFAULT_TEMPLATES
from regionsearch.errors import QueryError
from regionsearch.search.mask_relations import ImageMasksCache, MaskRelations
from regionsearch.search.postprocess import (
    GENERIC_TEXTS,
    ResultOptions,
    calibrate_query,
    degenerate,
    drop_supersets,
    greedy_dedupe,
    hubness_direction,
    model_cell_fraction,
    objectness_prior,
    results_for,
)
from regionsearch.search.region_terms import RegionTerms
from regionsearch.store import ImageFilter, RegionIndex, RegionRecord
from regionsearch.store.filter_strategy import FilterPlan

#: Longest query (in words) still treated as a noun phrase and wrapped in templates.
SHORT_PHRASE_WORDS = 4
#: Over-fetch factor of the FAISS search when results may drop or demote regions.
OVERFETCH = 4
#: SQL rows read first, as a multiple of ``k`` (more only when the bound asks for them).
FIRST_ROWS = 2
#: Largest k ever asked from FAISS by one search.
MAX_FETCH = 4096
_ARTICLES = ("a ", "an ", "the ")
_SENTENCE_PUNCT = re.compile(r"[.,;:!?]")


def is_short_phrase(text: str) -> bool:
    """Whether ``text`` is a short noun phrase (templated) rather than free text (as typed)."""
    words = text.split()
    return 0 < len(words) <= SHORT_PHRASE_WORDS and not _SENTENCE_PUNCT.search(text)


def strip_article(text: str) -> str:
    lowered = text.lower()
    for article in _ARTICLES:
        if lowered.startswith(article) and len(text) > len(article):
            return text[len(article) :].strip()
    return text


@dataclass
class SearchFilters:
    """Restrict a search to some images. All given conditions must hold (AND)."""

    path_glob: str | None = None  # e.g. "holidays/2023/*.jpg" (matched against stored paths)
    folder: str | None = None  # e.g. "holidays/2023" (that folder and below)
    image_ids: Sequence[int] | None = None

    def active(self) -> bool:
        return bool(self.path_glob or self.folder or self.image_ids is not None)


@dataclass
class RegionHit:
    """One matching region with its score (cosine similarity, higher is better)."""

    region_id: int
    image_id: int
    image_path: str
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels
    rle: dict[str, Any]  # full-image COCO RLE
    area: float
    score: float
    source: str
    category: str | None = None
    image_width: int | None = None
    image_height: int | None = None

    @classmethod
    def from_record(cls, record: RegionRecord, score: float) -> RegionHit:
        return cls(
            region_id=record.id,
            image_id=record.image_id,
            image_path=record.image_path,
            bbox=tuple(float(v) for v in record.bbox),  # type: ignore[arg-type]
            rle=record.rle,
            area=float(record.area),
            score=float(score),
            source=record.source,
            category=record.category,
            image_width=record.image_width,
            image_height=record.image_height,
        )

    def to_dict(self, *, with_rle: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["bbox"] = list(self.bbox)
        if not with_rle:
            data.pop("rle")
        return data


@dataclass
class ReferResult:
    """The region of one image (or of the collection) best matching a referring expression."""

    expression: str
    image_id: int | None
    best: RegionHit | None
    alternatives: list[RegionHit] = field(default_factory=list)

    @property
    def hits(self) -> list[RegionHit]:
        return ([self.best] if self.best else []) + self.alternatives


def pin_openmp_threads(threads: int) -> None:
    """Cap FAISS's OpenMP threads in the calling thread (OpenMP keeps the setting per thread,
    so a thread pool's threads each need it); a no-op when already so."""
    import faiss

    if faiss.omp_get_max_threads() != threads:
        faiss.omp_set_num_threads(threads)


class RegionSearcher:
    """Text and referring-expression search over one :class:`RegionIndex`.

    ``backbone`` must be the model the index was built with (its text encoder gives the query
    vectors). ``templates`` are used for short noun phrases (see the module docstring).
    ``results`` are the default result switches of :meth:`search` (``None``: those measured best
    for the index's embedder, :func:`~regionsearch.search.postprocess.results_for`);
    ``calibration_texts`` the
    bank of the hubness correction (encoded like queries, once, on first use). ``threads``
    caps FAISS's OpenMP threads in each thread that searches (a server passes 1: its requests
    run in parallel, and a team per query mostly spin-waits); ``None`` leaves them alone.
    """

    def __init__(
        self,
        index: RegionIndex,
        backbone: Any,
        *,
        templates: Sequence[str] | None = DEFAULT_TEMPLATES,
        results: ResultOptions | None = None,
        calibration_texts: Sequence[str] = GENERIC_TEXTS,
        threads: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self.index = index
        self.backbone = backbone
        self.templates = tuple(templates) if templates else None
        self.results = results if results is not None else results_for(index.manifest.embedder)
        if not calibration_texts:
            raise ValueError("calibration_texts must hold at least one text")
        self.calibration_texts = tuple(calibration_texts)
        self._bank: np.ndarray | None = None
        self._direction: np.ndarray | None = None
        self.image_masks = ImageMasksCache()  # per-image mask overlaps, query-independent
        self.last_timings: dict[str, float] = {}

    def calibration_bank(self) -> np.ndarray:
        """``(B, d)`` unit vectors of the calibration texts (encoded like queries), cached."""
        if self._bank is None:
            texts = [strip_article(t) for t in self.calibration_texts]
            vectors = self.backbone.encode_text(texts, templates=self.templates)
            self._bank = np.asarray(vectors.detach().cpu().numpy(), dtype=np.float32)
        return self._bank

    def calibration_direction(self) -> np.ndarray:
        """Mean vector of the calibration bank (the hubness correction's axis), cached."""
        if self._direction is None:
            self._direction = hubness_direction(self.calibration_bank())
        return self._direction

    # ------------------------------------------------------------------ encoding

    def templates_for(self, text: str) -> tuple[str, ...] | None:
        """The templates applied to ``text`` (``None``: embedded as typed)."""
        return self.templates if is_short_phrase(text) else None

    def encode_query(self, text: str, *, templated: bool | None = None) -> np.ndarray:
        """``text`` → ``(d,)`` float32 unit vector. ``templated=None`` applies the rule."""
        text = text.strip()
        if not text:
            raise QueryError("empty query: give the text to look for, e.g. 'a red umbrella'")
        if templated is None:
            templates = self.templates_for(text)
        else:
            templates = self.templates if templated else None
        if templates:
            text = strip_article(text)
        vec = self.backbone.encode_text([text], templates=templates)
        return np.asarray(vec.detach().cpu().numpy(), dtype=np.float32)[0]

    # ------------------------------------------------------------------ filters

    def resolve_filters(
        self, filters: SearchFilters | None, image_ids: Iterable[int] | None = None
    ) -> FilterPlan | None:
        """The images ``filters`` and ``image_ids`` allow (both: AND), planned for the index's
        searches (pre- or post-filter); ``None`` when nothing filters."""
        if image_ids is None and (filters is None or not filters.active()):
            return None
        f = filters or SearchFilters()
        ids = None if f.image_ids is None else {int(i) for i in f.image_ids}
        if image_ids is not None:
            extra = {int(i) for i in image_ids}
            ids = extra if ids is None else ids & extra
        images = ImageFilter(
            path_glob=self.stored_path(f.path_glob) if f.path_glob else None,
            folder=self.stored_path(f.folder) if f.folder else None,
            image_ids=None if ids is None else sorted(ids),
        )
        return self.index.plan_filter(images)

    def stored_path(self, pattern: str) -> str:
        """A path (or glob) as the index stores it: relative to the index's image root when it
        lies under it, else unchanged."""
        root = self.index.manifest.image_root
        if root and pattern.startswith(root.rstrip("/") + "/"):
            return pattern[len(root.rstrip("/")) + 1 :]
        return pattern

    # ------------------------------------------------------------------ search

    def search(
        self,
        text: str,
        k: int = 10,
        min_score: float | None = None,
        filters: SearchFilters | None = None,
        one_per_image: bool = False,
        results: ResultOptions | None = None,
    ) -> list[RegionHit]:
        """Regions matching ``text``, best first (at most ``k``; maybe none with ``min_score``).

        ``results`` overrides the searcher's result switches for this call."""
        t0 = time.perf_counter()
        vec = self.encode_query(text)
        encode_s = time.perf_counter() - t0
        hits = self.search_vector(
            vec,
            k=k,
            min_score=min_score,
            filters=filters,
            one_per_image=one_per_image,
            results=results,
        )
        self.last_timings["encode_ms"] = encode_s * 1000
        return hits

    def search_vector(
        self,
        vec: np.ndarray,
        k: int = 10,
        min_score: float | None = None,
        filters: SearchFilters | None = None,
        one_per_image: bool = False,
        *,
        image_ids: Iterable[int] | None = None,
        results: ResultOptions | None = None,
    ) -> list[RegionHit]:
        """Like :meth:`search` with a ready ``(d,)`` unit query vector (before calibration)."""
        k = int(k)
        if k < 1:
            raise ValueError("k must be at least 1")
        results = self.results if results is None else results
        t0 = time.perf_counter()
        allowed = self.resolve_filters(filters, image_ids)
        direction = self.calibration_direction() if results.calibration else None
        query = calibrate_query(vec, direction, results.calibration).reshape(1, -1)
        overfetch = one_per_image or results.filters
        slack = results.score_slack
        fetch = min(k * OVERFETCH, MAX_FETCH) if overfetch else k
        if self.threads is not None:
            pin_openmp_threads(self.threads)
        t1 = time.perf_counter()
        fetch_s = 0.0
        records: dict[int, RegionRecord] = {}  # by id, across fetches: each row read once
        penalty: dict[int, float] = {}  # open-set + repeated-stuff terms by id, computed once
        relations = MaskRelations(self.index, self.image_masks)  # once per image
        terms = RegionTerms(self.index, vec, results, self.calibration_bank, relations)
        rows = min(k * FIRST_ROWS, fetch) if overfetch else fetch
        while True:
            scores, ids = self.index.search(query, fetch, images=allowed)
            full_page = bool(ids.size) and int((ids[0] >= 0).sum()) == fetch
            scores, ids = scores[0], ids[0]
            valid = ids >= 0
            scores, ids = scores[valid], ids[valid]
            last = float(scores[-1]) if scores.size else float("-inf")
            if min_score is not None:  # switches only lower scores: a cut region stays cut
                keep = scores >= float(min_score)
                scores, ids = scores[keep], ids[keep]
            candidates = ids.tolist()
            while True:  # read rows in growing prefixes of the candidates
                rows = min(rows, len(candidates))
                tf = time.perf_counter()
                new = [i for i in candidates[:rows] if i not in records]
                records.update((r.id, r) for r in self.index.fetch_regions(new))
                if new and terms.active:
                    penalty.update(terms([records[i] for i in new if i in records]))
                fetch_s += time.perf_counter() - tf
                read = zip(scores[:rows].tolist(), candidates[:rows], strict=True)
                ranked = self._rank(
                    [(records[i], s) for s, i in read if i in records],
                    results,
                    min_score,
                    one_per_image,
                    penalty,
                    relations,
                )
                if rows == len(candidates):
                    break
                # an unread candidate scores at most its FAISS score, unread ones below it;
                # one within the slack of a kept region could still remove it (supersets)
                if len(ranked) >= k and ranked[k - 1][1] >= float(scores[rows]) + slack:
                    break
                rows *= 2
            if rows < len(candidates) or not overfetch or not full_page or fetch >= MAX_FETCH:
                break
            if len(ranked) >= k and ranked[k - 1][1] >= last + slack:
                break
            if min_score is not None and last < float(min_score):
                break
            fetch = min(fetch * 2, MAX_FETCH)
            rows = max(1, rows * 2)
        t3 = time.perf_counter()
        self.last_timings = {
            "filter_ms": (t1 - t0) * 1000,
            "faiss_ms": (t3 - t1 - fetch_s) * 1000,
            "fetch_ms": fetch_s * 1000,
        }
        return [RegionHit.from_record(record, score) for record, score in ranked[:k]]

    def _rank(
        self,
        ranked: list[tuple[RegionRecord, float]],
        results: ResultOptions,
        min_score: float | None,
        one_per_image: bool,
        penalty: Mapping[int, float],
        relations: MaskRelations,
    ) -> list[tuple[RegionRecord, float]]:
        """Apply the result switches to FAISS's ranked ``(record, score)`` pairs: the kept
        ones with their final scores, best first (hits are built for the top ``k`` only).
        ``penalty`` holds the open-set and repeated-stuff terms of each region id when one of
        those switches is on; ``relations`` the search's mask overlaps."""
        if not ranked:
            return []
        records = [r for r, _ in ranked]
        scores = np.asarray([s for _, s in ranked], dtype=np.float64)
        keep = np.ones(len(records), dtype=bool)
        if penalty:
            scores = scores + np.asarray([penalty[r.id] for r in records])
        if results.objectness:
            scores = scores + objectness_prior(
                [r.source_score for r in records], results.objectness
            )
        if results.min_cells > 0 or results.max_area < 1:
            area = [r.area / (r.rle["size"][0] * r.rle["size"][1]) for r in records]
            keep &= ~degenerate(area, results, model_cell_fraction(self.backbone))
        if min_score is not None:
            keep &= scores >= float(min_score)
        if results.superset_margin is not None and keep.sum() > 1:
            eligible = np.flatnonzero(keep)
            keep[eligible] &= ~drop_supersets(
                [records[i].image_id for i in eligible],
                scores[eligible],
                [records[i].area for i in eligible],
                lambda members: relations.cover([records[eligible[m]] for m in members]),
                results.superset_margin,
                results.superset_cover,
            )
        order = [i for i in np.argsort(-scores, kind="stable").tolist() if keep[i]]
        if results.dedupe_iou is not None and len(order) > 1:
            flags = greedy_dedupe(
                [records[i].image_id for i in order],
                lambda members: relations.iou([records[order[m]] for m in members]),
                results.dedupe_iou,
            )
            order = [i for i, f in zip(order, flags.tolist(), strict=True) if f]
        if one_per_image:
            best: dict[int, int] = {}
            for i in order:
                best.setdefault(records[i].image_id, i)
            order = list(best.values())
        return [(records[i], float(scores[i])) for i in order]

    # ------------------------------------------------------------------ referring expressions

    def refer(self, image_id: int, expression: str, k: int = 5) -> ReferResult:
        """The region of image ``image_id`` best matching ``expression`` (no template).

        Returns the best region and up to ``k - 1`` alternatives, all with scores. Raises
        ``KeyError`` for an unknown image.
        """
        if self.index.get_image_by_id(int(image_id)) is None:
            raise KeyError(f"unknown image id {image_id}")
        vec = self.encode_query(expression, templated=False)
        hits = self.search_vector(
            vec, k=k, image_ids=[int(image_id)], results=ResultOptions.plain()
        )
        return ReferResult(expression, int(image_id), hits[0] if hits else None, hits[1:])

    def refer_collection(self, expression: str, k: int = 10) -> list[RegionHit]:
        """Regions of the whole collection matching a referring expression (no template)."""
        vec = self.encode_query(expression, templated=False)
        return self.search_vector(vec, k=k, results=ResultOptions.plain())

    # ------------------------------------------------------------------ files

    def image_file(self, image_path: str) -> Path:
        return resolve_image_path(self.index, image_path)


def resolve_image_path(index: RegionIndex, image_path: str) -> Path:
    """The file of a *stored* image path (relative paths are under the index's image root)."""
    path = Path(image_path)
    if path.is_absolute():
        return path
    root = index.manifest.image_root
    return (Path(root) / path) if root else path
