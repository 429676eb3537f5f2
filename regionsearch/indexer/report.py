"""What one indexing run did: counts, failures, skipped files, timings, and its exit status."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionsearch.indexer.scan import ScanPlan, SkippedFile, summarize_skipped

#: ``regionsearch index`` exits with this when the run finished but some images failed (they are
#: listed, recorded as failed, and retried with ``--retry-failed``); the summary is unchanged.
PARTIAL_FAILURE_EXIT_CODE = 3


@dataclass
class IndexReport:
    """Outcome of one :meth:`Indexer.run`."""

    root: str
    plan: dict[str, int] = field(default_factory=dict)
    images_indexed: int = 0
    regions_indexed: int = 0
    images_failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: list[SkippedFile] = field(default_factory=list)  # seen by the scan, not indexed
    images_deleted: int = 0
    regions_deleted: int = 0
    touched: int = 0
    embed_calls: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    prepare_seconds: float = 0.0  # summed over workers
    wait_seconds: float = 0.0  # main thread waiting for workers
    image_seconds: list[float] = field(default_factory=list)  # embedding time per image
    image_regions: list[int] = field(default_factory=list)
    interrupted: bool = False

    @classmethod
    def for_plan(cls, root: str | Path, plan: ScanPlan, **fields: Any) -> IndexReport:
        """A report that starts from ``plan``: its counts and what its scan skipped."""
        return cls(root=str(root), plan=plan.counts(), skipped=list(plan.skipped), **fields)

    @property
    def images_per_s(self) -> float:
        return self.images_indexed / self.seconds if self.seconds > 0 else 0.0

    @property
    def regions_per_s(self) -> float:
        return self.regions_indexed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "plan": dict(self.plan),
            "images_indexed": self.images_indexed,
            "regions_indexed": self.regions_indexed,
            "images_failed": self.images_failed,
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "skipped": [{"path": f.rel, "reason": f.reason} for f in self.skipped],
            "images_deleted": self.images_deleted,
            "regions_deleted": self.regions_deleted,
            "touched": self.touched,
            "embed_calls": self.embed_calls,
            "seconds": round(self.seconds, 3),
            "embed_seconds": round(self.embed_seconds, 3),
            "prepare_seconds": round(self.prepare_seconds, 3),
            "wait_seconds": round(self.wait_seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
            "regions_per_s": round(self.regions_per_s, 3),
            "interrupted": self.interrupted,
        }

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 130 interrupted, 3 some images failed, 0 all indexed."""
        if self.interrupted:
            return 130
        return PARTIAL_FAILURE_EXIT_CODE if self.images_failed else 0

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("images indexed", str(self.images_indexed)),
            ("regions indexed", str(self.regions_indexed)),
            ("images failed", str(self.images_failed)),
            ("files skipped", f"{len(self.skipped)} {summarize_skipped(self.skipped)}".strip()),
            ("images deleted", f"{self.images_deleted} ({self.regions_deleted} regions)"),
            ("unchanged", str(self.plan.get("unchanged", 0))),
            ("time", f"{self.seconds:.1f} s (embedding {self.embed_seconds:.1f} s)"),
            ("throughput", f"{self.images_per_s:.2f} images/s, {self.regions_per_s:.1f} regions/s"),
        ]
        if self.plan.get("failed_skipped"):
            # a rerun on an unchanged folder must not make earlier failures look resolved
            rows.append(
                (
                    "failed before",
                    f"{self.plan['failed_skipped']} (unchanged since; --retry-failed to try again)",
                )
            )
        if self.interrupted:
            rows.append(("interrupted", "yes: run the same command again to resume"))
        return rows
