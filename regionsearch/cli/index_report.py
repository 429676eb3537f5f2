"""What ``regionsearch index`` prints and checks before any model is loaded: plans, reports,
the up-to-date check and the ``-E`` options."""

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


def check_embedder_options(
    embedder: str, options: dict[str, object], held: ManifestInfo | None
) -> None:
    """Refuse ``-E`` options before a model loads: a misspelt key (naming what the embedder
    takes) or, on an index of that embedder, a value it was not made with. A run with nothing
    to embed never builds the embedder that would refuse them."""
    from regionsearch.cli.errors import CliError
    from regionsearch.embedders import option_names
    from regionsearch.store.manifest import check_embedder_options as check_recorded

    try:
        accepted = option_names(embedder)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CliError(
            f"--embedder-option {', '.join(unknown)}: not an option of {embedder!r} "
            f"(it takes {', '.join(accepted)})"
        )
    if held is not None and held.embedder == embedder:
        check_recorded(held, dict(options))


def report_if_up_to_date(
    folder: Path,
    location: Path,
    db_url: str | None,
    retry_failed: bool,
    held: ManifestInfo | None,
    model: str,
    embedder: str,
) -> IndexReport | None:
    """The report of a run with nothing to do, found without loading a model; else None.

    ``held`` is the index's manifest (:func:`existing_manifest`). Plans read-only as the run
    would; any change (new, changed, deleted, touched or retried files), another photo folder,
    model or embedder means real work (and the run refuses a model or embedder that differs).
    """
    from regionsearch.indexer.report import IndexReport
    from regionsearch.indexer.scan import build_plan
    from regionsearch.store import RegionIndex

    root = folder.expanduser().resolve()
    if held is None or (held.image_root, held.model, held.embedder) != (str(root), model, embedder):
        return None
    started = time.perf_counter()
    with RegionIndex.open(location, db_url=db_url, read_only=True) as index:
        if index.missing_vectors():  # the writer's reconcile re-embeds what is missing
            return None
        # Stat only: a file whose size or mtime changed means work, and the run hashes it.
        plan = build_plan(root, index, retry_failed=retry_failed, hash_stat_changes=False)
    if not plan.is_noop:
        return None
    return IndexReport.for_plan(root, plan, seconds=time.perf_counter() - started)


def print_report(report: IndexReport, name: str, location: Path, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    typer.echo(f"index {name!r} ({location}): {report.root}")
    typer.echo(table(report.summary_rows()))
    if report.plan.get("files", 0) == 0 and report.images_deleted == 0:
        from regionsearch.indexer.scan import IMAGE_EXTENSIONS

        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        typer.echo(
            f"note: no photos found under {report.root} (looked for {kinds} in it and its "
            "subfolders)",
            err=True,
        )
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
