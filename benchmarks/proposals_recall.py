"""How well does a region source cover COCO objects?

For every non-crowd ground-truth instance we take its best mask IoU with any region of its
image, then report recall at IoU >= 0.5, average best overlap (ABO), both overall and per COCO
size bucket (small < 32², medium < 96², large, by the annotation's ``area``), plus regions
per image and median seconds per image (the source's own time, JPEG decode excluded).

Any source can be measured (``--source``): the classical ``AutomaticProposals`` (default),
Segment Anything, SAM 2, or a COCO file of masks made elsewhere (a results list
``[{"image_id", "segmentation", "score"}, ...]``, best score first per image, or an
instances file). Every source ranks its regions best first, so regions are produced once at the
largest ``--max-regions`` and each smaller budget is that list's prefix (s/img is that one
run)::

    python benchmarks/proposals_recall.py --split val2017 --json runs/proposals_val.json
    python benchmarks/proposals_recall.py --source sam2 --checkpoint sam2.1_hiera_large.pt
    python benchmarks/proposals_recall.py --source sam --checkpoint sam_vit_h_4b8939.pth \
        --sam-model vit_h
    python benchmarks/proposals_recall.py --source coco --coco-file my_masks.json

``--save-results FILE`` writes the regions of any source as a COCO results file (full-image
RLEs with scores), so masks generated on a GPU machine can be scored anywhere, and the same
table is reproduced by ``--source coco --coco-file FILE``.

Classical ranking: tune on train2017, report val2017. ``--fit-score`` refits the
candidate-ranking weights of ``AutomaticProposals`` (a logistic regression, "does this
candidate reach IoU >= 0.5 with an object?", solved here with numpy) on the chosen split and
prints them for pasting into ``regionsearch/masks/proposals.py``::

    python benchmarks/proposals_recall.py --split train2017 --fit-score

``--fit-world DIR`` adds the candidates of a world split (``regionsearch world generate``; the
``coco+world`` fit used scenes 31-90 of the v2 *train* family, seed 90417, never the held-out
family) as ``--fit-world-share`` of the rows (world rows drawn with replacement, seed 0)::

    python benchmarks/proposals_recall.py --split train2017 --fit-score \
        --fit-world runs/evals/worlds/heldout-seed90417-n500-obj3-6-s224-v2-train \
        --fit-world-scenes 30 90 --fit-world-share 0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from regionsearch.masks import (  # noqa: E402
    AutomaticProposals,
    CocoAnnotationSource,
    MaskSource,
    RegionProposal,
    Sam2Proposals,
    SamProposals,
    as_rgb,
    from_polygons,
    iou_matrix,
)
from regionsearch.masks import decode as decode_rle  # noqa: E402
from regionsearch.masks import proposals as _proposals  # noqa: E402  (tuning hooks)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "coco-tiny"
SIZES = ("small", "medium", "large")


def size_bucket(area: float) -> str:
    """COCO's size buckets (areas in original-image pixels)."""
    if area < 32**2:
        return "small"
    return "medium" if area < 96**2 else "large"


class CocoResultsFile:
    """Regions from a COCO results file: ``[{"image_id", "segmentation", "score"}, ...]``.

    Class-agnostic; per image, best score first (file order among equal scores). Image sizes
    come from the ground truth, so polygons can be rasterised.
    """

    def __init__(self, path: Path, gt: CocoAnnotationSource) -> None:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and "image_id" in r and "segmentation" in r for r in records
        ):
            raise ValueError(f"{path}: expected a list of {{image_id, segmentation, score}}")
        self.gt = gt
        self._by_image: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            self._by_image.setdefault(int(r["image_id"]), []).append(r)
        for regions in self._by_image.values():
            regions.sort(key=lambda r: -float(r.get("score", 1.0)))

    def masks_for(self, image_path: Path, image: np.ndarray) -> list[RegionProposal]:
        height, width = image.shape[:2]
        records = self._by_image.get(self.gt.image_id(image_path.name), [])
        return [
            RegionProposal(
                decode_rle(from_polygons(r["segmentation"], height, width)),
                source="coco",
                score=float(r.get("score", 1.0)),
            )
            for r in records
        ]


