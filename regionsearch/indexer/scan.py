"""Walk a photo folder and plan what an indexing run has to do.

Change detection is two-step: a file whose size and mtime equal the stored ones is unchanged
(no read at all); otherwise its sha256 is computed (streamed) and compared with the stored hash,
so a ``touch`` or a copy that keeps the bytes costs one read and no re-embedding. New files are
hashed later, by the worker that decodes them (one read for both).

Paths are stored POSIX-style relative to the photo root (``Manifest.image_root``).
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regionsearch.image_io import file_sha256

if TYPE_CHECKING:
    from regionsearch.store import ImageRecord, RegionIndex

#: What the scan indexes (GIF: its first frame). Everything else it sees is reported as skipped.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MTIME_TOLERANCE_S = 1e-6


@dataclass(frozen=True)
class FileEntry:
    """One image file found on disk."""

    path: Path  # absolute
    rel: str  # POSIX path relative to the root (the key stored in SQL)
    size: int
    mtime: float


@dataclass(frozen=True)
class SkippedFile:
    """Something the scan saw and did not index, with the reason (``rel`` as in ``FileEntry``)."""

    rel: str
    reason: str


@dataclass
class PlanItem:
    """One file to (re)process; ``reason`` is new / changed / pending / failed."""

    entry: FileEntry
    reason: str
    content_hash: str | None = None  # known when the scan hashed it (changed files)
    image_id: int | None = None  # filled once the image row exists


@dataclass
class ScanPlan:
    """What a run will do. ``to_process`` = new + changed + retry."""

    root: Path
    new: list[PlanItem] = field(default_factory=list)
    changed: list[PlanItem] = field(default_factory=list)
    retry: list[PlanItem] = field(default_factory=list)  # pending (interrupted) / failed
    touched: list[PlanItem] = field(default_factory=list)  # stat changed, same bytes
    unchanged: int = 0
    failed_skipped: list[str] = field(default_factory=list)  # failed before, file unchanged
    deleted: list[ImageRecord] = field(default_factory=list)
    hashed: int = 0  # files read to compare hashes
    files: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)  # seen, not images / unreadable

    @property
    def to_process(self) -> list[PlanItem]:
        return [*self.new, *self.changed, *self.retry]

    @property
    def is_noop(self) -> bool:
        return not (self.to_process or self.touched or self.deleted)

    def counts(self) -> dict[str, int]:
        return {
            "files": self.files,
            "new": len(self.new),
            "changed": len(self.changed),
            "retry": len(self.retry),
            "touched": len(self.touched),
            "unchanged": self.unchanged,
            "failed_skipped": len(self.failed_skipped),
            "deleted": len(self.deleted),
            "hashed": self.hashed,
            "skipped": len(self.skipped),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "counts": self.counts(),
            "new": [i.entry.rel for i in self.new],
            "changed": [i.entry.rel for i in self.changed],
            "retry": [{"path": i.entry.rel, "reason": i.reason} for i in self.retry],
            "touched": [i.entry.rel for i in self.touched],
            "failed_skipped": list(self.failed_skipped),
            "deleted": [r.path for r in self.deleted],
            "skipped": [{"path": f.rel, "reason": f.reason} for f in self.skipped],
        }

    def describe(self, *, limit: int = 20) -> str:
        """Human-readable plan (what ``--dry-run`` prints)."""
        c = self.counts()
        lines = [
            f"{self.root}: {c['files']} image file(s)",
            f"  new        {c['new']:>7}   (to index)",
            f"  changed    {c['changed']:>7}   (to re-index; old regions replaced)",
            f"  retry      {c['retry']:>7}   (interrupted or failed before)",
            f"  deleted    {c['deleted']:>7}   (regions to remove)",
            f"  touched    {c['touched']:>7}   (mtime/size changed, same content: no re-index)",
            f"  unchanged  {c['unchanged']:>7}",
        ]
        if self.skipped:
            lines.append(
                f"  skipped    {c['skipped']:>7}   (not indexed: {self.skipped_summary()})"
            )
        if self.failed_skipped:
            lines.append(
                f"  failed     {c['failed_skipped']:>7}   (unchanged since they failed; "
                "--retry-failed to try again)"
            )
        groups = (
            ("new", [i.entry.rel for i in self.new]),
            ("changed", [i.entry.rel for i in self.changed]),
            ("retry", [f"{i.entry.rel} ({i.reason})" for i in self.retry]),
            ("deleted", [r.path for r in self.deleted]),
            ("skipped", [f"{f.rel} ({f.reason})" for f in self.skipped]),
        )
        for label, names in groups:
            for name in names[:limit]:
                lines.append(f"    {label:<8} {name}")
            if len(names) > limit:
                lines.append(f"    {label:<8} ... and {len(names) - limit} more")
        return "\n".join(lines)

    def skipped_summary(self) -> str:
        """``"(3 not an image file, 1 broken symbolic link)"``: counts by kind of reason."""
        return summarize_skipped(self.skipped)


def summarize_skipped(skipped: list[SkippedFile]) -> str:
    """Counts of skipped files by kind of reason, e.g. ``"(3 not an image file, 1 hidden folder)"``."""
    if not skipped:
        return ""
    kinds = Counter(f.reason.split(":")[0] for f in skipped)
    return "(" + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + ")"


def walk_images(root: str | os.PathLike[str]) -> list[FileEntry]:
    """Image files under ``root`` (see :func:`scan_folder`; what is skipped is dropped)."""
    return scan_folder(root)[0]


def scan_folder(root: str | os.PathLike[str]) -> tuple[list[FileEntry], list[SkippedFile]]:
    """Image files under ``root`` (recursive, extensions case-insensitive), sorted by path, and
    every other thing the walk met, with the reason it is not indexed.

    Symbolic links to files are followed; links to folders are not (no cycles) and are
    reported, as are broken links, link loops, hidden folders (``.name``, not entered), files
    that are not images by their extension and files that cannot be stat'ed.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    out: list[FileEntry] = []
    skipped: list[SkippedFile] = []

    def rel_of(path: Path) -> str:
        return path.relative_to(root).as_posix()

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        kept_dirs = []
        for d in sorted(dirnames):
            if not _is_utf8(d):
                reason = "folder name is not valid UTF-8: not entered (rename it to index it)"
                skipped.append(SkippedFile(_shown(rel_of(here / d)), reason))
            elif d.startswith("."):
                skipped.append(SkippedFile(rel_of(here / d), "hidden folder: not entered"))
            elif (here / d).is_symlink():
                skipped.append(SkippedFile(rel_of(here / d), "link to a folder: not followed"))
            else:
                kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in filenames:
            path = here / name
            rel = rel_of(path)
            if not _is_utf8(name):  # SQL, JSON and the terminal all need text
                reason = "file name is not valid UTF-8: rename it to index it"
                skipped.append(SkippedFile(_shown(rel), reason))
                continue
            extension = os.path.splitext(name)[1].lower()
            try:
                st = path.stat()
            except OSError as exc:
                skipped.append(SkippedFile(rel, _stat_failure(path, exc)))
                continue
            if extension not in IMAGE_EXTENSIONS:
                skipped.append(
                    SkippedFile(rel, f"not an image file: {extension or 'no extension'}")
                )
                continue
            if not path.is_file():
                skipped.append(SkippedFile(rel, "not a regular file"))
                continue
            out.append(FileEntry(path, rel, int(st.st_size), st.st_mtime_ns / 1e9))
    out.sort(key=lambda e: e.rel)
    skipped.sort(key=lambda f: f.rel)
    return out, skipped


