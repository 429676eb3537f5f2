"""What ``regionsearch index`` prints: plans, reports and the up-to-date check that runs
before any model is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from regionsearch.indexer.report import IndexReport
    from regionsearch.store import ManifestInfo


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def existing_manifest(location: Path, db_url: str | None) -> ManifestInfo | None:
    """The manifest of the index already at ``location`` (None for a new index).

    ``index`` defaults its model, embedder and embedder options to the ones recorded there, so
    re-running it on an old index keeps that index's settings instead of failing on a changed
    project default (as ``search`` and ``serve`` do).
    """
    from regionsearch.store import IndexNotFoundError, RegionIndex

    if db_url is None and not RegionIndex.exists(location):
        return None
    try:
        index = RegionIndex.open(location, db_url=db_url, read_only=True)
    except IndexNotFoundError:
        return None
    try:
        return index.manifest
    finally:
        index.close()


def report_if_up_to_date(
    folder: Path, location: Path, db_url: str | None, retry_failed: bool, embedder: str
) -> IndexReport | None:
    """The report of a run with nothing to do, found without loading a model; else None.

    Reads the index read-only and plans as the run would; any change (new, changed, deleted,
    touched or retried files), another photo folder or another embedder means real work.
    """
    from regionsearch.indexer.report import IndexReport
    from regionsearch.indexer.scan import build_plan
    from regionsearch.store import IndexNotFoundError, RegionIndex

    if db_url is None and not RegionIndex.exists(location):
        return None
    started = time.perf_counter()
    try:
        index = RegionIndex.open(location, db_url=db_url, read_only=True)
    except IndexNotFoundError:  # a new index in a server database: all of it is work
        return None
    try:
        root = folder.expanduser().resolve()
        manifest = index.manifest
        if manifest.image_root != str(root) or manifest.embedder != embedder:
            return None
        # Stat only: a file whose size or mtime changed means work, and the run hashes it.
        plan = build_plan(root, index, retry_failed=retry_failed, hash_stat_changes=False)
    finally:
        index.close()
    if not plan.is_noop:
        return None
    return IndexReport.for_plan(root, plan, seconds=time.perf_counter() - started)


def print_report(report: IndexReport, name: str, location: Path, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    typer.echo(f"index {name!r} ({location}): {report.root}")
    typer.echo(table(report.summary_rows()))
    skipped = [(f.rel, f.reason) for f in report.skipped]
    for label, rows in (("failed", report.failures), ("skipped", skipped)):
        for path, reason in rows[:20]:
            typer.echo(f"  {label}: {path}: {reason}")
        if len(rows) > 20:
            typer.echo(f"  ... and {len(rows) - 20} more {label}")


def dry_run(
    folder: Path, location: Path, db_url: str | None, retry_failed: bool, json_out: bool
) -> None:
    from regionsearch.indexer.scan import build_plan
    from regionsearch.store import RegionIndex

    index = None
    if db_url is not None or RegionIndex.exists(location):
        index = RegionIndex.open(location, db_url=db_url, read_only=True)
    try:
        root = folder.expanduser().resolve()
        recorded = index.manifest.image_root if index is not None else None
        plan = build_plan(root, index, retry_failed=retry_failed)
    finally:
        if index is not None:
            index.close()
    if json_out:
        typer.echo(json.dumps({"dry_run": True, **plan.to_json()}, indent=2))
        return
    if recorded is not None and recorded != str(root):
        typer.echo(f"note: the index was built from {recorded} (needs --allow-root-change)")
    typer.echo("dry run: nothing written")
    typer.echo(plan.describe())