def evaluate(
    source: MaskSource,
    budgets: list[int],
    images: list[tuple[Path, int]],
    gt: CocoAnnotationSource,
    gt_area: dict[int, float],
    saved: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per region budget: coverage of all GT instances by ``source`` on ``images``.

    The source runs once per image; a budget of k keeps its first k regions. With ``saved``,
    every region is appended to it as a COCO result.
    """
    best: dict[int, list[tuple[str, float]]] = {k: [] for k in budgets}
    counts: dict[int, list[int]] = {k: [] for k in budgets}
    seconds: list[float] = []
    for path, image_id in images:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        start = time.perf_counter()
        proposals = source.masks_for(path, image)
        seconds.append(time.perf_counter() - start)
        if saved is not None:
            saved.extend(
                {"image_id": image_id, "segmentation": p.to_rle(), "score": p.score}
                for p in proposals
            )
        proposals = proposals[: max(budgets)]
        for k in budgets:
            counts[k].append(min(k, len(proposals)))
        truths = gt.masks_for_id(image_id)
        if not truths:
            continue
        ious = iou_matrix([p.mask for p in proposals], [t.mask for t in truths])
        for j, t in enumerate(truths):
            assert t.annotation_id is not None
            bucket = size_bucket(gt_area[t.annotation_id])
            for k in budgets:
                column = ious[:k, j]
                best[k].append((bucket, float(column.max()) if column.size else 0.0))

    def stats(values: list[float]) -> tuple[float, float, int]:
        arr = np.asarray(values)
        if arr.size == 0:
            return float("nan"), float("nan"), 0
        return float((arr >= 0.5).mean()), float(arr.mean()), int(arr.size)

    rows = []
    for k in budgets:
        row: dict[str, Any] = {"max_regions": k}
        row["recall@0.5"], row["abo"], row["instances"] = stats([v for _, v in best[k]])
        for size in SIZES:
            r, a, n = stats([v for s, v in best[k] if s == size])
            row[f"recall@0.5_{size}"], row[f"abo_{size}"], row[f"instances_{size}"] = r, a, n
        row["proposals_per_image"] = float(np.mean(counts[k]))
        row["seconds_per_image_median"] = float(statistics.median(seconds))
        row["images"] = len(images)
        rows.append(row)
    return rows


def candidate_table(
    proposer: AutomaticProposals, images: list[tuple[Path, int]], gt: CocoAnnotationSource
) -> tuple[np.ndarray, np.ndarray]:
    """Ranking features of every candidate and its best IoU with a GT object.

    IoU is computed at the working resolution from per-segment overlaps (exact there), which is
    what ranking sees; ground truth is resized with nearest neighbour.
    """
    features, best = [], []
    for path, image_id in images:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        small = _proposals._shrink(as_rgb(image), proposer.work_size)
        graphs, pools = proposer._pools(small)
        h, w = small.shape[:2]
        truths = gt.masks_for_id(image_id)
        if truths:
            height, width = image.shape[:2]
            rows = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.intp), height - 1)
            cols = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.intp), width - 1)
            small_gt = np.stack([t.mask[rows[:, None], cols[None, :]].ravel() for t in truths])
        for graph, pool in zip(graphs, pools, strict=True):
            features.append(_proposals._score_features(pool.feats, h * w))
            if not truths:
                best.append(np.zeros(len(pool.member)))
                continue
            n = len(graph.area)
            overlap = np.stack(
                [np.bincount(graph.labels.ravel(), weights=g, minlength=n) for g in small_gt], 1
            )
            member = pool.member.astype(np.float64)
            inter = member @ overlap
            union = (member @ graph.area)[:, None] + small_gt.sum(1)[None, :] - inter
            best.append((inter / np.maximum(union, 1.0)).max(1))
    return np.concatenate(features), np.concatenate(best)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method on standardised features.

    Returns ``(weights, bias)`` for the *raw* (unstandardised) features.
    """
    mean, std = x.mean(0), x.std(0) + 1e-12
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0  # intercept not penalised
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = w[:-1] / std
    return weights, float(w[-1] - (weights * mean).sum())


def with_world_rows(
    x: np.ndarray, best: np.ndarray, args: argparse.Namespace, proposer: AutomaticProposals
) -> tuple[np.ndarray, np.ndarray]:
    """COCO candidate rows plus world ones making up ``--fit-world-share`` of all rows."""
    if not 0.0 < args.fit_world_share < 1.0:
        raise SystemExit("error: --fit-world-share must be in (0, 1)")
    world_gt = CocoAnnotationSource(args.fit_world / "instances.json", include_crowd=False)
    first, last = args.fit_world_scenes
    scenes = sorted(
        (args.fit_world / "images" / name, world_gt.image_id(name)) for name in world_gt.file_names
    )[first:last]
    xw, bw = candidate_table(proposer, scenes, world_gt)
    n = int(args.fit_world_share / (1.0 - args.fit_world_share) * len(x))
    pick = np.random.default_rng(0).choice(len(xw), n, replace=n > len(xw))
    print(f"{len(xw)} world candidates from {len(scenes)} scenes; {n} rows drawn")
    return np.vstack([x, xw[pick]]), np.concatenate([best, bw[pick]])


def markdown(rows: list[dict[str, Any]]) -> str:
    """The result table as GitHub markdown."""
    head = (
        "| max_regions | proposals/img | R@0.5 | R@0.5 S | R@0.5 M | R@0.5 L "
        "| ABO | ABO S | ABO M | ABO L | s/img (median) |"
    )
    lines = [head, "|" + "---:|" * 11]
    for r in rows:
        cells = [
            str(r["max_regions"]),
            f"{r['proposals_per_image']:.1f}",
            f"{r['recall@0.5']:.3f}",
            *(f"{r[f'recall@0.5_{s}']:.3f}" for s in SIZES),
            f"{r['abo']:.3f}",
            *(f"{r[f'abo_{s}']:.3f}" for s in SIZES),
            f"{r['seconds_per_image_median']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_source(
    args: argparse.Namespace, gt: CocoAnnotationSource, overrides: dict[str, Any]
) -> tuple[MaskSource, str]:
    """The region source named by ``--source`` and a one-line description of it."""
    budget = max(args.max_regions)
    generator = {
        k: v
        for k, v in {
            "points_per_side": args.points_per_side,
            "points_per_batch": args.points_per_batch,
            "pred_iou_thresh": args.pred_iou_thresh,
            "stability_score_thresh": args.stability_score_thresh,
        }.items()
        if v is not None
    }
    if args.source == "classical":
        source = AutomaticProposals(max_regions=budget, **overrides)
        return source, repr(source).replace(f"max_regions={budget}", "max_regions=<row>")
    if args.source in ("sam", "sam2") and args.checkpoint is None:
        raise SystemExit(f"error: --source {args.source} needs --checkpoint FILE")
    if args.source == "sam":
        sam = SamProposals(
            args.checkpoint, args.sam_model, args.device, max_regions=budget, **generator
        )
        return sam, f"SAM {args.sam_model} {args.checkpoint.name} {generator or 'defaults'}"
    if args.source == "sam2":
        sam2 = Sam2Proposals(
            args.checkpoint, args.sam2_config, args.device, max_regions=budget, **generator
        )
        return sam2, f"SAM 2 {args.checkpoint.name} ({sam2.config.name}) {generator or ''}"
    if args.coco_file is None:
        raise SystemExit("error: --source coco needs --coco-file FILE")
    with args.coco_file.open(encoding="utf-8") as f:
        is_results = isinstance(json.load(f), list)
    if is_results:
        return CocoResultsFile(args.coco_file, gt), f"COCO results {args.coco_file}"
    return CocoAnnotationSource(args.coco_file), f"COCO instances {args.coco_file}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="coco-tiny folder")
    parser.add_argument("--split", default="val2017", choices=["train2017", "val2017"])
    parser.add_argument("--max-regions", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument(
        "--source", default="classical", choices=["classical", "sam", "sam2", "coco"]
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="SAM / SAM 2 weights")
    parser.add_argument("--sam-model", default="vit_h", help="SAM model type (vit_b/l/h)")
    parser.add_argument("--sam2-config", default=None, help="SAM 2 config (default: by name)")
    parser.add_argument("--device", default="cpu", help="SAM / SAM 2 device (cuda, cpu)")
    parser.add_argument("--points-per-side", type=int, default=None)
    parser.add_argument("--points-per-batch", type=int, default=None)
    parser.add_argument("--pred-iou-thresh", type=float, default=None)
    parser.add_argument("--stability-score-thresh", type=float, default=None)
    parser.add_argument("--coco-file", type=Path, default=None, help="COCO masks (--source coco)")
    parser.add_argument(
        "--save-results", type=Path, default=None, help="write all regions as COCO results"
    )
    # Overrides of the classical source, for tuning only; the defaults are its own.
    parser.add_argument("--min-area", type=float, default=None)
    parser.add_argument("--iou-dedupe", type=float, default=None)
    parser.add_argument("--scales", type=float, nargs="+", default=None)
    parser.add_argument("--work-size", type=int, default=None)
    parser.add_argument("--sigma", type=float, default=None)
    parser.add_argument("--objectness", default=None, help="candidate ranking fit (coco, ...)")
    parser.add_argument(
        "--fit-score", action="store_true", help="refit the ranking weights (use train2017)"
    )
    parser.add_argument("--fit-world", type=Path, default=None, help="world split to fit on too")
    parser.add_argument("--fit-world-scenes", type=int, nargs=2, default=(30, 90))
    parser.add_argument("--fit-world-share", type=float, default=0.1)
    args = parser.parse_args(argv)
    if min(args.max_regions) < 1:
        parser.error("--max-regions must be >= 1")

    ann_file = args.data / "annotations" / f"instances_{args.split}.json"
    image_dir = args.data / args.split
    if not ann_file.is_file() or not image_dir.is_dir():
        parser.error(f"coco-tiny not found under {args.data} (need {ann_file} and {image_dir})")
    gt = CocoAnnotationSource(ann_file, include_crowd=False)
    with ann_file.open() as f:
        gt_area = {int(a["id"]): float(a["area"]) for a in json.load(f)["annotations"]}
    images = sorted((image_dir / name, gt.image_id(name)) for name in gt.file_names)
    images = [(p, i) for p, i in images if p.is_file()][: args.limit]

    overrides = {
        k: v
        for k, v in {
            "min_area": args.min_area,
            "iou_dedupe": args.iou_dedupe,
            "scales": args.scales,
            "work_size": args.work_size,
            "sigma": args.sigma,
            "objectness": args.objectness,
        }.items()
        if v is not None
    }
    if overrides and args.source != "classical":
        parser.error(f"{sorted(overrides)} tune the classical source only")
    if args.fit_score:
        if args.source != "classical":
            parser.error("--fit-score refits the classical source only")
        x, best = candidate_table(AutomaticProposals(**overrides), images, gt)
        if args.fit_world is not None:
            x, best = with_world_rows(x, best, args, AutomaticProposals(**overrides))
        weights, bias = fit_logistic(x, (best >= 0.5).astype(np.float64))
        print(f"{len(x)} candidates, {int((best >= 0.5).sum())} positives")
        print(f"_SCORE_BIAS = {bias:.6g}")
        print("_SCORE_WEIGHTS = np.array([")
        for name, value in zip(_proposals._SCORE_FEATURES, weights, strict=True):
            print(f"    {value:.6g},  # {name}")
        print("])")
        return 0

    try:
        source, description = build_source(args, gt, overrides)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    budgets = sorted(set(args.max_regions))
    saved: list[dict[str, Any]] | None = [] if args.save_results else None
    rows = evaluate(source, budgets, images, gt, gt_area, saved)
    for row in rows:
        row.update(split=args.split, source=args.source, params=description)

    print(f"{args.split}: {len(images)} images, {rows[0]['instances']} non-crowd instances")
    print(f"{description}  (max_regions: see each row)\n")
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    if args.save_results and saved is not None:
        args.save_results.parent.mkdir(parents=True, exist_ok=True)
        args.save_results.write_text(json.dumps(saved))
        print(f"\n{len(saved)} regions written to {args.save_results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
