"""``regionsearch eval``: compare region embedders on ground-truth masks of a dataset.

Data sources (exactly one):

* ``--world DIR`` — a dataset written by ``regionsearch world generate``;
* ``--world-generate N [--seed S]`` — render a *held-out* world split of N scenes with 3–6
  objects each into a cache folder (reused when it already exists) and evaluate on it;
* ``--images DIR --annotations FILE [--expressions FILE]`` — any COCO-format dataset, e.g.
  COCO ``val2017`` (the MaskInversion paper's class protocol: every instance mask ranks the 80
  category names through ``"a photo of a {}."``) or RefCOCO with its refs converted to JSON.

Held-out seed: see :mod:`regionsearch.eval.world_split` (a training seed is refused).

MaskInversion options: ``--steps``, ``--resolution``, ``--lr``, ``--alpha`` configure it;
``--expression-alpha A`` additionally runs it with ``alpha=A`` for the expression tasks only (the
paper uses 5 there), reported as its own row ``maskinversion (alpha=A)``. Any other embedder
option passes through ``--option EMBEDDER.KEY=VALUE`` (repeatable), e.g.
``--option crop.margin=0.2`` or ``--option alphaclip.checkpoint=/path/alpha.pth``, and
``--variant EMBEDDER:KEY=VALUE[,...]`` adds one more row of an evaluated embedder with other
options on every task (e.g. ``--variant maskinversion:lr=0.1``, the authors' class-task setting).

``--tasks search`` adds the end-to-end search task (:mod:`regionsearch.eval.search_task`): the
images indexed with automatic proposals as ``regionsearch index`` does, every class name asked,
detection-style AP at IoU 0.5, P@10 and top-1, beside the ground-truth-mask ceiling. The result
switches (``--dedupe-iou``, ``--min-cells``, ``--max-area``, ``--calibration``,
``--objectness``, ``--open-set``, ``--open-set-tau``, ``--superset-margin``,
``--superset-cover``, ``--repetition``, ``--repetition-floor``) default to the searcher's;
``--plain-search`` turns them all off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from regionsearch import DEFAULT_MODEL
from regionsearch.cli.options import (
    DeviceOption,
    ModelOption,
    PretrainedOption,
    ProposalRankingOption,
)
from regionsearch.errors import RegionSearchError
from regionsearch.eval.cli_args import parse_options, parse_variants
from regionsearch.eval.world_split import (
    EVAL_WORLD_SEED,
    WORLD_MAX_OBJECTS,
    WORLD_MIN_OBJECTS,
    heldout_world,
)
from regionsearch.search.postprocess import ResultOptions, results_for

_RESULTS = ResultOptions()  # the searcher's default result switches


def eval_command(
    world: Annotated[
        Path | None, typer.Option(help="World dataset folder (from 'regionsearch world generate').")
    ] = None,
    world_generate: Annotated[
        int | None,
        typer.Option(help="Generate a held-out world split of N scenes (3-6 objects) and use it."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the generated split (never one the training used).")
    ] = EVAL_WORLD_SEED,
    world_family: Annotated[
        str | None,
        typer.Option(
            help="World v2 family of the generated split: 'heldout' (never trained on) or "
            "'train'; omit for the version-1 world."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where generated splits are kept (default ~/.cache/...).")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="COCO-format dataset: image folder.")] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="COCO instances JSON (polygons or RLE).")
    ] = None,
    expressions: Annotated[
        Path | None,
        typer.Option(help="Referring expressions: world format or RefCOCO refs as JSON."),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Keep only refs of this split (RefCOCO 'val', 'testA').")
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = None,
    embedders: Annotated[
        str, typer.Option(help="'all' or a comma list, e.g. maskinversion,crop,masked-crop.")
    ] = "all",
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma list of classes, expressions (with grounding), pointing, search "
            "(end to end over automatic proposals, beside the ground-truth-mask ceiling). "
            "Default: classes and pointing, plus expressions when the dataset has them."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    min_area: Annotated[int, typer.Option(help="Skip masks smaller than this (pixels).")] = 16,
    steps: Annotated[
        int | None,
        typer.Option(help="MaskInversion optimisation steps (default: the model's, else 10)."),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(help="MaskInversion input size (default: the model's region resolution)."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="MaskInversion learning rate (default: the model's, else 0.2)."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="MaskInversion global-context weight.")] = 0.0,
    expression_alpha: Annotated[
        float | None,
        typer.Option(
            help="Also run MaskInversion with this alpha for the expression tasks "
            "(paper: 5), reported as 'maskinversion (alpha=A)'."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="Embedder option EMBEDDER.KEY=VALUE (repeatable)."),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="One more row of an evaluated embedder with other options, "
            "EMBEDDER:KEY=VALUE[,KEY=VALUE] (repeatable), e.g. maskinversion:lr=0.1."
        ),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(help="Prompt template for class names (default: the model's, '{}' = name)."),
    ] = None,
    max_regions: Annotated[int, typer.Option(help="search: proposals per image.")] = 50,
    proposal_ranking: ProposalRankingOption = None,
    dedupe_iou: Annotated[
        float | None, typer.Option(help="search: drop near-duplicates at this mask IoU.")
    ] = _RESULTS.dedupe_iou,
    min_cells: Annotated[
        float, typer.Option(help="search: drop regions under this many patch cells.")
    ] = _RESULTS.min_cells,
    max_area: Annotated[
        float, typer.Option(help="search: drop regions over this fraction of the image.")
    ] = _RESULTS.max_area,
    calibration: Annotated[
        float | None,
        typer.Option(
            help="search: hubness correction weight (0: off; default: the searcher's for an "
            "index of that embedder, 0.5 where the open-set term is on, else 1)."
        ),
    ] = None,
    calibration_bank: Annotated[
        str, typer.Option(help="search: calibration bank, 'generic' or 'queries'.")
    ] = "generic",
    objectness: Annotated[
        float, typer.Option(help="search: log-objectness prior weight (0: off).")
    ] = _RESULTS.objectness,
    open_set: Annotated[
        float | None,
        typer.Option(
            help="search: open-set term weight (query against the bank; 0: off; default: the "
            "searcher's for an index of that embedder)."
        ),
    ] = None,
    open_set_tau: Annotated[
        float, typer.Option(help="search: softmax temperature of the open-set term.")
    ] = _RESULTS.open_set_tau,
    superset_margin: Annotated[
        float,
        typer.Option(
            help="search: drop a region when a smaller one mostly inside it scores at least "
            "its score minus this (negative: keep supersets)."
        ),
    ] = _RESULTS.score_slack,
    superset_cover: Annotated[
        float, typer.Option(help="search: share of the smaller region inside the larger.")
    ] = _RESULTS.superset_cover,
    repetition: Annotated[
        float | None,
        typer.Option(
            help="search: weight of the repeated-stuff term (a region alike to several regions "
            "of its image loses score; 0: off; default: the searcher's for that embedder)."
        ),
    ] = None,
    repetition_floor: Annotated[
        float, typer.Option(help="search: repetition (cosine) above which a region loses score.")
    ] = _RESULTS.repetition_floor,
    plain_search: Annotated[
        bool, typer.Option(help="search: every result switch off (raw cosine order).")
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write result rows.")] = None,
    chart: Annotated[Path | None, typer.Option(help="Write a bar chart PNG.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the markdown report.")] = None,
    device: DeviceOption = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Compare region embedders on ground-truth masks: localized classification and
    referring expressions, with a table, JSON rows and a chart."""
    try:
        _eval(**locals())
    except RegionSearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _dataset(
    world: Path | None,
    world_generate: int | None,
    seed: int,
    cache_dir: Path | None,
    images: Path | None,
    annotations: Path | None,
    expressions: Path | None,
    world_family: str | None = None,
    **kwargs: Any,
) -> tuple[Any, list[str]]:
    """The dataset the options name, and notes for the report."""
    from regionsearch.eval.datasets import EvalError, RegionDataset

    sources = [
        world is not None,
        world_generate is not None,
        images is not None or annotations is not None,
    ]
    if sum(sources) != 1:
        raise EvalError(
            "choose one data source: --world DIR, --world-generate N, or "
            "--images DIR --annotations FILE [--expressions FILE]"
        )
    if world_family is not None and world_generate is None:
        raise EvalError("--world-family applies to --world-generate N only")
    if world_generate is not None:
        try:
            folder = heldout_world(world_generate, seed, cache_dir, family=world_family)
        except ValueError as exc:  # an unknown family
            raise EvalError(str(exc)) from None
        version = f", v2 {world_family}" if world_family else ""
        name = f"world-heldout(seed={seed}, n={world_generate}, {WORLD_MIN_OBJECTS}-{WORLD_MAX_OBJECTS} objects{version})"
        note = f"held-out world split generated in {folder} (seed {seed}, never used in training)"
        return RegionDataset.from_world(folder, name=name, **kwargs), [note]
    if world is not None:
        return RegionDataset.from_world(world, **kwargs), []
    if images is None or annotations is None:
        raise EvalError("--images and --annotations go together (a COCO-format dataset)")
    return RegionDataset(images, annotations, expressions, **kwargs), []