def _is_utf8(name: str) -> bool:
    """Whether a name from the file system is text (undecodable bytes arrive as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(rel: str) -> str:
    """A path with undecodable bytes made printable (each shown as U+FFFD)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _stat_failure(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if path.is_symlink():
        return f"broken symbolic link: {os.readlink(path)} does not exist"
    return f"cannot read: {exc.strerror or exc}"


def _same_stat(entry: FileEntry, rec: ImageRecord) -> bool:
    return (
        rec.size_bytes is not None
        and rec.mtime is not None
        and int(rec.size_bytes) == entry.size
        and abs(float(rec.mtime) - entry.mtime) <= MTIME_TOLERANCE_S
    )


def build_plan(
    root: str | os.PathLike[str],
    index: RegionIndex | None,
    *,
    retry_failed: bool = False,
    hash_stat_changes: bool = True,
) -> ScanPlan:
    """Compare the files under ``root`` with the images recorded in ``index`` (None: empty).

    Reads only the files whose size/mtime changed (to hash them); writes nothing. With
    ``hash_stat_changes=False`` nothing is read: a stat-changed file counts as changed, which is
    enough to know whether there is any work (the run itself plans again, and hashes once).
    """
    root = Path(root).expanduser().resolve()
    plan = ScanPlan(root=root)
    files, plan.skipped = scan_folder(root)
    plan.files = len(files)
    known: dict[str, ImageRecord] = {}
    if index is not None:
        known = {rec.path: rec for rec in index.iter_images()}
    seen: set[str] = set()
    for entry in files:
        seen.add(entry.rel)
        rec = known.get(entry.rel)
        if rec is None or rec.status == "deleted":
            plan.new.append(PlanItem(entry, "new", image_id=rec.id if rec else None))
            continue
        item = PlanItem(entry, rec.status, image_id=rec.id)
        if not _same_stat(entry, rec):
            if not hash_stat_changes:
                plan.changed.append(PlanItem(entry, "changed", image_id=rec.id))
                continue
            try:
                digest = file_sha256(entry.path)
            except OSError:
                digest = None  # unreadable now: the worker will report why
            plan.hashed += 1
            if digest is None or rec.content_hash is None or digest != rec.content_hash:
                item.reason = "changed"
                item.content_hash = digest
                plan.changed.append(item)
                continue
            item.content_hash = digest
            plan.touched.append(PlanItem(entry, "touched", digest, rec.id))
        if rec.status == "pending" or (rec.status == "failed" and retry_failed):
            plan.retry.append(item)
        elif rec.status == "failed":
            plan.failed_skipped.append(entry.rel)
        else:
            plan.unchanged += 1
    for path, rec in known.items():
        if path in seen or rec.status == "deleted":
            continue
        if Path(path).is_absolute():  # recorded outside any root: not ours to judge
            continue
        plan.deleted.append(rec)
    return plan
