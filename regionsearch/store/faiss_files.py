"""A FAISS vector store on disk: the index file, its sidecars, atomic writes, memory mapping.

Files of a store at ``<path>``: the FAISS index itself, ``<path>.meta.json`` (factory,
dimension, train size) and ``<path>.tombstones.npy`` (ids hidden but still stored).

Every file is written atomically: to ``<file>.tmp``, fsynced, ``os.replace``-d over the old
one, then the directory is fsynced, so a crash leaves the previous complete file. Order:
tombstones, metadata, index. A stale tombstone file only lists ids that are absent or really
deleted; ids are never reused, so any crash mix is safe. The index file is written last, so
its (inode, mtime, size) signature changes on every save: readers poll it to refresh.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .faiss_util import METRIC, VectorStoreError, as_ids, faiss_reason

META_FORMAT = 1


def sidecar_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(metadata JSON, tombstones .npy) written next to an index file."""
    p = Path(path)
    return p.with_name(p.name + ".meta.json"), p.with_name(p.name + ".tombstones.npy")


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``path``; None if absent. ``os.replace`` changes the inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)``, fsync, ``os.replace`` onto ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_store(
    path: Path, index: Any, hidden: np.ndarray, *, factory: str, dimension: int, train_size: int
) -> None:
    """Write tombstones (when any), metadata, then the index, each atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path, tomb_path = sidecar_paths(path)

    def write_tombstones(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, hidden.astype(np.int64))

    def write_meta(tmp: Path) -> None:
        meta = {
            "format": META_FORMAT,
            "factory": factory,
            "dimension": dimension,
            "metric": METRIC,
            "train_size": train_size,
        }
        tmp.write_text(json.dumps(meta, indent=2) + "\n")

    if hidden.size:
        atomic_write(tomb_path, write_tombstones)
    atomic_write(meta_path, write_meta)
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
    if not hidden.size and tomb_path.exists():
        tomb_path.unlink()


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata sidecar of ``path`` ({} when absent: files from older versions)."""
    meta_path, _ = sidecar_paths(path)
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def read_tombstones(path: Path) -> np.ndarray | None:
    """The hidden ids recorded next to ``path`` (None when there are none)."""
    _, tomb_path = sidecar_paths(path)
    if not tomb_path.exists():
        return None
    with open(tomb_path, "rb") as f:
        return as_ids(np.load(f))


def read_index(path: Path, mmap: bool) -> Any:
    """Read a FAISS index, memory-mapped if asked (flat codes and IVF lists mapped)."""
    # IO_FLAG_MMAP_IFC maps flat code arrays (Flat, HNSW storage, PQ codes);
    # IO_FLAG_MMAP maps IVF inverted lists. Not every layout accepts both.
    attempts = (
        (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP_IFC) if mmap else (0,)
    )
    reasons: list[str] = []
    for flags in attempts:
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            if faiss_reason(exc) not in reasons:
                reasons.append(faiss_reason(exc))
    raise VectorStoreError(
        f"cannot read the vector file {path} ({'; '.join(reasons)}): it is damaged or "
        "truncated; restore it from a backup (its vectors are stored nowhere else)"
    )


def remove_files(path: str | os.PathLike[str]) -> None:
    """Delete an index file, its sidecars and any leftover ``.tmp`` files."""
    p = Path(path)
    for f in (p, *sidecar_paths(p)):
        for g in (f, f.with_name(f.name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                g.unlink()
