"""``regionsearch search`` and ``similar`` (``refer`` is in :mod:`regionsearch.cli.refer`): query
an index from the terminal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from regionsearch.cli.errors import MappedCommand
from regionsearch.cli.options import (
    DbUrlOption,
    DeviceOption,
    IndexDirOption,
    JsonOption,
    ModelOverride,
    NameOption,
    VectorsOption,
    finite_score,
    index_location,
)
from regionsearch.errors import RegionSearchError

# Options of both `search` and `similar`.
ResultsOption = Annotated[int, typer.Option("--k", "-k", min=1, max=1000, help="Results.")]
PathGlobOption = Annotated[
    str | None, typer.Option("--path", help="Only images whose path matches this glob.")
]
SheetOption = Annotated[
    Path | None,
    typer.Option(help="Write a contact sheet (PNG/JPEG) here, each match spotlit."),
]


def load_backbone(index_model: str, model: str | None, device: str | None = None) -> Any:
    """The backbone for queries: ``model`` or the model recorded in the index (tests patch this)."""
    from regionsearch.backbone import load_backbone as load

    return load(model or index_model, None, device)


def open_searcher(
    name: str,
    index_dir: Path | None,
    db_url: str | None,
    model: str | None,
    device: str | None = None,
    vectors: str | None = None,
) -> Any:
    """A searcher over index ``name`` opened read-only, with the index's model."""
    from regionsearch.search import RegionSearcher
    from regionsearch.store import RegionIndex

    index = RegionIndex.open(
        index_location(name, index_dir), db_url=db_url, read_only=True, vectors_location=vectors
    )
    try:
        if missing := index.missing_vectors():  # results would silently lack those regions
            regions = index.manifest.n_regions
            typer.echo(
                f"note: index {name!r} holds {regions} regions but {regions - missing} vectors;"
                " run 'regionsearch index' on its folder again to embed the missing ones",
                err=True,
            )
        return RegionSearcher(index, load_backbone(index.model, model, device))
    except BaseException:
        index.close()
        raise


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        typer.echo("  ".join(columns))
        for row in rows:
            typer.echo("  ".join(str(row[c]) for c in columns))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


def _rows(hits: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank,
            "score": f"{h.score:.4f}",
            "region": h.region_id,
            "image": h.image_id,
            "box (x,y,w,h)": ",".join(f"{v:.0f}" for v in h.bbox),
            "path": h.image_path,
        }
        for rank, h in enumerate(hits, start=1)
    ]


def _print_hits(hits: list[Any], min_score: float | None) -> None:
    """The table of ``hits``, or a line saying there is none."""
    if hits:
        _print_table(_rows(hits))
    else:
        typer.echo("no match" + (f" with score >= {min_score}" if min_score is not None else ""))


def _write_sheet(searcher: Any, hits: list[Any], show: Path, query: str | None) -> None:
    """The contact sheet of ``hits`` at ``show`` (folders created), the query as its title."""
    from regionsearch.search.render import contact_sheet

    if not hits:
        typer.echo("nothing to show (no results)", err=True)
        return
    files = [searcher.image_file(h.image_path) for h in hits]
    show.expanduser().parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(hits, files, query=query).save(show.expanduser())
    typer.echo(f"wrote {show}", err=True)


def similar(
    region_id: Annotated[int, typer.Argument(help="Region id (from search results or --json).")],
    name: NameOption = "default",
    index_dir: IndexDirOption = None,
    k: ResultsOption = 10,
    min_score: Annotated[
        float | None, typer.Option(callback=finite_score, help="Drop results below this score.")
    ] = None,
    one_per_image: Annotated[
        bool,
        typer.Option("--one-per-image", help="Best region per photo (its own photo left out)."),
    ] = False,
    path: PathGlobOption = None,
    as_json: JsonOption = False,
    show: SheetOption = None,
    model: ModelOverride = None,
    db_url: DbUrlOption = None,
    device: DeviceOption = None,
    vectors: VectorsOption = None,
) -> None:
    """Find regions like REGION_ID ("more like this"): its stored vector is the query, with the
    filters and thresholds of `search`; the region itself is never listed."""
    from regionsearch.search import SearchFilters
    from regionsearch.search.examples import similar as find_similar

    searcher = open_searcher(name, index_dir, db_url, model, device, vectors)
    try:
        try:
            hits = find_similar(
                searcher,
                region_id,
                k=k,
                min_score=min_score,
                filters=SearchFilters(path_glob=path),
                one_per_image=one_per_image,
            )
        except KeyError:
            raise RegionSearchError(f"region {region_id} is not in index {name!r}") from None
        if as_json:
            out = {"region_id": region_id, "results": [h.to_dict() for h in hits]}
            typer.echo(json.dumps(out))
        else:
            _print_hits(hits, min_score)
        if show is not None:
            _write_sheet(searcher, hits, show, f"like region {region_id}")
    finally:
        searcher.index.close()


