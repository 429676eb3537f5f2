"""Indexing throughput: images/s, regions/s, time per image and per region, peak RSS, re-run cost.

Indexes a photo folder (default ``../shared/data/coco-tiny/val2017``) with a model (default the
bundled ``reference``) and the default automatic proposals into a temporary index, then runs
again on the unchanged folder and reports that second run's time as a percentage of the first
(target: < 5 %).

    python benchmarks/index_throughput.py [--images DIR] [--model reference] \
        [--embedder maskinversion] [--max-regions 50] [--limit N] [--workers 2] [--json out.json]

Timings are of ``Indexer.run`` (model loading excluded); "per image"/"per region" are medians
over images of the embedding time (``IndexReport.image_seconds``), the totals include decoding
and proposals overlapped by the worker pool.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "coco-tiny" / "val2017"


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / (1024 * 1024)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--model", default="reference")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--embedder", default="maskinversion")
    parser.add_argument("--embedder-option", "-E", action="append", default=[])
    parser.add_argument("--max-regions", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="Index only the first N images.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--processes", action="store_true", help="Process workers.")
    parser.add_argument("--batch-images", type=int, default=8)
    parser.add_argument("--allow-random", action="store_true", help="Accept random weights.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    from regionsearch.backbone import load_backbone
    from regionsearch.cli.options import parse_key_values
    from regionsearch.embedders import get_embedder
    from regionsearch.indexer.pipeline import Indexer
    from regionsearch.masks import AutomaticProposals
    from regionsearch.store import RegionIndex

    work = Path(tempfile.mkdtemp(prefix="regionsearch-bench-"))
    try:
        photos = args.images
        if args.limit:
            photos = work / "photos"
            photos.mkdir()
            files = sorted(p for p in args.images.rglob("*") if p.is_file())[: args.limit]
            for p in files:
                shutil.copy2(p, photos / p.name)
        t = time.perf_counter()
        backbone = load_backbone(args.model, args.pretrained, args.device, args.allow_random)
        load_s = time.perf_counter() - t
        embedder = get_embedder(
            args.embedder, backbone, **parse_key_values(args.embedder_option, "--embedder-option")
        )
        index = RegionIndex.create(
            work / "index",
            model=backbone.name,
            embedder=embedder.name,
            dimension=backbone.embed_dim,
        )
        with index:
            indexer = Indexer(
                index,
                backbone,
                embedder,
                AutomaticProposals(max_regions=args.max_regions),
                workers=args.workers,
                executor="process" if args.processes else "thread",
                batch_images=args.batch_images,
                progress=args.progress,
            )
            first = indexer.run(photos)
            second = indexer.run(photos)
            stats = index.stats()
        per_image = first.image_seconds
        per_region = [
            s / n for s, n in zip(first.image_seconds, first.image_regions, strict=True) if n
        ]
        result = {
            "images_dir": str(args.images),
            "model": backbone.name,
            "embedder": embedder.describe(),
            "device": str(backbone.device),
            "workers": args.workers,
            "executor": "process" if args.processes else "thread",
            "max_regions": args.max_regions,
            "model_load_seconds": round(load_s, 2),
            "images": first.images_indexed,
            "failed": first.images_failed,
            "regions": first.regions_indexed,
            "regions_per_image_mean": round(
                first.regions_indexed / max(first.images_indexed, 1), 2
            ),
            "seconds": round(first.seconds, 2),
            "images_per_s": round(first.images_per_s, 3),
            "regions_per_s": round(first.regions_per_s, 2),
            "embed_seconds": round(first.embed_seconds, 2),
            "prepare_seconds_summed": round(first.prepare_seconds, 2),
            "main_thread_wait_seconds": round(first.wait_seconds, 2),
            "median_embed_seconds_per_image": round(statistics.median(per_image), 4)
            if per_image
            else None,
            "median_embed_seconds_per_region": round(statistics.median(per_region), 5)
            if per_region
            else None,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "rerun_seconds": round(second.seconds, 3),
            "rerun_percent_of_first": round(100 * second.seconds / first.seconds, 2)
            if first.seconds
            else None,
            "rerun_embed_calls": second.embed_calls,
            "index_vectors": stats.vectors,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
