"""GPU replicas of a CPU FAISS index (used where ``faiss.get_num_gpus() > 0``).

The CPU index stays the master copy: mutations, selectors, range search, k > 2048 and saving
run on it; unfiltered k-NN searches run on a GPU replica (``index_cpu_to_gpu`` /
``index_cpu_to_all_gpus``) rebuilt lazily after mutations. Factories the GPU cloner does not
support fall back to the CPU with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss

log = logging.getLogger(__name__)


def gpu_available() -> bool:
    """Whether this FAISS build sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def is_gpu_index(index: Any) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(faiss.downcast_index(index), faiss.GpuIndex)


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """``None``: a GPU when there is one; ``True`` without one warns and uses the CPU."""
    available = gpu_available()
    if use_gpu is None:
        return available
    if use_gpu and not available:
        log.warning("use_gpu=True but FAISS sees no GPU (faiss-cpu build?): using the CPU")
        return False
    return bool(use_gpu)


class GpuReplica:
    """A lazily refreshed GPU copy of a CPU index (``stale()`` after every mutation)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._index: Any = None
        self._stale = True
        self._res: Any = None

    def stale(self) -> None:
        self._stale = True

    def drop(self) -> None:
        self._index = None
        self._stale = True

    def get(self, cpu_index: Any, label: str) -> Any:
        """The replica of ``cpu_index`` (copied now if stale); None when not on a GPU."""
        if not self.enabled:
            return None
        if self._index is not None and not self._stale:
            return self._index
        try:  # pragma: no cover - needs a GPU build of FAISS
            if faiss.get_num_gpus() > 1:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = False
                self._index = faiss.index_cpu_to_all_gpus(cpu_index, co)
            else:
                if self._res is None:
                    self._res = faiss.StandardGpuResources()
                self._index = faiss.index_cpu_to_gpu(self._res, 0, cpu_index)
            self._stale = False
            return self._index
        except RuntimeError as exc:  # pragma: no cover
            log.warning("FAISS cannot put %s on the GPU (%s): searching on the CPU", label, exc)
            self.enabled = False
            self._index = None
            return None