def register(app: typer.Typer) -> None:
    """Add ``search``, ``refer`` and ``similar`` to ``app``."""

    @app.command(cls=MappedCommand)
    def search(
        text: Annotated[str, typer.Argument(help="What to look for, e.g. 'a red umbrella'.")],
        name: NameOption = "default",
        index_dir: IndexDirOption = None,
        k: ResultsOption = 10,
        min_score: Annotated[
            float | None,
            typer.Option(
                callback=finite_score,
                help="Drop results below this score (calibrated unless --plain).",
            ),
        ] = None,
        one_per_image: Annotated[
            bool, typer.Option("--one-per-image", help="Best region per image only.")
        ] = False,
        plain: Annotated[
            bool,
            typer.Option(
                "--plain",
                help="Raw cosine order: no hubness calibration, priors or duplicate removal.",
            ),
        ] = False,
        open_set: Annotated[
            float | None,
            typer.Option(
                "--open-set",
                min=0.0,
                help="Weight of the open-set term: a region that matches generic texts "
                "('background', 'texture', ...) as well as TEXT loses rank (0: off; default: 1 "
                "for indexes of crop-style embedders, Alpha-CLIP and IP-CLIP, else 0).",
            ),
        ] = None,
        calibration: Annotated[
            float | None,
            typer.Option(
                "--calibration",
                min=0.0,
                help="Weight of the hubness correction (default: 0.5 where the open-set term "
                "is on by default, else 1).",
            ),
        ] = None,
        repetition: Annotated[
            float | None,
            typer.Option(
                "--repetition",
                min=0.0,
                help="Weight of the repeated-stuff term: a region that looks like several other "
                "regions of its photo (a background tile) loses score; 0 keeps alike objects (a "
                "flock, a crowd) level with lone ones (default: 0.5 for indexes of MaskInversion, "
                "crop, masked crop, Alpha-CLIP and IP-CLIP, else 0).",
            ),
        ] = None,
        path: PathGlobOption = None,
        as_json: JsonOption = False,
        show: SheetOption = None,
        model: ModelOverride = None,
        db_url: DbUrlOption = None,
        device: DeviceOption = None,
        vectors: VectorsOption = None,
    ) -> None:
        """Find the regions of the indexed photos that match TEXT."""
        from regionsearch.search import SearchFilters
        from regionsearch.search.postprocess import ResultOptions

        searcher = open_searcher(name, index_dir, db_url, model, device, vectors)
        try:
            hits = searcher.search(
                text,
                k=k,
                min_score=min_score,
                filters=SearchFilters(path_glob=path),
                one_per_image=one_per_image,
                results=ResultOptions.plain()
                if plain
                else dataclasses.replace(
                    searcher.results,
                    **{
                        key: value
                        for key, value in (
                            ("open_set", open_set),
                            ("calibration", calibration),
                            ("repetition", repetition),
                        )
                        if value is not None
                    },
                ),
            )
            if as_json:
                out = {
                    "query": text,
                    "templated": searcher.templates_for(text) is not None,
                    "results": [h.to_dict() for h in hits],
                }
                typer.echo(json.dumps(out))
            else:
                _print_hits(hits, min_score)
            if show is not None:
                _write_sheet(searcher, hits, show, text)
        finally:
            searcher.index.close()

    from regionsearch.cli.refer import refer

    app.command("refer", cls=MappedCommand)(refer)
    app.command("similar", cls=MappedCommand)(similar)
