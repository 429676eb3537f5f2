"""Speed and memory of the region embedders: MaskInversion naive vs decomposed, and a
forward-only embedder for scale.

Each configuration runs in its own process so that its peak memory is its own. Times are the
median over ``--repeats`` after one warm-up; ``forward_passes`` expresses the cost of all M masks
in units of one plain forward pass of the same image at the same resolution, measured in the same
process — a figure that transfers across machines better than seconds.

    python benchmarks/embedders_speed.py                       # the full grid (long on CPU)
    python benchmarks/embedders_speed.py --resolutions 224 --masks 1 100 --repeats 1
    python benchmarks/embedders_speed.py --json speed.json     # rows for the README table

Random weights are fine here: timing does not depend on what the weights are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe as describe_machine

METHODS = ("naive", "decomposed", "crop")
ROW_KEYS = (
    "resolution",
    "masks",
    "method",
    "seconds_per_image",
    "seconds_per_mask",
    "forward_passes",
    "peak_mb",
)


def estimated_naive_gb(masks: int, resolution: int, patch: int = 16, heads: int = 12) -> float:
    """Rough memory of the naive method: ~6 live (M, heads, n, n) float32 tensors."""
    tokens = (resolution // patch) ** 2 + 1
    return masks * heads * tokens**2 * 4 * 6 / 1e9


# ---------------------------------------------------------------------------- child process
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def run_child(args: argparse.Namespace) -> dict:
    """Time one (resolution, masks, method) configuration in this process."""
    import numpy as np
    import torch

    from regionsearch.backbone import Backbone, masks_to_tensor
    from regionsearch.embedders import get_embedder
    from regionsearch.embedders.maskinversion import MaskInversion

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = Backbone.load(args.model, device=device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    masks = np.zeros((args.masks, 480, 640), dtype=bool)
    for m in range(args.masks):
        y, x = rng.integers(0, 400), rng.integers(0, 560)
        h, w = rng.integers(40, 480 - y + 1), rng.integers(40, 640 - x + 1)
        masks[m, y : y + h, x : x + w] = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    pixels = backbone.preprocess(image, args.resolution)[None]
    timed(lambda: backbone.encode_images(pixels))
    forward = statistics.median(
        timed(lambda: backbone.encode_images(pixels)) for _ in range(max(3, args.repeats))
    )

    if args.method in ("naive", "decomposed"):
        embedder = MaskInversion(
            backbone, resolution=args.resolution, method=args.method, steps=args.steps
        )
        valid = masks_to_tensor(masks, image.shape[:2])

        def work() -> None:
            embedder.invert(image, valid)

        embedder.invert(image, valid[:1])  # warm-up on one mask
    else:
        embedder = get_embedder(args.method, backbone, resolution=args.resolution)

        def work() -> None:
            embedder.embed(image, masks)

        embedder.embed(image, masks[:1])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _rss_mb("VmRSS")
    seconds = [timed(work) for _ in range(args.repeats)]
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mb("VmHWM") - base
    per_image = statistics.median(seconds)
    return {
        "resolution": args.resolution,
        "masks": args.masks,
        "method": args.method,
        "seconds_per_image": round(per_image, 4),
        "seconds_per_mask": round(per_image / args.masks, 4),
        "forward_passes": round(per_image / forward, 2),
        "peak_mb": round(peak, 1),
        "forward_seconds": round(forward, 4),
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- parent
def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| resolution | masks | method | s / image | s / mask | forward passes | peak MB | speed-up vs naive |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    naive = {
        (r["resolution"], r["masks"]): r
        for r in rows
        if r["method"] == "naive" and "skipped" not in r
    }
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['resolution']} | {r['masks']} | {r['method']} | — | — | — | — | {r['skipped']} |"
            )
            continue
        base = naive.get((r["resolution"], r["masks"]))
        speedup = f"{base['seconds_per_image'] / r['seconds_per_image']:.2f}x" if base else ""
        lines.append(
            f"| {r['resolution']} | {r['masks']} | {r['method']} | {r['seconds_per_image']:.3f} | "
            f"{r['seconds_per_mask']:.4f} | {r['forward_passes']:.1f} | {r['peak_mb']:.0f} | {speedup} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 5, 10, 50, 100])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=10, help="MaskInversion steps (memory does not depend on it)"
    )
    parser.add_argument("--model", default="ViT-B-16", help="architecture (random weights)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=12.0,
        help="skip naive runs estimated to need more than this",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        args.masks = args.masks[0]
        print(json.dumps(run_child(args)))
        return

    print(f"machine: {describe_machine(args.device)}; model {args.model} (random weights)")
    rows: list[dict] = []
    for resolution in args.resolutions:
        for masks in args.masks:
            for method in args.methods:
                estimate = estimated_naive_gb(masks, resolution)
                if method == "naive" and estimate > args.memory_limit_gb:
                    rows.append(
                        {
                            "resolution": resolution,
                            "masks": masks,
                            "method": method,
                            "skipped": f"skipped: ~{estimate:.0f} GB > --memory-limit-gb",
                        }
                    )
                    continue
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--resolution",
                    str(resolution),
                    "--masks",
                    str(masks),
                    "--method",
                    method,
                    "--repeats",
                    str(args.repeats),
                    "--steps",
                    str(args.steps),
                    "--model",
                    args.model,
                    "--device",
                    args.device,
                    "--threads",
                    str(args.threads),
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-1:] or ["?"]
                    rows.append(
                        {
                            "resolution": resolution,
                            "masks": masks,
                            "method": method,
                            "skipped": f"failed: {tail[0][:80]}",
                        }
                    )
                else:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                print(json.dumps(row), flush=True)
    print()
    print(markdown_table(rows))
    if args.json:
        payload = [
            {k: r.get(k) for k in (*ROW_KEYS, "skipped", "forward_seconds", "device")} for r in rows
        ]
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
