"""``regionsearch index`` and ``regionsearch stats``.

Heavy modules (torch, FAISS, SQLAlchemy, scikit-image) are imported inside the commands so
that ``--help`` stays instant, and an unchanged folder is found up to date before any model
is loaded.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from regionsearch import DEFAULT_EMBEDDER, DEFAULT_MAX_PIXELS, DEFAULT_MODEL
from regionsearch.cli.errors import CliError, MappedCommand
from regionsearch.cli.index_report import (
    check_embedder_options,
    dry_run,
    existing_manifest,
    print_report,
    report_if_up_to_date,
    table,
)
from regionsearch.cli.options import (
    DbUrlOption,
    DeviceOption,
    IndexDirOption,
    JsonOption,
    MemoryBudgetOption,
    ModelOverride,
    NameOption,
    PretrainedOption,
    ProposalRankingOption,
    VectorsOption,
    index_location,
    memory_budget_options,
    parse_key_values,
)


def _mask_source(
    annotations: Path | None,
    masks: Path | None,
    sam_checkpoint: Path | None,
    sam_model: str,
    max_regions: int,
    device: str | None,
    sam2_checkpoint: Path | None = None,
    sam2_options: dict[str, Any] | None = None,
    proposal_ranking: str | None = None,
) -> Any:
    chosen = [o for o in (annotations, masks, sam_checkpoint, sam2_checkpoint) if o is not None]
    if len(chosen) > 1:
        raise CliError(
            "choose one mask source: --annotations, --masks, --sam-checkpoint or --sam2-checkpoint"
        )
    if chosen and proposal_ranking is not None:
        raise CliError("--proposal-ranking applies to automatic proposals only (no mask source)")
    try:
        if annotations is not None:
            from regionsearch.masks import CocoAnnotationSource

            return CocoAnnotationSource(annotations)
        if masks is not None:
            from regionsearch.masks import PngMaskSource

            return PngMaskSource(masks)
        if sam_checkpoint is not None:
            from regionsearch.backbone import default_device
            from regionsearch.masks import SamProposals

            return SamProposals(
                sam_checkpoint,
                model_type=sam_model,
                device=device or str(default_device()),
                max_regions=max_regions,
            )
        if sam2_checkpoint is not None:
            from regionsearch.backbone import default_device
            from regionsearch.masks import Sam2Proposals

            return Sam2Proposals(
                sam2_checkpoint,
                device=device or str(default_device()),
                max_regions=max_regions,
                **(sam2_options or {}),
            )
        from regionsearch.masks import AutomaticProposals

        return AutomaticProposals(max_regions=max_regions, objectness=proposal_ranking)
    except ValueError as exc:
        raise CliError(str(exc)) from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, docker stop) stops the run like Ctrl-C: checkpoint, then exit."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def index_command(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Photo folder, walked recursively (jpg, jpeg, png, webp, bmp, tif, tiff, gif); "
            "every other file is listed as skipped, with the reason.",
            exists=True,
            file_okay=False,
        ),
    ],
    name: NameOption = "default",
    index_dir: IndexDirOption = None,
    db_url: DbUrlOption = None,
    vectors: VectorsOption = None,
    model: ModelOverride = None,
    pretrained: PretrainedOption = None,
    device: DeviceOption = None,
    embedder: Annotated[
        str | None,
        typer.Option(
            "--embedder",
            "-e",
            help="Region embedder (see `regionsearch models`); fixed per index. Default: the "
            f"existing index's, else {DEFAULT_EMBEDDER}.",
        ),
    ] = None,
    embedder_option: Annotated[
        list[str] | None,
        typer.Option(
            "--embedder-option",
            "-E",
            help="KEY=VALUE passed to the embedder, repeatable (e.g. -E steps=5). Default: "
            "the options an existing index was built with; for a new index, the settings the "
            "model records for the embedder, else the embedder's own.",
        ),
    ] = None,
    factory: Annotated[
        str,
        typer.Option(
            help="FAISS index factory, fixed when the index is created: 'IDMap2,Flat' (exact), "
            "'HNSW32', 'IVF1024,Flat', ..."
        ),
    ] = "IDMap2,Flat",
    annotations: Annotated[
        Path | None,
        typer.Option(help="COCO instances JSON: index its annotated masks instead of proposals."),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Folder of PNG masks (<stem>/*.png binary masks or <stem>.png label images)."
        ),
    ] = None,
    sam_checkpoint: Annotated[
        Path | None,
        typer.Option(help="Segment Anything checkpoint: SAM automatic masks as regions."),
    ] = None,
    sam_model: Annotated[
        str, typer.Option(help="SAM model type of --sam-checkpoint (vit_b, vit_l, vit_h).")
    ] = "vit_b",
    sam2_checkpoint: Annotated[
        Path | None,
        typer.Option(help="SAM 2 checkpoint (e.g. sam2.1_hiera_large.pt): SAM 2 automatic masks."),
    ] = None,
    sam2_config: Annotated[
        str | None,
        typer.Option(
            help="SAM 2 model config of --sam2-checkpoint (e.g. configs/sam2.1/sam2.1_hiera_l.yaml "
            "or a YAML file); default: read off an official checkpoint name."
        ),
    ] = None,
    sam2_points_per_side: Annotated[
        int, typer.Option(help="SAM 2 point prompts per image side (n*n prompts per photo).")
    ] = 32,
    sam2_points_per_batch: Annotated[
        int, typer.Option(help="SAM 2 prompts decoded per forward pass (raise on a big GPU).")
    ] = 64,
    sam2_pred_iou_thresh: Annotated[
        float, typer.Option(help="SAM 2: drop masks whose predicted IoU is below this (0-1).")
    ] = 0.8,
    sam2_stability_score_thresh: Annotated[
        float, typer.Option(help="SAM 2: drop masks whose stability score is below this (0-1).")
    ] = 0.95,
    max_regions: Annotated[
        int,
        typer.Option(
            min=1,
            help="Regions per photo for automatic/SAM/SAM 2 proposals (whole image included).",
        ),
    ] = 50,
    proposal_ranking: ProposalRankingOption = None,
    workers: Annotated[
        int,
        typer.Option(min=0, help="Decode + mask-proposal workers running ahead of the embedder."),
    ] = 2,
    processes: Annotated[
        bool,
        typer.Option(
            "--processes/--threads",
            help="Workers as processes (parallel Python, more memory) or threads (default).",
        ),
    ] = False,
    batch_images: Annotated[
        int, typer.Option(min=1, help="Images stored per database transaction.")
    ] = 8,
    max_side: Annotated[
        int | None,
        typer.Option(
            min=32,
            help="Downscale photos larger than this (longest side, pixels, at least 32) before "
            "masks and embedding; masks are stored at that size. Not with --annotations/--masks.",
        ),
    ] = None,
    max_pixels: Annotated[
        int,
        typer.Option(
            min=1,
            help="Refuse photos that would decode to more pixels than this (decompression "
            "bombs); with --max-side, JPEGs decode at a reduced size and pass.",
        ),
    ] = DEFAULT_MAX_PIXELS,
    checkpoint_seconds: Annotated[
        float, typer.Option(min=0.0, help="Make vectors durable at least this often (seconds).")
    ] = 300.0,
    retry_failed: Annotated[
        bool, typer.Option(help="Retry images that failed before even if their file is unchanged.")
    ] = False,
    allow_root_change: Annotated[
        bool,
        typer.Option(help="Accept a folder other than the one the index was built from (moved)."),
    ] = False,
    dry: Annotated[
        bool, typer.Option("--dry-run", help="Only print what would change; write nothing.")
    ] = False,
    json_out: JsonOption = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Embed on Ray actors (a local Ray unless --ray-address); --workers and "
            "--processes then do not apply.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Embed on the Ray cluster at HOST:PORT, ray://HOST:PORT or auto (implies "
            "--ray). Photos and model files must be at the same paths on every node.",
        ),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option(
            help="With --ray: actors (default: one per GPU of the cluster, else per CPU)."
        ),
    ] = None,
    memory_budget: MemoryBudgetOption = None,
) -> None:
    """Index the photos under FOLDER: new and changed files are (re)indexed, deleted ones removed.

    Unchanged files are skipped (size + mtime, then sha256); when nothing changed, the model is
    not even loaded.

    A killed run resumes where it stopped when run again.

    Corrupt images are reported and skipped; the run goes on.
    Exit status: 0 all indexed, 3 finished but some images failed (listed; retried with
    --retry-failed), 130 interrupted (run again to resume), 1 runtime error, 2 usage error.
    """
    from regionsearch.image_io import configure_pillow

    configure_pillow(max_pixels)
    say = _status_printer(enabled=progress and not json_out)
    location = index_location(name, index_dir)
    embedder_options = parse_key_values(embedder_option, "--embedder-option")
    vector_options = memory_budget_options(memory_budget)
    if dry:
        dry_run(folder, location, db_url, retry_failed, json_out)
        return
    if max_side is not None and (annotations is not None or masks is not None):
        raise CliError("--max-side would resize stored masks: not with --annotations/--masks")
    ray = ray or ray_address is not None
    if ray_actors is not None and (not ray or ray_actors < 1):
        raise CliError(f"--ray-actors {ray_actors}: a count >= 1, with --ray")
    if ray_address is not None:
        from regionsearch.indexer.distributed import check_reachable

        check_reachable(ray_address)  # in seconds, before a model loads or an index is created
    if vectors is not None:
        from regionsearch.store.backends import scheme_for

        scheme_for(vectors)  # an unknown scheme fails here, before a model loads or a folder exists
    held = existing_manifest(location, db_url)
    model = model or (held.model if held else DEFAULT_MODEL)
    embedder = embedder or (held.embedder if held else DEFAULT_EMBEDDER)
    check_embedder_options(
        embedder, embedder_options, held
    )  # before a model loads, even on no work
    if held and held.embedder == embedder and held.embedder_description and not embedder_option:
        from regionsearch.embedders import constructor_options

        embedder_options = constructor_options(embedder, held.embedder_description)
    say(f"scanning {folder} ...")
    up_to_date = report_if_up_to_date(folder, location, db_url, retry_failed, held, model, embedder)
    if up_to_date is not None:
        print_report(up_to_date, name, location, json_out)
        raise typer.Exit(up_to_date.exit_code)
    source = _mask_source(
        annotations,
        masks,
        sam_checkpoint,
        sam_model,
        max_regions,
        device,
        sam2_checkpoint,
        {
            "config": sam2_config,
            "points_per_side": sam2_points_per_side,
            "points_per_batch": sam2_points_per_batch,
            "pred_iou_thresh": sam2_pred_iou_thresh,
            "stability_score_thresh": sam2_stability_score_thresh,
        },
        proposal_ranking,
    )

    from regionsearch.backbone import load_backbone
    from regionsearch.embedders import get_embedder
    from regionsearch.indexer.pipeline import Indexer
    from regionsearch.store import RegionIndex

    say(f"loading model {model} ...")
    started = time.perf_counter()
    # With --ray the actors embed; the driver's copy only checks the index, so not on a GPU.
    backbone = load_backbone(model, pretrained, "cpu" if ray else device)
    say(f"model {backbone.name} loaded in {time.perf_counter() - started:.1f} s")
    try:
        region_embedder = get_embedder(embedder, backbone, **embedder_options)
    except (ValueError, TypeError) as exc:
        raise CliError(f"embedder {embedder!r}: {exc}") from None
    index = RegionIndex.create(
        location,
        model=backbone.name,
        embedder=region_embedder.name,
        dimension=backbone.embed_dim,
        factory=factory,
        db_url=db_url,
        vectors_location=vectors,
        checkpoint_every_s=checkpoint_seconds,
        vector_options=vector_options,
    )
    try:
        indexer = Indexer(
            index,
            backbone,
            region_embedder,
            source,
            workers=workers,
            executor="process" if processes else "thread",
            batch_images=batch_images,
            max_side=max_side,
            max_pixels=max_pixels,
            retry_failed=retry_failed,
            allow_root_change=allow_root_change,
            progress=progress and not json_out,
            mapper=_ray_mapper(
                ray, ray_actors, device, region_embedder, model, pretrained, embedder_options
            ),
        )
        # Ray first: ray.init sets its own SIGTERM handler (exit), which ours then replaces.
        with _ray_session(ray, ray_address), _sigterm_as_interrupt():
            report = indexer.run(folder)
    finally:
        index.close()
    print_report(report, name, location, json_out)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _ray_mapper(
    ray: bool,
    actors: int | None,
    device: str | None,
    embedder: Any,
    model: str,
    pretrained: str | None,
    options: dict[str, Any],
) -> Any:
    """The Ray actor pool of ``--ray`` (None without it: the single-process path)."""
    if not ray:
        return None
    from regionsearch.indexer.distributed import EmbedderSpec, RayMapper

    spec = EmbedderSpec.of(embedder, model, pretrained, options)
    return RayMapper(spec, actors=actors, device=device)


def _ray_session(ray: bool, address: str | None) -> contextlib.AbstractContextManager[None]:
    """Ray for the run with ``--ray``: the cluster at ``address``, or a local one."""
    if not ray:
        return contextlib.nullcontext()
    from regionsearch.indexer.distributed import ray_cluster

    return ray_cluster(address)


def _status_printer(*, enabled: bool) -> Callable[[str], None]:
    """Stage lines on stderr (scan, model load) so that no step of a run is silent."""

    def say(message: str) -> None:
        if enabled:
            typer.echo(message, err=True)

    return say


def stats_command(
    name: NameOption = "default",
    index_dir: IndexDirOption = None,
    db_url: DbUrlOption = None,
    json_out: JsonOption = False,
) -> None:
    """Counts of an index: images by status, regions, vectors, tombstones."""
    from dataclasses import asdict

    from regionsearch.store import RegionIndex

    location = index_location(name, index_dir)
    index = RegionIndex.open(location, db_url=db_url, read_only=True)
    try:
        stats = index.stats()
        manifest = index.manifest
    finally:
        index.close()
    options = manifest.embedder_options
    data = {
        **asdict(stats),
        "embedder_options": options,
        "image_root": manifest.image_root,
        "location": str(location),
    }
    if json_out:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    images = ", ".join(f"{k} {v}" for k, v in sorted(stats.images.items()))
    rows = [
        ("index", f"{stats.name} ({location})"),
        ("model", f"{stats.model} / {stats.embedder} (d={stats.dimension}, {stats.factory})"),
        (
            "embedder options",
            "not recorded (made before options were)"
            if options is None
            else ", ".join(f"{k}={v}" for k, v in options.items()) or "none",
        ),
        ("photo root", str(manifest.image_root)),
        ("images", f"{sum(stats.images.values())} ({images})"),
        ("regions", str(stats.regions)),
        ("  pending / missing", f"{stats.regions_pending} / {stats.regions_missing}"),
        ("  deleted (SQL tombstones)", str(stats.regions_deleted)),
        ("vectors", str(stats.vectors)),
        ("  FAISS tombstones", str(stats.vector_tombstones)),
    ]
    typer.echo(table(rows))


def register(app: typer.Typer) -> None:
    """Add ``index`` and ``stats`` to ``app``."""
    app.command("index", cls=MappedCommand)(index_command)
    app.command("stats", cls=MappedCommand)(stats_command)
