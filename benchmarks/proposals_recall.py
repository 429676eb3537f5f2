"""How well do the default automatic proposals cover COCO objects?

For every non-crowd ground-truth instance we take its best mask IoU with any proposal of its
image, then report recall at IoU >= 0.5, average best overlap (ABO), both overall and per COCO
size bucket (small < 32², medium < 96², large, by the annotation's ``area``), plus proposals
per image and median seconds per image (proposal generation only, JPEG decode excluded).

Tune on train2017, report val2017::

    python benchmarks/proposals_recall.py --split train2017
    python benchmarks/proposals_recall.py --split val2017 --json runs/proposals_val.json

``--fit-score`` instead refits the candidate-ranking weights of ``AutomaticProposals`` (a
logistic regression, "does this candidate reach IoU >= 0.5 with an object?", solved here with
numpy) on the chosen split and prints them for pasting into ``regionsearch/masks/proposals.py``.
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

from regionsearch.masks import AutomaticProposals, CocoAnnotationSource, iou_matrix  # noqa: E402
from regionsearch.masks import proposals as _proposals  # noqa: E402  (tuning hooks)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "coco-tiny"
SIZES = ("small", "medium", "large")


def size_bucket(area: float) -> str:
    """COCO's size buckets (areas in original-image pixels)."""
    if area < 32**2:
        return "small"
    return "medium" if area < 96**2 else "large"


def evaluate(
    proposer: AutomaticProposals,
    images: list[tuple[Path, int]],
    gt: CocoAnnotationSource,
    gt_area: dict[int, float],
) -> dict[str, Any]:
    """One row of the table: coverage of all GT instances by ``proposer`` on ``images``."""
    best: list[tuple[str, float]] = []
    counts: list[int] = []
    seconds: list[float] = []
    for path, image_id in images:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        start = time.perf_counter()
        proposals = proposer.masks_for(path, image)
        seconds.append(time.perf_counter() - start)
        counts.append(len(proposals))
        truths = gt.masks_for_id(image_id)
        if not truths:
            continue
        ious = iou_matrix([p.mask for p in proposals], [t.mask for t in truths])
        for t, column in zip(truths, ious.T, strict=True):
            assert t.annotation_id is not None
            best.append((size_bucket(gt_area[t.annotation_id]), float(column.max())))

    def stats(values: list[float]) -> tuple[float, float, int]:
        arr = np.asarray(values)
        if arr.size == 0:
            return float("nan"), float("nan"), 0
        return float((arr >= 0.5).mean()), float(arr.mean()), int(arr.size)

    row: dict[str, Any] = {"max_regions": proposer.max_regions}
    row["recall@0.5"], row["abo"], row["instances"] = stats([v for _, v in best])
    for size in SIZES:
        r, a, n = stats([v for s, v in best if s == size])
        row[f"recall@0.5_{size}"], row[f"abo_{size}"], row[f"instances_{size}"] = r, a, n
    row["proposals_per_image"] = float(np.mean(counts))
    row["seconds_per_image_median"] = float(statistics.median(seconds))
    row["images"] = len(images)
    return row


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
        small = _proposals._shrink(_proposals._as_rgb(image), proposer.work_size)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="coco-tiny folder")
    parser.add_argument("--split", default="val2017", choices=["train2017", "val2017"])
    parser.add_argument("--max-regions", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    # Overrides, for tuning only; the defaults are AutomaticProposals' own.
    parser.add_argument("--min-area", type=float, default=None)
    parser.add_argument("--iou-dedupe", type=float, default=None)
    parser.add_argument("--scales", type=float, nargs="+", default=None)
    parser.add_argument("--work-size", type=int, default=None)
    parser.add_argument("--sigma", type=float, default=None)
    parser.add_argument(
        "--fit-score", action="store_true", help="refit the ranking weights (use train2017)"
    )
    args = parser.parse_args(argv)

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
        }.items()
        if v is not None
    }
    if args.fit_score:
        x, best = candidate_table(AutomaticProposals(**overrides), images, gt)
        weights, bias = fit_logistic(x, (best >= 0.5).astype(np.float64))
        print(f"{len(x)} candidates, {int((best >= 0.5).sum())} positives")
        print(f"_SCORE_BIAS = {bias:.6g}")
        print("_SCORE_WEIGHTS = np.array([")
        for name, value in zip(_proposals._SCORE_FEATURES, weights, strict=True):
            print(f"    {value:.6g},  # {name}")
        print("])")
        return 0

    rows = []
    for max_regions in args.max_regions:
        proposer = AutomaticProposals(max_regions=max_regions, **overrides)
        row = evaluate(proposer, images, gt, gt_area)
        row.update(split=args.split, params=repr(proposer))
        rows.append(row)
        print(f"done max_regions={max_regions}", file=sys.stderr, flush=True)

    print(f"{args.split}: {len(images)} images, {rows[0]['instances']} non-crowd instances")
    print(f"{rows[0]['params']}  (max_regions: see each row)\n")
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
