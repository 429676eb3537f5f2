"""Server CPU of one web-page search: ``GET /api/search?k=24`` plus the pictures the page loads.

Builds (or reuses, ``--index``) an index of the COCO photos in ``--photos`` with their annotated
masks and the fast ``global`` embedder (the picture cost depends on the photos, not on the
embedder), then, in one process through FastAPI's test client, times what the page asks:

- ``page``: the search, then one thumbnail per distinct photo of the results at the size the
  page asks on a 1x screen (``--photo-side``, 320) and on a 2x screen (640); the page draws
  each region's spotlight itself from the RLE in the search answer (``static/spotlight.js``);
- ``overlays_jpg`` / ``overlays_png``: the 24 server-rendered overlays at ``max_side=480``
  (what the page loaded before, and what API clients that do not draw may still ask).

CPU is the server's: the process's CPU time minus the client thread's own
(``time.thread_time`` in the main thread, where the test client runs), median over
``--repeats`` different queries. Each query starts with the server's picture cache empty
(``cold``, a first visit); ``warm`` repeats it with the cache as the query left it.

    python benchmarks/web_page_cost.py --json benchmarks/results/web_page_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def measure(index_dir: Path, repeats: int, k: int, max_side: int, photo_side: int) -> dict:
    from fastapi.testclient import TestClient

    from regionsearch.api import Settings, create_app

    app = create_app(Settings(index_dir=index_dir, read_only=True, device="cpu"))
    rows = []
    with TestClient(app) as client:
        pictures = app.state.regionsearch.pictures

        def server_ms(requests: list[tuple[str, dict]]) -> tuple[float, float]:
            """Server CPU (ms) of these GETs, and the bytes they returned (kB)."""
            cpu, own, size = time.process_time(), time.thread_time(), 0
            for url, params in requests:
                res = client.get(url, params=params)
                assert res.status_code == 200, res.text
                size += len(res.content)
            spent = (time.process_time() - cpu) - (time.thread_time() - own)
            return spent * 1000, size / 1024

        client.get("/api/search", params={"q": "warm up", "k": k})
        for query in (QUERIES * repeats)[:repeats]:
            row: dict = {"query": query}
            search = [("/api/search", {"q": query, "k": k})]
            row["search_cpu_ms"], _ = server_ms(search)
            hits = client.get(search[0][0], params=search[0][1]).json()["results"]
            images = list(dict.fromkeys(hit["image_id"] for hit in hits))
            row["photos"] = len(images)
            for side, label in ((photo_side, "1x"), (2 * photo_side, "2x")):
                thumbs = [(f"/api/images/{i}/thumbnail.jpg", {"size": side}) for i in images]
                for state in ("cold", "warm"):
                    if state == "cold":
                        pictures.clear()
                    cpu, kb = server_ms(thumbs)  # + the search (its text not yet cached)
                    row[f"page_{label}_{state}_cpu_ms"] = row["search_cpu_ms"] + cpu
                    row[f"photos_{label}_kb"] = kb
            for fmt in ("jpg", "png"):
                urls = [
                    (hit["overlay_url"].replace("overlay.jpg", f"overlay.{fmt}"),
                     {"max_side": max_side})
                    for hit in hits
                ]  # fmt: skip
                pictures.clear()
                row[f"overlays_{fmt}_cold_cpu_ms"], row[f"overlays_{fmt}_kb"] = server_ms(urls)
            rows.append(row)
    med = {
        key: round(float(np.median([r[key] for r in rows])), 1) for key in rows[0] if key != "query"
    }
    return {
        "k": k,
        "photo_side": photo_side,
        "overlay_max_side": max_side,
        "repeats": repeats,
        "median": med,
        "per_query": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="existing index folder")
    parser.add_argument("--photos", type=Path, default=COCO / "val2017")
    parser.add_argument(
        "--annotations", type=Path, default=COCO / "annotations" / "instances_val2017.json"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=24)
    parser.add_argument("--max-side", type=int, default=480, help="overlay size measured")
    parser.add_argument(
        "--photo-side", type=int, default=320, help="thumbnail size the page asks on a 1x screen"
    )
    parser.add_argument("--note", default="", help="e.g. what else ran on the machine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = args.index
        if index_dir is None:
            index_dir = Path(tmp) / "web-page-index"
            build(index_dir, args.photos, args.annotations)
        report = {
            "benchmark": "web_page_cost",
            "what": "server CPU of GET /api/search?k=24 + what the page loads (see docstring)",
            "machine": describe_machine(),
            "load_avg_1m_before": round(os.getloadavg()[0], 2),
            **measure(index_dir, args.repeats, args.k, args.max_side, args.photo_side),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "note": args.note,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
