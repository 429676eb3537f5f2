"""FAISS plumbing shared by the FAISS vector stores: factory strings, errors,
per-layer search parameters and the numpy top-k used as exact fallback and test oracle."""

from __future__ import annotations

import re
from typing import Any

import faiss
import numpy as np

from regionsearch.errors import RegionSearchError

from .backend import ReadOnlyBackendError

# Re-exported for existing imports; the input checks themselves live in
# :mod:`regionsearch.store.vector_checks` (one copy for every backend).
from .vector_checks import VectorValidationError as VectorValidationError
from .vector_checks import check_ids as as_ids

DEFAULT_FACTORY = "IDMap2,Flat"
METRIC = "ip"
GPU_MAX_K = 2048


class VectorStoreError(RegionSearchError, RuntimeError):
    """Invalid use of a vector store or an unreadable index file."""


def faiss_reason(exc: BaseException) -> str:
    """What a FAISS C++ error says went wrong, without its source location: ``"Error in bool
    faiss::read_... at index_read.cpp:189: Error: 'nread == (size)' failed: read error"``
    becomes ``"'nread == (size)' failed: read error"``."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first.rsplit("Error: ", 1)[-1].strip()


class ReadOnlyError(VectorStoreError, ReadOnlyBackendError):
    """Mutation of a store opened read-only (a reader, or memory-mapped)."""


def normalize_factory(factory: str) -> str:
    """Canonical factory string: no spaces, ``IDMap2`` outermost (``IDMap`` is upgraded)."""
    f = re.sub(r"\s+", "", factory or "")
    if not f:
        return DEFAULT_FACTORY
    if f.startswith("IDMap2,"):
        return f
    if f.startswith("IDMap,"):
        return "IDMap2," + f[len("IDMap,") :]
    return "IDMap2," + f


def default_train_size(factory: str) -> int:
    """Training points wanted by ``factory`` (30 per centroid of the largest quantiser)."""
    f = normalize_factory(factory)
    centroids = 1
    for m in re.finditer(r"IVF(\d+)", f):
        centroids = max(centroids, int(m.group(1)))
    for m in re.finditer(r"PQ\d+(?:x(\d+))?", f):
        nbits = int(m.group(1)) if m.group(1) else 8
        centroids = max(centroids, 2**nbits)
    if centroids == 1:
        return 1000
    return 30 * centroids


def topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of ``scores`` (nq, m) -> (nq, k) padded with (-inf, -1)."""
    nq, m = scores.shape
    out_d = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if m == 0:
        return out_d, out_i
    kk = min(k, m)
    part = (
        np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        if kk < m
        else np.tile(np.arange(m), (nq, 1))
    )
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    out_d[:, :kk] = np.take_along_axis(scores, best, axis=1)
    out_i[:, :kk] = ids[best]
    return out_d, out_i


def brute_force_search(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k in numpy (the test oracle, also handy for small sets)."""
    return topk(np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T, as_ids(ids), k)


def ranked_ranges(
    raw: list[tuple[np.ndarray, np.ndarray]], threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query ``(scores, ids)`` -> FAISS-style ``(lims, scores, ids)``, each query's results
    ``>= threshold`` and best first."""
    parts_s, parts_i, lims = [], [], [0]
    for sc, lb in raw:
        ok = sc >= threshold
        sc, lb = sc[ok], lb[ok]
        order = np.argsort(-sc, kind="stable")
        parts_s.append(sc[order].astype(np.float32))
        parts_i.append(lb[order].astype(np.int64))
        lims.append(lims[-1] + sc.size)
    return (
        np.asarray(lims, dtype=np.int64),
        np.concatenate(parts_s) if parts_s else np.empty(0, np.float32),
        np.concatenate(parts_i) if parts_i else np.empty(0, np.int64),
    )


def find_layer(index: Any, cls: type) -> Any:
    """First layer of ``index`` that is an instance of ``cls`` (or None)."""
    seen = 0
    while index is not None and seen < 8:
        index = faiss.downcast_index(index)
        if isinstance(index, cls):
            return index
        if isinstance(index, faiss.IndexIDMap | faiss.IndexPreTransform):
            index = index.index
        elif isinstance(index, faiss.IndexRefine):
            index = index.base_index
        else:
            return None
        seen += 1
    return None


def layer_params(index: Any, sel: Any, keep: list[Any]) -> Any:
    """SearchParameters of the right class for every layer of ``index`` (IVF nprobe, HNSW
    efSearch, pre-transforms, refine), all with selector ``sel``; ``keep`` holds them alive."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return layer_params(index.index, sel, keep)
    if isinstance(index, faiss.IndexPreTransform):
        p = faiss.SearchParametersPreTransform()
        p.index_params = layer_params(index.index, sel, keep)
    elif isinstance(index, faiss.IndexRefine):
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = index.k_factor
        p.base_index_params = layer_params(index.base_index, sel, keep)
    elif isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = index.nprobe
        p.max_codes = index.max_codes
    elif isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = index.hnsw.efSearch
    else:
        p = faiss.SearchParameters()
    p.sel = sel
    keep.append(p)
    return p


def reconstruct_positions(index: Any, positions: np.ndarray) -> np.ndarray:
    """Vectors at internal ``positions`` of an ``IDMap`` (contiguous runs via reconstruct_n)."""
    out = np.empty((positions.size, index.d), dtype=np.float32)
    if positions.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    start = 0
    for run in np.split(positions, breaks):
        out[start : start + run.size] = index.index.reconstruct_n(int(run[0]), int(run.size))
        start += run.size
    return out
