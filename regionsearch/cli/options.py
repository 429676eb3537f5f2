"""Options shared by several commands, each defined once, and the one ``KEY=VALUE`` parser.

An index is named the same way everywhere: ``--name NAME`` is ``INDEX_DIR/NAME``, and a
``--name`` holding a path separator is that folder itself.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from regionsearch import DEFAULT_MODEL
from regionsearch.cli.errors import CliError

INDEX_DIR_ENV = "REGIONSEARCH_INDEX_DIR"

NameOption = Annotated[
    str,
    typer.Option("--name", "-n", help="Index name: files in INDEX_DIR/NAME/ (a path also works)."),
]
IndexDirOption = Annotated[
    Path | None,
    typer.Option(
        "--index-dir", help="Folder of the indexes (default ./indexes or $REGIONSEARCH_INDEX_DIR)."
    ),
]
DbUrlOption = Annotated[
    str | None,
    typer.Option(
        "--db-url",
        help="SQLAlchemy URL of the metadata database (e.g. postgresql+psycopg://u:p@h/db); "
        "default: SQLite in the index folder, which always holds the FAISS file.",
    ),
]
VectorsOption = Annotated[
    str | None,
    typer.Option(
        "--vectors",
        help="Where the vectors live: milvus://HOST:19530/COLLECTION (a Milvus server), "
        "milvus-lite:///ABS/PATH/vectors.db or PATH.db (Milvus Lite), or a .faiss file; default: "
        "a FAISS file in the index folder. Recorded in the manifest when the index is created.",
    ),
]
MemoryBudgetOption = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        help="Memory the index's vectors may occupy, e.g. 8GB (binary units: 8GB = 8 GiB). "
        "Segment merges pick FAISS structures that fit (above IVF-Flat's ~2 KB a 512-d vector: "
        "4-bit PQ codes re-ranked by an 8-bit copy, ~0.6 KB). Recorded in the segment list; "
        "default: the recorded one, else a third of this machine's RAM.",
    ),
]


def memory_budget_options(text: str | None) -> dict[str, Any]:
    """``vector_options`` for ``--memory-budget`` (none when not given); a bad size is named."""
    if text is None:
        return {}
    from regionsearch.store.ann_policy import parse_memory_budget

    try:
        return {"memory_budget": parse_memory_budget(text)}
    except ValueError as exc:
        raise CliError(f"--memory-budget: {exc}") from None


ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="A bundled reference model (offline; `regionsearch models` lists them), an "
        "open_clip name/tag (ViT-B-16/openai), "
        "NAME:/path/to/weights.pt or local-dir:/path.",
    ),
]
ProposalRankingOption = Annotated[
    str | None,
    typer.Option(
        help="Automatic proposals: which fitted objectness ranks the candidates, 'coco' (the "
        "default, fitted on photos) or 'coco+world' (also on synthetic-world scenes).",
    ),
]
ModelOverride = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model spec (default: the model the index was built with; "
        f"{DEFAULT_MODEL} for a new index).",
    ),
]
PretrainedOption = Annotated[
    str | None,
    typer.Option(help="Pretrained tag or checkpoint file of an open_clip architecture."),
]
DeviceOption = Annotated[
    str | None, typer.Option(help="Torch device (default: cuda when available, else cpu).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def finite_score(value: float | None) -> float | None:
    """``--min-score`` must be a number: NaN would drop every result, silently."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def index_location(name: str, index_dir: Path | None = None) -> Path:
    """The folder of index ``name``: ``INDEX_DIR/NAME``, or ``name`` itself when it is a path."""
    if not name.strip() or name in (".", ".."):
        raise CliError(f"invalid index name {name!r}: a folder name (e.g. photos) or a path")
    if os.sep in name or (os.altsep and os.altsep in name):
        return Path(name).expanduser()
    base = index_dir if index_dir is not None else Path(os.environ.get(INDEX_DIR_ENV, "indexes"))
    return base.expanduser() / name


def parse_value(raw: str) -> Any:
    """``true``/``false`` → bool, then int, then float, else the string as given."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def parse_key_values(pairs: list[str] | None, option: str) -> dict[str, Any]:
    """``["steps=5", "lr=0.1"]`` → ``{"steps": 5, "lr": 0.1}`` (dashes in keys become
    underscores); a pair without ``=`` or key is a usage error naming ``option``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = parse_value(raw.strip())
    return out
