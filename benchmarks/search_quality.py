"""End-to-end search quality: class names against *automatic proposals*, each result switch on/off.

``regionsearch eval`` scores embedders on ground-truth masks. A user's index holds proposals
instead. This benchmark runs the ``search`` task of ``regionsearch eval``
(:mod:`regionsearch.eval.search_task`: images prepared by the indexer's own code with
``AutomaticProposals()``, every class name asked against all regions, detection-style AP at
IoU 0.5, P@10, top-1, and the ground-truth-mask ceiling) and scores every embedder under
several settings of the searcher's result switches
(:class:`~regionsearch.search.postprocess.ResultOptions`): all off (``plain``), each one alone,
all on (the searcher's defaults), and all on but one. Embeddings are computed once per embedder
and region set; only the ranking changes between settings.

The ceiling ranks the ground-truth masks with the same hubness calibration but without the
proposal-only switches (a ground-truth mask is neither a duplicate nor junk, and has no
objectness score).

    OMP_NUM_THREADS=1 python benchmarks/search_quality.py --scenes 100 \\
        --embedders maskinversion alphaclip masked-crop crop ipclip global \\
        --json benchmarks/results/search_quality_world.json

Each embedder is ranked with its own product defaults (``results_for``: the open-set and
repeated-stuff switches differ by embedder), every switch those defaults turn on is left out in
turn, and ``--try KEY=V[,KEY=V]`` ranks the defaults with a change on top; ``--family`` picks a
world v2 family (choose on ``train``, confirm on ``heldout``), e.g.
``benchmarks/results/search_switches_mi_lr02_train60.md``:

    python benchmarks/search_quality.py --scenes 60 --family train --seed 5150 \\
        --model reference-v8 --embedders maskinversion --try open_set=1,calibration=0.5

The table below predates the per-embedder defaults and the v2 world (bare ``ResultOptions()``
then, world v1, the first reference model).

Measured (Intel Xeon, 2 cores shared with other jobs, 1 torch thread; bundled reference model;
world v1, first 100 held-out scenes of seed 90417: 450 objects, 64 class queries, 3,536
proposals covering 99.1% of the objects at IoU >= 0.5). mAP in percent; the ceiling is the
ground-truth-mask index ranked plain / with the calibration; defaults = dedupe 0.5, min 1.5
cells, max 0.9 of the image, calibration 1.0 on the generic bank, objectness 0.03:

| embedder | ceiling plain / calibrated | proposals plain | proposals defaults | / ceiling | seed 90418 |
|---|---:|---:|---:|---:|---:|
| maskinversion | 20.3 / 29.5 | 1.1 | 23.2 | 0.79 | 0.76 |
| alphaclip | 87.1 / 89.1 | 51.4 | 75.9 | 0.85 | 0.86 |
| masked-crop | 90.4 / 91.8 | 52.9 | 70.3 | 0.77 | 0.76 |
| crop | 47.2 / 65.9 | 12.4 | 52.5 | 0.80 | – |
| ipclip | 30.2 / 56.5 | 10.4 | 42.0 | 0.74 | 0.81 |
| global | 10.0 / 16.5 | 2.8 | 12.6 | 0.76 | – |

Leaving one switch out of the defaults (mAP, same order of embedders): without calibration
4.0 / 74.4 / 71.2 / 35.5 / 21.0 / 7.1; without objectness 17.5 / 73.4 / 59.1 / 34.5 / 31.7 /
9.6; without the area priors 21.3 / 74.0 / 55.7 / 39.1 / 33.5 / 7.9; without dedupe no change
(``AutomaticProposals`` already drops overlaps above IoU 0.5). With the proposer's own NMS off
(``--proposal-dedupe 1.0``: 5,000 regions, 88.9% of objects covered) dedupe is the decisive
switch: alphaclip 29.8 without it, 70.5 with the defaults; masked-crop 36.8 / 65.0. The
``queries`` bank (the class names themselves, CSLS's choice) is a little better than the
generic one (maskinversion 23.6, alphaclip 81.8, masked-crop 77.6, ipclip 44.1). On coco-tiny
val2017 (80 images) every number is at chance (ceilings 2-4 mAP): the reference model only
knows the world's 64 classes, so real photos need real CLIP weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from regionsearch.backbone import Backbone  # noqa: E402
from regionsearch.cli.errors import CliError  # noqa: E402
from regionsearch.cli.options import parse_key_values  # noqa: E402
from regionsearch.embedders import get_embedder  # noqa: E402
from regionsearch.eval.datasets import RegionDataset  # noqa: E402
from regionsearch.eval.runner import TextCache  # noqa: E402
from regionsearch.eval.search_collection import collect, embed_regions  # noqa: E402
from regionsearch.eval.search_task import (  # noqa: E402
    bank_vectors,
    ceiling_options,
    query_texts,
    score_queries,
)
from regionsearch.eval.world_split import heldout_world  # noqa: E402
from regionsearch.masks import AutomaticProposals  # noqa: E402
from regionsearch.search.postprocess import (  # noqa: E402
    ResultOptions,
    hubness_direction,
    model_cell_fraction,
    results_for,
)

SWITCHES: dict[str, tuple[str, ...]] = {
    "dedupe": ("dedupe_iou",),
    "priors": ("min_cells", "max_area"),
    "calibration": ("calibration",),
    "objectness": ("objectness",),
    "open-set": ("open_set",),
    "superset": ("superset_margin",),
    "repetition": ("repetition",),
}


def settings(
    defaults: ResultOptions, tries: dict[str, dict[str, Any]] | None = None
) -> dict[str, ResultOptions]:
    """plain, each switch alone, all on (the embedder's product defaults), all on but one, and
    the defaults with each of ``tries`` on top. A switch the defaults leave off is skipped."""
    plain = ResultOptions.plain()

    def with_fields(base: ResultOptions, source: ResultOptions, names: tuple[str, ...]):
        return dataclasses.replace(base, **{n: getattr(source, n) for n in names})

    active = {s: f for s, f in SWITCHES.items() if with_fields(defaults, plain, f) != defaults}
    out = {"plain": plain}
    out.update({f"only {s}": with_fields(plain, defaults, f) for s, f in active.items()})
    out["all (defaults)"] = defaults
    out.update({f"all but {s}": with_fields(defaults, plain, f) for s, f in active.items()})
    for label, changes in (tries or {}).items():
        out[f"defaults + {label}"] = dataclasses.replace(defaults, **changes)
    return out


def parse_try(spec: str) -> dict[str, Any]:
    """``"open_set=1,calibration=0.5"`` -> ``{"open_set": 1, "calibration": 0.5}`` (``none``
    -> ``None``); a key that is no field of ``ResultOptions`` is refused by name."""
    try:
        changes = parse_key_values(spec.split(","), "--try")
    except CliError as error:
        raise SystemExit(str(error)) from None
    fields = {f.name for f in dataclasses.fields(ResultOptions)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise SystemExit(f"--try {spec!r}: not a result switch: {', '.join(unknown)}")
    return {k: None if v == "none" else v for k, v in changes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="held-out world seed")
    parser.add_argument("--world", type=Path, default=None, help="world folder (else held out)")
    parser.add_argument("--images", type=Path, default=None, help="COCO-format image folder")
    parser.add_argument("--annotations", type=Path, default=None, help="COCO instances JSON")
    parser.add_argument("--limit", type=int, default=None, help="first N images (COCO)")
    parser.add_argument(
        "--embedders", nargs="+", default=["maskinversion", "alphaclip", "masked-crop", "global"]
    )
    parser.add_argument("--model", default="reference")
    parser.add_argument("--max-regions", type=int, default=50, help="proposals per image")
    parser.add_argument(
        "--proposal-dedupe",
        type=float,
        default=None,
        help="AutomaticProposals' own iou_dedupe (1.0: keep overlapping proposals)",
    )
    parser.add_argument("--bank", default="generic", choices=["generic", "queries"])
    parser.add_argument(
        "--family", default=None, help="world v2 family of the generated split (train, heldout)"
    )
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="KEY=V[,KEY=V]",
        help="also rank with the embedder's defaults plus these switches (repeatable)",
    )
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tries = {spec: parse_try(spec) for spec in args.tries}

    if args.images is not None:
        dataset = RegionDataset(args.images, args.annotations, limit=args.limit)
    else:
        seed = {"seed": args.seed} if args.seed is not None else {}
        world = args.world or heldout_world(args.scenes, family=args.family, **seed)
        dataset = RegionDataset.from_world(world)
    backbone = Backbone.load(args.model)
    extra = {} if args.proposal_dedupe is None else {"iou_dedupe": args.proposal_dedupe}
    collection = collect(dataset, AutomaticProposals(max_regions=args.max_regions, **extra))
    cache = TextCache(backbone)
    texts = query_texts(collection, backbone, cache)
    banks = {b: bank_vectors(backbone, b, collection, cache) for b in ("generic", "queries")}
    direction = {b: hubness_direction(vectors) for b, vectors in banks.items()}
    cell = model_cell_fraction(backbone)

    rows: list[dict[str, Any]] = []
    for name in args.embedders:
        embedder = get_embedder(name, backbone)
        grid = settings(results_for(name), tries)
        tick = time.perf_counter()
        vectors = {s: embed_regions(embedder, collection, s) for s in collection.sources}
        seconds = time.perf_counter() - tick
        ceilings: dict[tuple[str, ResultOptions], dict[str, Any]] = {}
        for bank in dict.fromkeys([args.bank, "queries"]):
            for label, options in grid.items():
                if bank != args.bank and label not in ("only calibration", "all (defaults)"):
                    continue
                key = (bank, ceiling_options(options))  # most settings share a ceiling
                if key not in ceilings:
                    ceilings[key] = score_queries(
                        collection, "ground-truth masks", vectors["ground-truth masks"], texts,
                        key[1], cell, direction[bank], args.iou, banks[bank],
                    )  # fmt: skip
                gt = ceilings[key]
                got = score_queries(
                    collection, "proposals", vectors["proposals"], texts, options, cell,
                    direction[bank], args.iou, banks[bank],
                )  # fmt: skip
                rows.append(
                    {
                        "embedder": name,
                        "setting": label,
                        "bank": bank,
                        **{f"proposals {k}": v for k, v in got.items()},
                        "ceiling mAP": gt["mAP"],
                        "ratio": got["mAP"] / gt["mAP"] if gt["mAP"] else float("nan"),
                        "embed_seconds": round(seconds, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)

    proposals = collection.sources["proposals"]
    print(
        f"\n{collection.name}: {len(collection.images)} images, "
        f"{sum(len(x) for x in collection.labels)} objects, {len(collection.queries)} class "
        f"queries; {proposals.size} proposals ({collection.mask_source}, "
        f"{collection.proposal_seconds:.1f} s), {100 * proposals.covered(args.iou):.1f}% of the "
        f"objects covered at IoU >= {args.iou}; defaults per embedder: "
        f"{ {n: results_for(n).describe() for n in args.embedders} }\n"
    )
    print("| embedder | setting | bank | mAP | P@10 | top-1 | ceiling mAP | mAP / ceiling |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['embedder']} | {r['setting']} | {r['bank']} "
            f"| {100 * r['proposals mAP']:.1f} | {100 * r['proposals P@10']:.1f} "
            f"| {100 * r['proposals top-1']:.1f} | {100 * r['ceiling mAP']:.1f} "
            f"| {r['ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
