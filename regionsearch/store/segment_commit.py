"""Committing a segment store: seal the growing segment, record tombstones, swap the list.

Why a SIGKILL at any moment leaves the last committed state:

- the only commit point is the atomic ``os.replace`` of ``segments.json`` (tmp + fsync,
  rename, directory fsync). Every file it names was fully written and fsynced before it, and
  files are never modified after being named, so the list never points at a partial file;
- a crash before the rename leaves the previous list, which names only older, complete files;
  what the dead commit or merge wrote is unlisted and deleted by the next writer's open;
- sequence numbers only grow (``next_seq`` is committed with the list), so a new file never
  overwrites one a list names; a merge's output names a new number, and its sources are
  deleted only after the list that replaces them is durable;
- readers read the list and memory-map what it names; a file deleted under a reader stays
  mapped, and a reader that finds a listed file gone re-reads the (newer) list.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from . import segment_files as files
from .segment_files import SegmentInfo
from .segment_search import sealed_indexes

if TYPE_CHECKING:
    from .segments import SegmentedFaissBackend

NO_IDS = np.empty(0, np.int64)


def commit_growing(backend: SegmentedFaissBackend) -> None:
    """The growing segment, minus ids removed before they were sealed, as new sorted segment
    files; the tombstones added since the last commit as one file; then the new list (the
    commit point). Cost: what changed. The caller holds ``backend._lock``."""
    listing = backend._listing
    growing = backend._growing
    pending = {
        name: np.setdiff1d(ids, backend._committed_tombs.get(name, NO_IDS), assume_unique=True)
        for name, ids in backend._tombs.items()
        if name != "growing"
    }
    pending = {name: ids for name, ids in pending.items() if ids.size}
    dead = backend._tombs.get("growing")
    if growing.n == 0 and not pending:
        return
    # ids removed before they were ever sealed never reach the disk
    dead_mask = np.isin(growing.ids, dead) if dead is not None else None
    seq = max(backend._next_seq, listing.next_seq)
    infos: list[SegmentInfo] = []
    for index in sealed_indexes(growing, dead_mask, backend.segment_size):
        infos.append(backend._write_segment(seq, index, "Flat"))
        seq += 1
    tomb_names = list(listing.tombstones)
    if pending:
        tomb_names.append(files.write_tombstones(backend.directory, seq, pending))
        seq += 1
    new = replace(
        listing,
        generation=listing.generation + 1,
        next_seq=seq,
        segments=[*listing.segments, *infos],
        tombstones=tomb_names,
    )
    files.write_list(backend.directory, new)  # the commit point
    backend._next_seq = seq
    for info in infos:
        backend._segments[info.name] = backend._open_segment(info.name)
    backend._listing = new
    backend._committed_tombs = files.merge_tombstones(backend._committed_tombs, pending)
    backend._tombs.pop("growing", None)
    backend._reset_growing()
