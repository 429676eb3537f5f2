"""Server CPU of one web-page search: ``GET /api/search?k=24`` plus the 24 overlays it shows.

Builds (or reuses, ``--index``) an index of the COCO photos in ``--photos`` with their annotated
masks and the fast ``global`` embedder (the overlay cost depends on the photos, not on the
embedder), then, in one process through FastAPI's test client, times the search and the
overlay requests the page makes (``max_side=480``) as process CPU time (all threads), median
over ``--repeats`` different queries. Reports JPEG overlays (what the page loads) beside PNG.

    python benchmarks/web_page_cost.py --json benchmarks/results/web_page_cost.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe as describe_machine

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-tiny"
QUERIES = ["a dog", "a person", "a red car", "a plate of food", "a cat", "a kitchen", "a bus"]


def build(index_dir: Path, photos: Path, annotations: Path) -> None:
    cmd = [sys.executable, "-m", "regionsearch.cli", "index", str(photos), "--name",
           str(index_dir), "--annotations", str(annotations), "-e", "global", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True)


def measure(index_dir: Path, repeats: int, k: int, max_side: int) -> dict:
    from fastapi.testclient import TestClient

    from regionsearch.api import Settings, create_app

    app = create_app(Settings(index_dir=index_dir, read_only=True, device="cpu"))
    rows = []
    with TestClient(app) as client:
        client.get("/api/search", params={"q": "warm up", "k": k})
        for query in (QUERIES * repeats)[:repeats]:
            row = {"query": query}
            t = time.process_time()
            hits = client.get("/api/search", params={"q": query, "k": k}).json()["results"]
            row["search_cpu_ms"] = (time.process_time() - t) * 1000
            for fmt in ("jpg", "png"):
                t = time.process_time()
                size = 0
                for hit in hits:
                    url = hit["overlay_url"].replace("overlay.jpg", f"overlay.{fmt}")
                    res = client.get(url, params={"max_side": max_side})
                    assert res.status_code == 200, res.text
                    size += len(res.content)
                row[f"overlays_{fmt}_cpu_ms"] = (time.process_time() - t) * 1000
                row[f"overlays_{fmt}_kb"] = size / 1024
            rows.append(row)
    med = {
        key: round(float(np.median([r[key] for r in rows])), 1) for key in rows[0] if key != "query"
    }
    med["page_jpg_cpu_ms"] = round(med["search_cpu_ms"] + med["overlays_jpg_cpu_ms"], 1)
    med["page_png_cpu_ms"] = round(med["search_cpu_ms"] + med["overlays_png_cpu_ms"], 1)
    return {"k": k, "max_side": max_side, "repeats": repeats, "median": med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="existing index folder")
    parser.add_argument("--photos", type=Path, default=COCO / "val2017")
    parser.add_argument(
        "--annotations", type=Path, default=COCO / "annotations" / "instances_val2017.json"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=24)
    parser.add_argument("--max-side", type=int, default=480, help="overlay size the page asks")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = args.index
        if index_dir is None:
            index_dir = Path(tmp) / "web-page-index"
            build(index_dir, args.photos, args.annotations)
        report = {
            "benchmark": "web_page_cost",
            "what": "GET /api/search?k=24 + 24 x GET overlay, process CPU time (client included)",
            "machine": describe_machine(),
            **measure(index_dir, args.repeats, args.k, args.max_side),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
