"""Which FAISS index a collection of a given size should use: the defaults the benchmarks justify.

A pure function of the collection's size, dimension and (optionally) a memory budget, so the
vector store, its segments and the CLI all pick the same structure for the same data, and the
numbers behind each threshold live in one place (this docstring) next to the code they justify.

Measured with ``benchmarks/query_latency.py`` (``benchmarks/results/query_latency.json``,
plot ``ann_recall_latency.png``): real region embeddings (6,766 MaskInversion vectors of world
scenes and coco-tiny from the bundled reference model) replicated with covariance-shaped noise,
d=512 by an inner-product-preserving lift; 688 text queries (class names, prompts, referring
expressions) and 300 held-out image regions; recall@10 against exact; one FAISS thread, CPU
time per query (the shared 2-core AMD EPYC inflated wall time ~40x):

- 100k vectors: exact ``Flat`` 12.9 ms a query (0.25 ns a float: linear in ``n * d``);
  ``IVF1024,Flat`` text recall 0.82 / 0.952 / 0.992 / 0.999 at nprobe 16 / 32 / 64 / 128
  (0.40 / 0.77 / 1.35 / 2.4 ms), image recall 0.978 / 0.995 / 0.999 / 1.0 -- text queries
  are the hard case, so they set the probes; ``HNSW32`` text recall 0.877 / 0.947 / 0.977 /
  0.995 at efSearch 64 / 128 / 256 / 512 (0.46 / 0.71 / 1.39 / 2.37 ms): at equal CPU time
  IVF recalls more (0.992 at 1.35 ms against HNSW's 0.977 at 1.39 ms) and builds far faster;
- 1M vectors (issue 12's earlier measurement, d=256): ``IVF4000`` text recall 0.965 at nprobe
  64 (0.9 ms) against 42 ms exact; ``HNSW32`` 0.945 at efSearch 128 (0.4 ms). So IVF is the
  default above the exact range;
- end to end (``benchmarks/store_scale.py``, 100k regions compacted into one segment built by
  this policy, IVF1024 nprobe 64): text recall@10 0.99, p95 4.9 ms CPU including the SQL fetch.

- compressed (100k): ``OPQ64,IVF1024,PQ64,Refine(SQ8)`` holds 629 bytes a vector (IVF-Flat:
  2,085) and reaches text recall 0.980 at nprobe 64 with ``k_factor`` 4 (0.56 ms); k_factor
  1 / 2 / 8 give 0.788 / 0.953 / 0.982, and the SQ8 copy caps recall near 0.988. Its 8-bit
  code scan costs ~64 table look-ups a vector: at 10M with 4096 lists and 128 probes (312k
  codes) that alone is ~10 ms, the whole latency target;
- compressed, 4-bit fast-scan (1M, 1,024 lists; ``runs/ann/ql_1m_*.json``):
  ``OPQ64,IVF1024,PQ64x4fs,Refine(SQ8)`` (~560 bytes a vector) scans codes with SIMD: text
  recall at k_factor 4 saturates at 0.61 from nprobe 32-64 on (the 4-bit ranking, not the
  lists, limits it); at nprobe 64, k_factor 4 / 8 / 16 / 32 give 0.61 / 0.75 / 0.86 / 0.93
  text (0.52 / 0.69 / 0.81 / 0.90 image) at 0.45 / 0.39 / 0.43 / 0.55 ms CPU: re-ranking many
  candidates is cheap, so ``FASTSCAN_K_FACTOR`` is 128. Without OPQ (``PQ128x4fs``, 64
  bytes) text recall is lower at equal k_factor (0.85 at 32, 0.94 at 128); ``OPQ128`` did not
  finish training in 9 minutes (OPQ trains an 8-bit PQ inside: 128 x 256 centroids).

- end to end at 10M regions (``benchmarks/results/store_scale.json``: one merged segment
  ``OPQ64,IVF4096,PQ64x4fs,Refine(SQ8)``, nprobe 128, k_factor 128; 5.6 GB on disk, SQL rows
  with ~1.1 KB RLE masks; 688 text queries): text recall@10 0.955; search + SQL fetch p95
  5.2-6.1 ms with the mapped codes warm (39-59 ms on a pass that pages them in: each query
  re-ranks 1,280 candidates from the 5 GB SQ8 copy), CPU p50 5.0-5.6 ms; the search
  process's RSS 3.5-5.9 GB (0.56 GB heap, the rest mapped pages). On 200 of the queries
  the knobs give (nprobe, k_factor) -> recall, CPU p50: (64, 128) 0.974 2.4 ms, (128, 64)
  0.944 2.5 ms, (128, 128) 0.977 2.8 ms, (128, 256) 0.985 4.5 ms, (256, 256) 0.986 4.6 ms: the
  re-ranking depth, not the probes, sets recall. The merge (262k-vector training sample, 10M
  added in chunks from the memory-mapped flat segments) took 27 min on two contended cores.

Rules (each monotone in ``n_vectors``: a larger collection never gets a *more* exact structure,
and past the exact range a query never scans fewer vectors):

- exact while ``n_vectors * dimension <= EXACT_MAX_FLOATS`` (one scan stays under ~9 ms);
- above it ``IVF{nlist},Flat`` with ``nlist`` the power of two nearest ``4 * sqrt(n)`` and
  ``nprobe`` probing at least ``PROBE_FRACTION`` of the lists (never fewer than ``MIN_NPROBE``);
- when the IVF-Flat footprint exceeds ``memory_budget_bytes``:
  ``OPQ{m},IVF{nlist},PQ{m}x4fs,Refine(SQ8)`` (``m = d/8``: 4 bits a sub-quantiser, ``d/16``
  bytes of codes plus the ``d``-byte SQ8 copy), at most ``COMPRESSED_MAX_NLIST`` lists (the
  merge's k-means and assignment cost ``n * nlist * d``), probing ``COMPRESSED_PROBE_FRACTION``
  of them and re-ranking ``k_factor * k`` candidates by the SQ8 copy; without room even for
  that, 8-bit PQ codes alone with twice the probes;
- ``memory_budget_bytes`` bounds a store's vectors (``--memory-budget``, recorded in the
  segment list; default ``DEFAULT_BUDGET_FRACTION`` of RAM): a merged segment of ``n`` vectors
  in a store of ``N`` gets ``budget * n / N`` of it (``store/segment_merge.py``).

Regenerate the numbers with ``python benchmarks/query_latency.py`` (see its docstring).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

EXACT_MAX_FLOATS = 2**25
"""Largest ``n * d`` searched exactly: 65,536 vectors at d=512, ~8.5 ms at the measured 0.25 ns
a float (100k at d=512 took 12.9 ms)."""

IVF_LISTS_PER_SQRT = 4.0
MIN_NLIST = 256
MAX_NLIST = 65_536
PROBE_FRACTION = 1 / 64
MIN_NPROBE = 64
"""Text recall@10 0.992 at 100k (IVF1024); 32 probes gave 0.952, too close to the target."""
TRAIN_POINTS_PER_CENTROID = 30
"""FAISS's lower bound (it warns below 39; 30 matches ``vectors.default_train_size``)."""
PQ_BITS = 8
REFINE_K_FACTOR = 4.0
"""Re-ranked candidates per result for 8-bit PQ codes (``PQ{d/8}``, the no-refinement branch)."""
COMPRESSED_MAX_NLIST = 4096
"""Lists of a compressed (merged) segment at most: k-means training and the assignment of every
vector cost ``n * nlist * d`` on the CPU that merges (16,384 lists at 10M would take hours on
two cores); more vectors per list are paid for by probing more of them (fast-scan is cheap)."""
COMPRESSED_PROBE_FRACTION = 1 / 32
COMPRESSED_TRAIN_PER_LIST = 64
"""Training points per list for the compressed branch (k-means + OPQ + PQ on one sample)."""
FASTSCAN_K_FACTOR = 128.0
"""Candidates re-ranked by the SQ8 copy per result, for 4-bit fast-scan PQ codes."""

