"""On-disk pieces of a segmented FAISS store: the segment list, segment files, tombstone files.

Everything here is a pure file operation; :mod:`regionsearch.store.segments` holds the state,
:mod:`regionsearch.store.segment_commit` the crash-safety argument. Files are written once, under a name never used before
(sequence numbers only grow), through ``<name>.tmp`` + fsync + ``os.replace`` + directory
fsync, so a reader or a recovering writer sees either the whole file or no file.

Layout of a segment directory (``indexes/<name>/vectors.segments/``)::

    segments.json           the committed state: generation, next file number, the segment
                            files (with size and id range) and tombstone files that count
    seg-0000000007.faiss    a sealed segment: IndexIDMap over Flat (or the ANN structure that
                            store/ann_policy.py picks for a large merged segment), ids sorted,
                            written once and never modified
    tomb-0000000009.npy     (segment number, removed id) pairs committed by one commit, or
                            all live tombstones consolidated by a merge
    writer.lock             flock of the one writing process
    *.tmp                   a write in progress (ignored; deleted by the next writer)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from regionsearch.errors import RegionSearchError

from .faiss_files import atomic_write, read_index
from .faiss_util import VectorStoreError

LIST_FILE = "segments.json"
LOCK_FILE = "writer.lock"
LIST_FORMAT = 1
SEGMENT_RE = re.compile(r"^seg-(\d{10})\.faiss$")
TOMB_RE = re.compile(r"^tomb-(\d{10})\.npy$")


class SegmentStoreError(RegionSearchError, RuntimeError):
    """A segment directory that cannot be read (corrupt list, missing segment, wrong kind)."""


def segment_name(seq: int) -> str:
    return f"seg-{seq:010d}.faiss"


def tombstone_name(seq: int) -> str:
    return f"tomb-{seq:010d}.npy"


def segment_seq(name: str) -> int:
    """The file number of segment ``name`` (``seg-0000000007.faiss`` -> 7)."""
    match = SEGMENT_RE.match(name)
    if match is None:
        raise SegmentStoreError(f"{name!r} is not a segment file name")
    return int(match.group(1))


@dataclass(frozen=True)
class SegmentInfo:
    """What the list records of one sealed segment (enough to plan merges without opening it)."""

    name: str
    n: int  # vectors stored (tombstoned ones included)
    min_id: int
    max_id: int
    factory: str  # the inner FAISS structure ("Flat", "IVF1024,Flat", ...)


@dataclass
class SegmentList:
    """The committed state: which segment and tombstone files count (``segments.json``).

    ``generation`` grows by one with every replacement, so a reader knows in one small read
    whether anything changed. ``next_seq`` is the next unused file sequence number.
    ``memory_budget``: bytes the store's vectors may occupy (merges pick structures that fit;
    ``None``: a share of the merging machine's RAM), recorded so background merges keep it.
    """

    dimension: int
    generation: int = 0
    next_seq: int = 1
    segments: list[SegmentInfo] = field(default_factory=list)
    tombstones: list[str] = field(default_factory=list)
    memory_budget: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LIST_FORMAT,
            "kind": "faiss-segments",
            "metric": "ip",
            "dimension": self.dimension,
            "generation": self.generation,
            "next_seq": self.next_seq,
            "segments": [asdict(s) for s in self.segments],
            "tombstones": list(self.tombstones),
            "memory_budget": self.memory_budget,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> SegmentList:
        if data.get("kind") != "faiss-segments" or int(data.get("format", -1)) > LIST_FORMAT:
            raise SegmentStoreError(
                f"{where} is not a segment list this version reads (kind={data.get('kind')!r}, "
                f"format={data.get('format')!r})"
            )
        return cls(
            dimension=int(data["dimension"]),
            generation=int(data["generation"]),
            next_seq=int(data["next_seq"]),
            segments=[SegmentInfo(**s) for s in data["segments"]],
            tombstones=[str(t) for t in data["tombstones"]],
            memory_budget=None if data.get("memory_budget") is None else int(data["memory_budget"]),
        )


def read_list(directory: Path) -> SegmentList | None:
    """The committed segment list, or None when the directory has none yet."""
    path = directory / LIST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return SegmentList.from_json(json.loads(text), path)
    except (ValueError, KeyError, TypeError) as exc:
        raise SegmentStoreError(f"unreadable segment list {path}: {exc}") from exc


def list_generation(directory: Path) -> int | None:
    """The committed generation alone (a reader's cheap "did anything change?")."""
    listing = read_list(directory)
    return None if listing is None else listing.generation


def write_list(directory: Path, listing: SegmentList) -> None:
    """Replace ``segments.json`` atomically: this one rename is what commits."""
    data = json.dumps(listing.to_json(), indent=1) + "\n"
    atomic_write(directory / LIST_FILE, lambda tmp: tmp.write_text(data, encoding="utf-8"))


def write_segment(directory: Path, seq: int, index: Any) -> str:
    """Write a built ``IndexIDMap`` as segment ``seq`` (atomically); return its file name."""
    name = segment_name(seq)
    atomic_write(directory / name, lambda tmp: faiss.write_index(index, str(tmp)))
    return name


def read_segment(directory: Path, name: str) -> Any:
    """Memory-map a sealed segment (its vectors are paged in by searches, never read here).

    ``IO_FLAG_MMAP_IFC`` maps flat code arrays; ``IO_FLAG_MMAP`` maps IVF inverted lists.
    """
    path = directory / name
    if not path.exists():
        raise FileNotFoundError(f"segment file {path} is missing")
    try:
        index = read_index(path, mmap=True)
    except VectorStoreError as exc:
        raise SegmentStoreError(str(exc)) from None
    if not isinstance(index, faiss.IndexIDMap):
        raise SegmentStoreError(f"segment {path} holds {type(index).__name__}, not IndexIDMap")
    return index


#: Tombstones keyed by segment file name: the ids removed from that segment (sorted int64).
Tombstones = dict[str, np.ndarray]


def write_tombstones(directory: Path, seq: int, tombs: Tombstones) -> str:
    """Write tombstones as file ``seq``: an ``(n, 2)`` int64 array of (segment number, id)."""
    name = tombstone_name(seq)
    pairs = [
        np.stack([np.full(ids.size, segment_seq(seg), np.int64), ids.astype(np.int64)], axis=1)
        for seg, ids in sorted(tombs.items())
        if ids.size
    ]
    arr = np.ascontiguousarray(np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(directory / name, write)
    return name


def read_tombstones(directory: Path, names: list[str]) -> Tombstones:
    """The union of the named tombstone files, by segment name."""
    parts = [np.empty((0, 2), np.int64)]
    for name in names:
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"tombstone file {path} is missing")
        with open(path, "rb") as f:
            parts.append(np.asarray(np.load(f), dtype=np.int64).reshape(-1, 2))
    pairs = np.concatenate(parts)
    return {
        segment_name(int(seq)): np.unique(pairs[pairs[:, 0] == seq, 1])
        for seq in np.unique(pairs[:, 0])
    }


def merge_tombstones(a: Tombstones, b: Tombstones) -> Tombstones:
    """The union of two tombstone maps (neither is modified)."""
    out = dict(a)
    for name, ids in b.items():
        out[name] = np.union1d(out[name], ids) if name in out else ids
    return out


def remove_unlisted(directory: Path, listing: SegmentList) -> list[str]:
    """Delete segment/tombstone files (and ``.tmp`` leftovers) the list does not name.

    Only the writer calls this (under its lock): what is unlisted is a crashed commit's or
    merge's output, or a merge's sources after the list moved on. Returns the names deleted.
    """
    keep = {s.name for s in listing.segments} | set(listing.tombstones)
    gone = []
    for path in directory.iterdir():
        name = path.name
        stale_tmp = name.endswith(".tmp") and (
            name.startswith(("seg-", "tomb-")) or name == LIST_FILE + ".tmp"
        )
        unlisted = (SEGMENT_RE.match(name) or TOMB_RE.match(name)) and name not in keep
        if stale_tmp or unlisted:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            gone.append(name)
    return gone


def lock_writer(directory: Path) -> int | None:
    """Take the directory's writer lock (one writing process); None where flock is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return None
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise SegmentStoreError(
            f"another writer holds {directory} (open it read_only=True to search it)"
        ) from exc
    return fd


def unlock_writer(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