def _eval(
    world: Path | None,
    world_generate: int | None,
    seed: int,
    world_family: str | None,
    cache_dir: Path | None,
    images: Path | None,
    annotations: Path | None,
    expressions: Path | None,
    split: str | None,
    model: str,
    pretrained: str | None,
    embedders: str,
    tasks: str | None,
    limit: int | None,
    min_area: int,
    steps: int | None,
    resolution: int | None,
    lr: float | None,
    alpha: float,
    expression_alpha: float | None,
    option: list[str] | None,
    variant: list[str] | None,
    template: str | None,
    max_regions: int,
    proposal_ranking: str | None,
    dedupe_iou: float | None,
    min_cells: float,
    max_area: float,
    calibration: float | None,
    calibration_bank: str,
    objectness: float,
    open_set: float | None,
    open_set_tau: float,
    superset_margin: float,
    superset_cover: float,
    repetition: float | None,
    repetition_floor: float,
    plain_search: bool,
    json_path: Path | None,
    chart: Path | None,
    markdown: Path | None,
    device: str | None,
    threads: int | None,
    progress: bool,
) -> None:
    import torch

    from regionsearch.backbone import load_backbone
    from regionsearch.embedders import list_embedders
    from regionsearch.eval.datasets import EvalError
    from regionsearch.eval.report import bar_chart, markdown_report, markdown_table, write_json
    from regionsearch.eval.runner import (
        EmbedderSpec,
        check_tasks,
        expression_variant,
        parse_embedders,
        run_eval,
    )
    from regionsearch.eval.runner import variant as variant_of
    from regionsearch.eval.tasks import TASKS

    names = parse_embedders(embedders)
    extra = parse_options(option, list_embedders())
    variants = parse_variants(variant, names)
    wanted = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if wanted is not None:  # checked before any data or model loads
        wanted = list(check_tasks(wanted, (*TASKS, "search")))
    if template is not None and "{}" not in template:
        raise EvalError(f"--template {template!r} has no '{{}}' placeholder for the class name")
    if threads:
        torch.set_num_threads(threads)
    switches: dict[str, Any] = {
        "dedupe_iou": dedupe_iou,
        "min_cells": min_cells,
        "max_area": max_area,
        "objectness": objectness,
        "open_set_tau": open_set_tau,
        "superset_margin": None if superset_margin < 0 else superset_margin,
        "superset_cover": superset_cover,
        "repetition_floor": repetition_floor,
    }
    by_embedder = {"calibration": calibration, "open_set": open_set, "repetition": repetition}
    switches |= {k: v for k, v in by_embedder.items() if v is not None}

    def results(embedder: str) -> ResultOptions:
        """The search task's switches for one embedder: the searcher's defaults for an index of
        it, with what the command line set on top."""
        return ResultOptions.plain() if plain_search else results_for(embedder, **switches)

    try:  # search switches: checked before any data or model loads
        for embedder_name in names:
            results(embedder_name)
    except ValueError as exc:
        raise EvalError(f"search option: {exc}") from None
    if calibration_bank not in ("generic", "queries"):
        raise EvalError(f"--calibration-bank {calibration_bank!r}: use generic or queries")
    from regionsearch.masks import AutomaticProposals

    try:
        proposals = AutomaticProposals(max_regions=max_regions, objectness=proposal_ranking)
    except ValueError as exc:
        raise EvalError(f"proposals (--max-regions, --proposal-ranking): {exc}") from None

    dataset, notes = _dataset(
        world,
        world_generate,
        seed,
        cache_dir,
        images,
        annotations,
        expressions,
        world_family=world_family,
        limit=limit,
        min_area=min_area,
        require_expressions=wanted == ["expressions"],
        split=split,
    )
    if wanted is None:
        wanted = ["classes", "expressions"] if dataset.sentences else ["classes"]
        wanted.append("pointing")

    backbone = load_backbone(model, pretrained, device)
    given = {"steps": steps, "resolution": resolution, "lr": lr}
    mi_options: dict[str, Any] = {
        "alpha": alpha,
        **{k: v for k, v in given.items() if v is not None},
    }
    specs = []
    for name in names:
        options = {**(mi_options if name == "maskinversion" else {}), **extra.get(name, {})}
        specs.append(EmbedderSpec(name, options))
    for name, overrides in variants:
        base = next(s for s in specs if s.name == name and s.label is None)
        specs.insert(specs.index(base) + 1, variant_of(base, **overrides))
    if expression_alpha is not None:
        if "maskinversion" not in names or "expressions" not in wanted:
            raise EvalError(
                "--expression-alpha needs the maskinversion embedder and the expressions task"
            )
        base = next(s for s in specs if s.name == "maskinversion")
        variant = expression_variant(base, alpha=expression_alpha)
        specs.insert(specs.index(base) + 1, variant)
        if "classes" not in wanted:  # the plain run would only duplicate expression work
            specs.remove(base)

    typer.echo(
        f"evaluating {', '.join(s.display for s in specs)} on {dataset.name} "
        f"({len(dataset)} images, {dataset.num_annotations} candidate masks) with {backbone.name}",
        err=True,
    )
    rows: list[dict[str, Any]] = []
    if [t for t in wanted if t != "search"]:
        result = run_eval(
            dataset,
            backbone,
            specs,
            [t for t in wanted if t != "search"],
            templates=(template,) if template else None,
            progress=progress,
        )
        counts = result.counts
        notes = [
            *notes,
            f"{counts['images']} images, {counts['masks']} ground-truth masks, "
            f"{counts['sentences']} sentences, {counts['classes']} classes "
            f"(crowd masks and masks under {min_area} px skipped)",
            f"class prompts: {' | '.join(result.class_templates)}; expressions encoded as written",
            *[
                f"{run.label}: "
                + ", ".join(
                    f"{k}={v}" for k, v in run.settings.items() if k not in ("embedder", "model")
                )
                + f" — {run.seconds:.1f} s embedding"
                for run in result.runs
                if run.tasks
            ],
            f"wall time {result.wall_seconds:.1f} s on {backbone.device} "
            f"({torch.get_num_threads()} threads)",
        ]
        rows += result.rows
    if "search" in wanted:
        from regionsearch.eval.search_task import run_search_task

        search_rows, search_notes = run_search_task(
            dataset,
            backbone,
            [s for s in specs if s.tasks is None],
            results,
            bank=calibration_bank,
            mask_source=proposals,
            progress=progress,
        )
        rows += search_rows
        notes += search_notes
    report = markdown_report(rows, notes=notes)
    typer.echo(markdown_table(rows))
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report)
        typer.echo(f"wrote {markdown}", err=True)
    if json_path is not None:
        write_json(rows, json_path)
        typer.echo(f"wrote {json_path}", err=True)
    if chart is not None:
        bar_chart(rows, chart)
        typer.echo(f"wrote {chart}", err=True)


if __name__ == "__main__":
    typer.run(eval_command)
