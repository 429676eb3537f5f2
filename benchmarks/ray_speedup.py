"""``index --ray`` against the single-process run, and the per-image cost model behind N GPUs.

Two parts, on the same photos (default: the first ``--limit`` of ``../shared/data/coco-tiny/
val2017``; generated world scenes when that is absent), the bundled ``reference`` model, the
default MaskInversion embedder and automatic proposals:

1. **Throughput**: images/s of ``Indexer.run`` single-process (``--workers`` threads decoding
   and proposing ahead of the embedder, as ``regionsearch index`` does) and with a
   :class:`~regionsearch.indexer.distributed.RayMapper` of 1 and 2 CPU actors on one local Ray
   (started once; its start-up is reported apart). Each mode runs ``--repeats`` times into a
   fresh index; medians. "end to end" is the whole run (for Ray: actor start and model load
   in each actor included); "steady" counts from the first image back to the last.
2. **Cost model**: each stage timed alone in this process, one image at a time: decode,
   proposals, embedding (fitted as ``a + b * masks`` over the images, and ``b`` expressed in
   plain forward passes of the same model, a unit that transfers across machines), and the
   writer's SQL + vector commit per image. From these::

       CPU actors (each does it all):  images/s(N) = min(N / (prep + a + masks*b), 1 / write)
       GPU actors (prep as CPU tasks): images/s(N) = min(N / embed_gpu,
                                                         N * cpus_per_gpu / prep, 1 / write)
       prep = decode + proposals;  embed_gpu = (a + masks*b) / forward_cpu * forward_gpu

   with ``forward_gpu`` an ASSUMED GPU forward time (``--gpu-forward-ms``; this machine has no
   GPU) and ``--cpus-per-gpu`` the node's cores per GPU.

    nice -n 10 python benchmarks/ray_speedup.py --json benchmarks/results/ray_speedup.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe as describe_machine

REPO = Path(__file__).resolve().parents[1]
COCO_VAL = REPO.parent / "shared" / "data" / "coco-tiny" / "val2017"


class ArrivalTimes:
    """Wraps a mapper and notes when each image comes back (for the steady-state rate)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.times: list[float] = []

    def map(self, items: list, job: Any, report: Any) -> Iterator[tuple[Any, Any]]:
        for pair in self.inner.map(items, job, report):
            self.times.append(time.perf_counter())
            yield pair