DEFAULT_BUDGET_FRACTION = 1 / 3
"""Default memory budget of a store's vectors: a third of physical RAM (8 GiB on the 24 GiB
machine the targets were set on), leaving the rest to the SQL page cache, the search process's
own heap and a merge being built beside the segments it replaces."""

ID_BYTES = 8  # an int64 id in the IVF lists and in IDMap2's id array
IDMAP_REVERSE_BYTES = 48  # IDMap2's unordered_map entry (key, value, bucket, node overhead)


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string and the search parameters that reach the recall target with it.

    ``factory`` is what :class:`~regionsearch.store.vectors.VectorStore` takes (it adds the
    ``IDMap2`` layer). ``nprobe``/``ef_search``/``k_factor`` are ``None`` where the structure has
    no such knob. ``train_size``: vectors to collect before training (0: no training).
    """

    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int = 0
    k_factor: float | None = None
    bytes_per_vector: int = 0
    reason: str = field(default="", compare=False)

    @property
    def exact(self) -> bool:
        """Whether searches over this structure are exact."""
        return self.factory == "Flat"

    def vector_options(self) -> dict[str, Any]:
        """Keyword arguments for ``VectorStore`` (only the knobs this structure has)."""
        options: dict[str, Any] = {}
        if self.nprobe is not None:
            options["nprobe"] = self.nprobe
        if self.ef_search is not None:
            options["ef_search"] = self.ef_search
        if self.train_size:
            options["train_size"] = self.train_size
        return options


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory_budget(value: str | int | None) -> int | None:
    """Bytes of a memory budget: an int, or text such as ``8GB``, ``512M``, ``1.5GiB``.

    Units are binary (``8GB`` is 8 GiB = 8 * 2**30 bytes, as memory is sold and reported).
    ``None`` stays ``None`` (the caller's default); anything else that is not a positive size is
    a ``ValueError`` naming the value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory budget must be a size such as 8GB, got {value!r}")
    if isinstance(value, int | float):
        size = int(value)
    else:
        match = _SIZE_RE.match(str(value))
        if match is None:
            raise ValueError(
                f"memory budget {value!r} is not a size: give bytes or a number with "
                "K, M, G or T (e.g. 8GB, 512MB)"
            )
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return size


def default_memory_budget(fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """``fraction`` of this machine's physical memory (``os.sysconf``), in bytes."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        total = 16 * 2**30
    return max(1, int(total * fraction))


def _check(n_vectors: int, dimension: int, memory_budget_bytes: int | None) -> None:
    if int(n_vectors) < 0:
        raise ValueError(f"n_vectors must be >= 0, got {n_vectors}")
    if int(dimension) <= 0:
        raise ValueError(f"dimension must be positive, got {dimension}")
    if memory_budget_bytes is not None and int(memory_budget_bytes) <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")


def ivf_nlist(n_vectors: int) -> int:
    """Lists for ``n`` vectors: the power of two nearest ``4 * sqrt(n)``, in [256, 65536]."""
    target = IVF_LISTS_PER_SQRT * math.sqrt(max(1, n_vectors))
    nlist = 2 ** round(math.log2(target))
    return int(min(MAX_NLIST, max(MIN_NLIST, nlist)))


def ivf_nprobe(nlist: int, fraction: float = PROBE_FRACTION) -> int:
    """Lists to probe: ``fraction`` of ``nlist`` (rounded up), at least ``MIN_NPROBE``."""
    return int(min(nlist, max(MIN_NPROBE, math.ceil(nlist * fraction))))


def pq_subquantizers(dimension: int) -> int:
    """PQ bytes a vector: ``d/8`` (8 dimensions a sub-quantiser), a divisor of ``d``."""
    m = max(1, dimension // 8)
    while dimension % m:
        m -= 1
    return m


def bytes_per_vector(factory: str, dimension: int) -> int:
    """Approximate resident bytes a vector costs in ``factory`` (with the store's IDMap2 layer).

    Counts codes, ids and graph links; ignores per-index constants (centroids, codebooks).
    """
    d = int(dimension)
    total = ID_BYTES + IDMAP_REVERSE_BYTES
    parts = factory.replace(" ", "").split(",")
    for part in parts:
        if part == "Flat" or part == "RFlat":
            total += 4 * d
        elif part.startswith("HNSW"):
            m = int(part[4:] or 32)
            total += 4 * d + int(2 * m * 4 * 1.05)  # level-0 links (2M) plus upper levels
        elif part.startswith("IVF"):
            total += ID_BYTES
        elif part.startswith("PQ"):
            spec = part[2:].removesuffix("fs")
            m, _, bits = spec.partition("x")
            total += math.ceil(int(m) * int(bits or PQ_BITS) / 8)
        elif part.startswith("Refine(") or part.startswith("SQ"):
            kind = part[len("Refine(") : -1] if part.startswith("Refine(") else part
            total += {"SQ8": d, "SQ4": math.ceil(d / 2), "SQfp16": 2 * d, "Flat": 4 * d}.get(
                kind, 4 * d
            )
    return total


def choose_index(
    n_vectors: int, dimension: int, memory_budget_bytes: int | None = None
) -> IndexChoice:
    """The index for ``n_vectors`` of ``dimension`` (optionally within ``memory_budget_bytes``).

    See the module docstring for the measurements behind each rule.
    """
    _check(n_vectors, dimension, memory_budget_bytes)
    n, d = int(n_vectors), int(dimension)
    if n * d <= EXACT_MAX_FLOATS:
        flat_bytes = bytes_per_vector("Flat", d)
        if memory_budget_bytes is None or n * flat_bytes <= memory_budget_bytes:
            return IndexChoice(
                "Flat",
                bytes_per_vector=flat_bytes,
                reason=f"n*d={n * d} <= {EXACT_MAX_FLOATS}: an exact scan is fast enough",
            )
    nlist = ivf_nlist(n)
    ivf = f"IVF{nlist},Flat"
    ivf_bytes = bytes_per_vector(ivf, d)
    if memory_budget_bytes is None or n * ivf_bytes <= memory_budget_bytes:
        return IndexChoice(
            ivf,
            nprobe=ivf_nprobe(nlist),
            train_size=TRAIN_POINTS_PER_CENTROID * nlist,
            bytes_per_vector=ivf_bytes,
            reason="IVF-Flat: recall@10 >= 0.95 at the chosen nprobe",
        )
    m = pq_subquantizers(d)
    c_nlist = min(nlist, COMPRESSED_MAX_NLIST)
    train = COMPRESSED_TRAIN_PER_LIST * c_nlist
    refined = f"OPQ{m},IVF{c_nlist},PQ{m}x4fs,Refine(SQ8)"
    refined_bytes = bytes_per_vector(refined, d)
    if n * refined_bytes <= memory_budget_bytes:
        return IndexChoice(
            refined,
            nprobe=ivf_nprobe(c_nlist, COMPRESSED_PROBE_FRACTION),
            train_size=train,
            k_factor=FASTSCAN_K_FACTOR,
            bytes_per_vector=refined_bytes,
            reason="IVF-Flat exceeds the memory budget: 4-bit fast-scan PQ re-ranked by SQ8",
        )
    codes = f"OPQ{m},IVF{c_nlist},PQ{m}"
    return IndexChoice(
        codes,
        nprobe=ivf_nprobe(c_nlist, 2 * COMPRESSED_PROBE_FRACTION),
        train_size=train,
        bytes_per_vector=bytes_per_vector(codes, d),
        reason="even SQ8 refinement exceeds the memory budget: PQ codes alone (lower recall)",
    )
