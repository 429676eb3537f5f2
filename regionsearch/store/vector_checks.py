"""Input checks every vector backend applies the same way (ids, stored vectors, queries).

They live apart from any engine so that FAISS (``VectorStore``), FAISS segments and Milvus
reject the same bad input with the same error and message (the contract suite matches on those
messages); this module is the only copy of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: How far from 1 an L2 norm may be for a vector to count as normalised.
NORM_TOLERANCE = 1e-2


class VectorValidationError(ValueError):
    """Ids, vectors or queries handed to a backend are not what it stores."""


def check_ids(ids: Any, name: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array (a scalar becomes one id)."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise VectorValidationError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise VectorValidationError(f"{name} must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_new_ids(ids: Any) -> np.ndarray:
    """Ids for an ``add``: >= 0 (FAISS and Milvus use -1 for an empty slot) and distinct."""
    arr = check_ids(ids)
    if (arr < 0).any():
        raise VectorValidationError("ids must be >= 0 (-1 marks an empty result slot)")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise VectorValidationError(f"duplicate ids in one add: {uniq[counts > 1][:5].tolist()}")
    return arr


def check_vectors(
    vectors: Any, dimension: int, n: int | None = None, tolerance: float = NORM_TOLERANCE
) -> np.ndarray:
    """Shape (n, d) float32, finite, unit L2 norm within ``tolerance``; returns a C array."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dimension:
        raise VectorValidationError(
            f"vectors must have shape (N, {dimension}) for this index, got {arr.shape}"
        )
    if n is not None and arr.shape[0] != n:
        raise VectorValidationError(f"{arr.shape[0]} vectors for {n} ids")
    if arr.dtype != np.float32:
        raise VectorValidationError(
            f"vectors must be float32, got {arr.dtype} (convert with .astype(np.float32))"
        )
    if not np.isfinite(arr).all():
        raise VectorValidationError("vectors contain NaN or infinite values")
    if arr.shape[0]:
        norms = np.linalg.norm(arr.astype(np.float64), axis=1)
        bad = np.abs(norms - 1.0) > tolerance
        if bad.any():
            i = int(np.argmax(bad))
            raise VectorValidationError(
                f"{int(bad.sum())} vector(s) are not L2-normalised (e.g. row {i} has norm "
                f"{norms[i]:.6f}); normalise before adding (inner product = cosine only for "
                "unit vectors)"
            )
    return np.ascontiguousarray(arr)


def check_queries(queries: Any, dimension: int) -> np.ndarray:
    """Queries as C-contiguous float32 ``(nq, dimension)``, finite."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != dimension:
        raise VectorValidationError(
            f"queries must have shape (nq, {dimension}), got {np.asarray(queries).shape}"
        )
    if not np.issubdtype(q.dtype, np.floating):
        raise VectorValidationError(f"queries must be floating point, got {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise VectorValidationError("queries contain NaN or infinite values")
    return q


def check_k(k: Any) -> int:
    """A positive result count."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise VectorValidationError(f"k must be a positive integer, got {k!r}")
    return int(k)


class ValidatingBackend:
    """What every vector engine derives from its ``dimension``, ``norm_tolerance``, ``ntotal``
    and ``contains``: one input validator, ``len()`` and ``region_id in backend``."""

    dimension: int
    norm_tolerance: float
    ntotal: int

    def contains(self, ids: Any) -> np.ndarray:  # pragma: no cover - provided by the engine
        raise NotImplementedError

    def validate_vectors(self, vectors: Any, n: int | None = None) -> np.ndarray:
        """Shape (n, d) float32, finite, L2 norm 1 within ``norm_tolerance``; a C array."""
        return check_vectors(vectors, self.dimension, n, self.norm_tolerance)

    def __len__(self) -> int:
        return self.ntotal

    def __contains__(self, region_id: object) -> bool:
        try:
            rid = int(region_id)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        return bool(self.contains(np.array([rid], dtype=np.int64))[0])