def photos_folder(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """A folder of ``--limit`` photos: COCO val2017 when present, else world scenes."""
    folder = work / "photos"
    folder.mkdir()
    if args.images.is_dir():
        for path in sorted(args.images.glob("*.jpg"))[: args.limit]:
            shutil.copy2(path, folder / path.name)
        return folder, str(args.images)
    from regionsearch.eval.world.generate import generate_dataset

    generate_dataset(work / "world", n=args.limit, seed=3, size=320)
    for path in sorted((work / "world" / "images").iterdir()):
        shutil.copy2(path, folder / path.name)
    return folder, "world scenes (regionsearch world generate, 320 px)"


def one_run(photos: Path, work: Path, embedder: Any, source: Any, mapper: Any, args) -> dict:
    """One indexing run into a fresh index; its rates."""
    from regionsearch.indexer.pipeline import Indexer
    from regionsearch.store import RegionIndex

    location = Path(tempfile.mkdtemp(dir=work))
    backbone = embedder.backbone
    timer = ArrivalTimes(mapper) if mapper is not None else None
    with RegionIndex.create(
        location / "idx", model=backbone.name, embedder=embedder.name, dimension=backbone.embed_dim
    ) as index:
        report = Indexer(
            index,
            backbone,
            embedder,
            source,
            workers=args.workers,
            batch_images=8,
            progress=False,
            mapper=timer,
        ).run(photos)
    shutil.rmtree(location, ignore_errors=True)
    out = {
        "images": report.images_indexed,
        "regions": report.regions_indexed,
        "seconds": report.seconds,
        "images_per_s": report.images_per_s,
    }
    if timer is not None and len(timer.times) > 1:
        out["steady_images_per_s"] = (len(timer.times) - 1) / (timer.times[-1] - timer.times[0])
    else:  # the local path has no start-up: the model is loaded before the run
        out["steady_images_per_s"] = report.images_per_s
    return out


def start_ray(attempts: int) -> tuple[float, int]:
    """A local Ray of 2 CPUs; (seconds, attempts). Ray gives its node 30 s to come up, which a
    starved machine can miss (its Python agents import slowly): retried."""
    import ray

    started = time.perf_counter()
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
            return time.perf_counter() - started, attempt
        except Exception as exc:
            print(f"  ray.init attempt {attempt} failed: {exc}", flush=True)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def summarize(rows: list[dict]) -> dict:
    """Medians of one mode's runs."""
    return {
        "images": rows[0]["images"],
        "regions": rows[0]["regions"],
        "median_seconds": round(statistics.median(r["seconds"] for r in rows), 2),
        "median_images_per_s": round(statistics.median(r["images_per_s"] for r in rows), 3),
        "median_steady_images_per_s": round(
            statistics.median(r["steady_images_per_s"] for r in rows), 3
        ),
        "runs_images_per_s": [round(r["images_per_s"], 3) for r in rows],
    }


def throughput(photos: Path, work: Path, embedder: Any, source: Any, args) -> dict:
    """Medians per mode: single process, Ray with 1 and 2 CPU actors (modes interleaved
    within each repeat: contention drifts over time). Without Ray, the single-process runs
    alone, and why."""
    import ray

    from regionsearch.indexer.distributed import EmbedderSpec, RayMapper

    spec = EmbedderSpec.of(embedder, args.model)
    mappers = {"ray_1_actor": RayMapper(spec, actors=1), "ray_2_actors": RayMapper(spec, actors=2)}
    modes: dict[str, list[dict]] = {"single_process": [], **{m: [] for m in mappers}}
    summary: dict[str, Any] = {}
    try:
        summary["ray_init_seconds"], summary["ray_init_attempts"] = start_ray(
            args.ray_start_attempts
        )
    except Exception as exc:
        summary["ray_error"] = f"{type(exc).__name__}: {exc}"
        mappers = {}
    try:
        for repeat in range(args.repeats):
            for mode, mapper in (("single_process", None), *mappers.items()):
                row = one_run(photos, work, embedder, source, mapper, args)
                modes[mode].append(row)
                if args.json:  # a run stopped early keeps what it measured
                    partial = args.json.with_suffix(".partial.json")
                    partial.write_text(json.dumps({"runs": modes}, indent=2) + "\n")
                print(
                    f"  repeat {repeat + 1} {mode:<15} {row['images_per_s']:.3f} images/s "
                    f"(steady {row['steady_images_per_s']:.3f})",
                    flush=True,
                )
    finally:
        ray.shutdown()
    base = summary["single_process"] = summarize(modes["single_process"])
    for mode in mappers:
        row = summary[mode] = summarize(modes[mode])
        row["speedup_end_to_end"] = round(
            row["median_images_per_s"] / base["median_images_per_s"], 2
        )
        row["speedup_steady"] = round(
            row["median_steady_images_per_s"] / base["median_steady_images_per_s"], 2
        )
    return summary


def cost_model(photos: Path, work: Path, embedder: Any, source: Any) -> dict:
    """Each stage alone, one image at a time (see the module doc)."""
    import torch

    from regionsearch.image_io import decode_image
    from regionsearch.indexer.work import Failed, embed_prepared, prepare_image
    from regionsearch.store import RegionIndex

    backbone = embedder.backbone
    decode_s, proposal_s, embed_s, masks, forward_s = [], [], [], [], []
    ready = []
    for path in sorted(photos.iterdir()):
        t = time.perf_counter()
        decoded = decode_image(path)
        decode_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        source.masks_for(path, decoded.pixels)
        proposal_s.append(time.perf_counter() - t)
        prepared = prepare_image(path, path.name, source, None, True)
        if isinstance(prepared, Failed):
            continue
        with torch.no_grad():
            t = time.perf_counter()
            backbone.encode_images(
                backbone.preprocess(decoded.pixels, size=backbone.region_resolution)[None]
            )
            forward_s.append(time.perf_counter() - t)
        half = dataclasses.replace(
            prepared,
            regions=prepared.regions[: len(prepared.regions) // 2 or 1],
            masks=prepared.masks[: len(prepared.regions) // 2 or 1],
        )
        for part in (half, prepared):  # two mask counts per photo: a + b * masks is fitted
            embedded = embed_prepared(embedder, part, backbone.embed_dim)
            if isinstance(embedded, Failed):
                break
            embed_s.append(embedded.seconds)
            masks.append(len(embedded.vectors))
        else:
            ready.append((path.name, embedded))
    b, a = np.polyfit(np.array(masks, float), np.array(embed_s), 1)
    # the writer: rows then vectors, 8 images per transaction as the CLI, one checkpoint
    location = Path(tempfile.mkdtemp(dir=work))
    with RegionIndex.create(
        location / "idx", model=backbone.name, embedder=embedder.name, dimension=backbone.embed_dim
    ) as index:
        t = time.perf_counter()
        for start in range(0, len(ready), 8):
            chunk = ready[start : start + 8]
            records = index.upsert_images([{"path": name, **e.prepared.meta} for name, e in chunk])
            ids = {r.path: r.id for r in records}
            index.add_images_regions(
                [(ids[name], e.prepared.regions, e.vectors) for name, e in chunk]
            )
        index.checkpoint()
        write_s = (time.perf_counter() - t) / len(ready)
    shutil.rmtree(location, ignore_errors=True)
    forward = statistics.median(forward_s)
    return {
        "images": len(ready),
        "median_decode_seconds": round(statistics.median(decode_s), 4),
        "median_proposals_seconds": round(statistics.median(proposal_s), 4),
        "mean_masks_per_image": round(float(np.mean([len(e.vectors) for _, e in ready])), 2),
        "embed_seconds_fit": {"per_image": round(float(a), 4), "per_mask": round(float(b), 4)},
        "median_forward_seconds": round(forward, 4),
        "embed_per_mask_in_forward_passes": round(float(b) / forward, 2),
        "write_seconds_per_image": round(write_s, 4),
        "resolution": backbone.region_resolution,
        "torch_threads": torch.get_num_threads(),
    }


def predict(model: dict, gpu_forward_ms: float, cpus_per_gpu: int, counts: list[int]) -> dict:
    """images/s on N actors from the measured stages (see the module doc).

    CPU actors do everything in turn; GPU actors only embed, fed by decode + proposal tasks on
    ``cpus_per_gpu`` cores each, and the embedding is the measured cost in forward passes
    times an assumed GPU forward time. Both are capped by the one writer.
    """
    masks = model["mean_masks_per_image"]
    prep = model["median_decode_seconds"] + model["median_proposals_seconds"]
    fit = model["embed_seconds_fit"]
    forward = model["median_forward_seconds"]
    write_cap = 1 / model["write_seconds_per_image"]
    cpu_image = prep + fit["per_image"] + masks * fit["per_mask"]
    gpu_embed = (fit["per_image"] + masks * fit["per_mask"]) / forward * gpu_forward_ms / 1000
    out: dict[str, Any] = {
        "writer_cap_images_per_s": round(write_cap, 1),
        "cpu_actors": {"seconds_per_image_per_actor": round(cpu_image, 4), "images_per_s": {}},
        "gpu_actors": {
            "embed_seconds_per_image_per_gpu": round(gpu_embed, 4),
            "cpus_per_gpu": cpus_per_gpu,
            "images_per_s": {},
            "bound_by": {},
        },
    }
    for n in counts:
        out["cpu_actors"]["images_per_s"][str(n)] = round(min(n / cpu_image, write_cap), 2)
        rates = {
            "gpus": n / gpu_embed,
            "decode+proposals CPUs": n * cpus_per_gpu / prep,
            "writer": write_cap,
        }
        bound = min(rates, key=rates.__getitem__)
        out["gpu_actors"]["images_per_s"][str(n)] = round(rates[bound], 2)
        out["gpu_actors"]["bound_by"][str(n)] = bound
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=COCO_VAL)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--model", default="reference")
    parser.add_argument("--max-regions", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="Single-process prep threads.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--gpu-forward-ms",
        type=float,
        default=2.0,
        help="ASSUMED time of one forward pass of the model on one GPU (not measured here).",
    )
    parser.add_argument(
        "--cpus-per-gpu", type=int, default=8, help="Cores per GPU for decode + proposals."
    )
    parser.add_argument("--ray-start-attempts", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from regionsearch.backbone import load_backbone
    from regionsearch.embedders import get_embedder
    from regionsearch.masks import AutomaticProposals

    work = Path(tempfile.mkdtemp(prefix="regionsearch-ray-"))
    try:
        photos, described = photos_folder(args, work)
        embedder = get_embedder("maskinversion", load_backbone(args.model, device="cpu"))
        source = AutomaticProposals(max_regions=args.max_regions)
        print(f"{described}: {len(list(photos.iterdir()))} photos", flush=True)
        model = cost_model(photos, work, embedder, source)
        print(json.dumps(model, indent=2), flush=True)
        measured = throughput(photos, work, embedder, source, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "ray_speedup",
        "command": "nice -n 10 python benchmarks/ray_speedup.py " + " ".join(argv or sys.argv[1:]),
        "machine": describe_machine() + " (shared: other engineers' jobs and a training run "
        "compete for the 2 cores)",
        "photos": described,
        "model": args.model,
        "embedder": embedder.describe(),
        "max_regions": args.max_regions,
        "single_process_workers": args.workers,
        "repeats": args.repeats,
        "throughput": measured,
        "cost_model": model,
        "prediction": {
            "assumed_gpu_forward_ms": args.gpu_forward_ms,
            **predict(model, args.gpu_forward_ms, args.cpus_per_gpu, [1, 2, 4, 8, 16, 64]),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
