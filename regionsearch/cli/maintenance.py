"""``regionsearch compact``: merge an index's vector segments and drop removed vectors now.

A segmented index merges small segments in the background while it is written; ``compact``
does it on demand (say before copying an index, or after deleting many photos): every small
segment and every segment holding removed vectors is rewritten, large ones with the ANN
structure ``store/ann_policy.py`` picks for their size. It takes the index's writer lock, so it
waits for no one and refuses to run beside an indexer.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from regionsearch.cli.errors import CliError, MappedCommand
from regionsearch.cli.options import (
    DbUrlOption,
    IndexDirOption,
    JsonOption,
    MemoryBudgetOption,
    index_location,
    memory_budget_options,
)


def compact_vectors(vectors: Any, everything: bool) -> int:
    """Compact a vector backend now; the number of segments (or files) rewritten."""
    from regionsearch.store.segments import SegmentedFaissBackend
    from regionsearch.store.vectors import VectorStore

    if isinstance(vectors, SegmentedFaissBackend):
        return vectors.merge(everything=everything)
    if isinstance(vectors, VectorStore):  # a legacy single-file index: one full rewrite
        dropped = vectors.compact() if vectors.n_tombstones else 0
        vectors.commit()
        return int(dropped > 0)
    raise CliError(f"{type(vectors).__name__} vectors have no compaction step")


def compact_command(
    name: Annotated[str, typer.Argument(help="Index name (a folder in INDEX_DIR) or path.")],
    index_dir: IndexDirOption = None,
    db_url: DbUrlOption = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Rewrite every segment, not only small or holey ones.")
    ] = False,
    memory_budget: MemoryBudgetOption = None,
    json_out: JsonOption = False,
) -> None:
    """Merge the vector segments of index NAME and drop removed vectors.

    Merged segments get the FAISS structure that fits their share of the memory budget
    (--memory-budget, recorded for later merges): IVF-Flat while it fits, else 4-bit PQ codes
    re-ranked by an 8-bit copy. The merge streams (the sources stay memory-mapped).
    """
    from regionsearch.store import RegionIndex

    options = memory_budget_options(memory_budget)
    location = index_location(name, index_dir)
    index = RegionIndex.open(location, db_url=db_url, vector_options=options)
    try:
        before = index.vectors.stats()
        t0 = time.perf_counter()
        rewritten = compact_vectors(index.vectors, everything)
        seconds = time.perf_counter() - t0
        after = index.vectors.stats()
    finally:
        index.close()
    data = {"index": str(location), "rewritten": rewritten, "seconds": seconds}
    data |= {"before": before, "after": after}
    if json_out:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(
        f"compacted {location}: {rewritten} segment(s) rewritten in {seconds:.1f} s; "
        f"segments {before.get('segments', 1)} -> {after.get('segments', 1)}, "
        f"removed vectors {before.get('tombstones', 0)} -> {after.get('tombstones', 0)}, "
        f"{after.get('ntotal', 0)} vectors"
    )


def register(app: typer.Typer) -> None:
    """Add ``compact`` to ``app``."""
    app.command("compact", cls=MappedCommand)(compact_command)
