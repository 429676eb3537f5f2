"""How many threads one request's torch forward may use while serving.

A server answers requests in parallel threads; a torch forward (or FAISS search) that also
opens an OpenMP team of ``cores`` threads oversubscribes the CPU, and idle team members
spin-wait. The server therefore runs torch on ``Settings.threads`` threads (1 by default)
for as long as it serves and gives the process its previous setting back when it stops
(tests build many apps in one process). torch hands its setting to every thread; FAISS's
OpenMP setting belongs to each thread, so the searcher pins it in the thread that searches
(``RegionSearcher(threads=...)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def compute_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` meanwhile."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
