"""``regionsearch refer``: the region of one photo that a referring expression describes.

An indexed photo is answered from its stored regions. Any other photo file is answered on the
spot, as ``POST /api/refer`` and ``regionsearch.refer()`` answer it: its regions are proposed
and embedded now with the index's model and embedder (the defaults when there is no index), and
nothing is stored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from regionsearch.cli import search as search_cli
from regionsearch.cli.options import (
    DbUrlOption,
    DeviceOption,
    IndexDirOption,
    JsonOption,
    ModelOverride,
    NameOption,
    VectorsOption,
)
from regionsearch.errors import RegionSearchError

ShowOption = Annotated[
    Path | None, typer.Option(help="Write the image here with the best region spotlit.")
]


def refer(
    image: Annotated[
        str,
        typer.Argument(
            help="An indexed image (its id or stored path), or any photo file: its regions are "
            "then proposed and embedded now, not stored."
        ),
    ],
    expression: Annotated[str, typer.Argument(help="e.g. 'the dog on the left'.")],
    name: NameOption = "default",
    index_dir: IndexDirOption = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, max=100)] = 5,
    as_json: JsonOption = False,
    show: ShowOption = None,
    model: ModelOverride = None,
    db_url: DbUrlOption = None,
    device: DeviceOption = None,
    vectors: VectorsOption = None,
) -> None:
    """Find the region of IMAGE described by EXPRESSION (with alternatives and scores)."""
    from regionsearch.store.errors import IndexNotFoundError

    photo = Path(image).expanduser()
    try:
        searcher = search_cli.open_searcher(name, index_dir, db_url, model, device, vectors)
    except IndexNotFoundError:
        if not photo.is_file():
            raise
        from regionsearch import DEFAULT_EMBEDDER, DEFAULT_MODEL
        from regionsearch.embedders import get_embedder

        backbone = search_cli.load_backbone(DEFAULT_MODEL, model, device)
        note = f"no index {name!r}: {image} is read now with {backbone.name} and {DEFAULT_EMBEDDER}"
        embedder = get_embedder(DEFAULT_EMBEDDER, backbone)
        _answer_photo(photo, expression, embedder, k, as_json, show, note)
        return
    try:
        record = _find_record(searcher, image)
        if record is not None:
            _answer_indexed(searcher, record, expression, k, as_json, show)
        elif photo.is_file():
            from regionsearch.search.examples import embedder_for_index

            embedder = embedder_for_index(searcher.index.manifest, searcher.backbone)
            note = f"{image} is not in index {name!r}: its regions are proposed and embedded now"
            _answer_photo(photo, expression, embedder, k, as_json, show, note)
        else:
            raise RegionSearchError(f"image {image!r} is not in index {name!r}, nor a file")
    finally:
        searcher.index.close()


def _find_record(searcher: Any, image: str) -> Any:
    """The indexed image ``image`` names: an id, a stored path or a file's resolved path."""
    record = searcher.index.get_image_by_id(int(image)) if image.isdigit() else None
    if record is None:
        record = searcher.index.get_image(image)
    if record is None:
        resolved = str(Path(image).expanduser().resolve())
        record = searcher.index.get_image(searcher.stored_path(resolved))
    return record


def _answer_indexed(
    searcher: Any, record: Any, expression: str, k: int, as_json: bool, show: Path | None
) -> None:
    """Rank the stored regions of an indexed photo."""
    result = searcher.refer(record.id, expression, k=k)
    if as_json:
        out = {
            "expression": expression,
            "image_id": record.id,
            "image_path": record.path,
            "best": result.best.to_dict() if result.best else None,
            "alternatives": [h.to_dict() for h in result.alternatives],
        }
        typer.echo(json.dumps(out))
    elif result.best is None:
        typer.echo("this image has no indexed regions")
    else:
        search_cli._print_table(search_cli._rows(result.hits))
    if show is not None and result.best is not None:
        from regionsearch.search.render import region_picture

        _save(region_picture(searcher.image_file(record.path), result.best.rle), show)


def _answer_photo(
    photo: Path,
    expression: str,
    embedder: Any,
    k: int,
    as_json: bool,
    show: Path | None,
    note: str,
) -> None:
    """Propose, embed and rank the regions of a photo file that no index holds."""
    from regionsearch.image_io import read_rgb
    from regionsearch.search.examples import refer_image

    typer.echo(note + " (nothing is stored)", err=True)
    pixels = read_rgb(photo)
    result = refer_image(embedder, pixels, expression, k=k)
    regions = result.regions
    if as_json:
        out = {
            "expression": expression,
            "image_id": None,
            "image_path": str(photo),
            "candidates": result.candidates,
            "best": dataclasses.asdict(result.best) if result.best else None,
            "alternatives": [dataclasses.asdict(r) for r in result.alternatives],
        }
        typer.echo(json.dumps(out))
    else:
        rows = [
            {
                "rank": rank,
                "score": f"{r.score:.4f}",
                "candidate": r.candidate,
                "box (x,y,w,h)": ",".join(f"{v:.0f}" for v in r.bbox),
                "area": f"{r.area:.0f}",
            }
            for rank, r in enumerate(regions, start=1)
        ]
        search_cli._print_table(rows)
    if show is not None and result.best is not None:
        from regionsearch.search.render import spotlight

        _save(spotlight(pixels, result.best.rle), show)


def _save(picture: np.ndarray, show: Path) -> None:
    from PIL import Image

    show.expanduser().parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(show.expanduser())
    typer.echo(f"wrote {show}", err=True)
