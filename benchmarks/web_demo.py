"""Screenshots of the web page over a real index, for the README.

Generates a small synthetic world (the only kind of photo the bundled reference model knows),
indexes it with the product's own command (automatic proposals, the chosen embedder), serves it
read-only on loopback and drives Debian's Chromium with Playwright: one text search, then one
image opened with a referring expression.

    python benchmarks/web_demo.py --embedder maskinversion --out benchmarks/results

Needs ``/usr/bin/chromium`` (``.ci/chromium.sh``) and the ``playwright`` package (dev extra).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.web_helpers import CHROMIUM, CHROMIUM_ARGS, serve_in_thread  # noqa: E402


def build_index(work: Path, scenes: int, seed: int, embedder: str) -> Path:
    """World images indexed by ``regionsearch index`` (the CLI, as a user runs it)."""
    from regionsearch.eval.world.generate import generate_dataset

    world = work / "world"
    generate_dataset(world, n=scenes, seed=seed)
    indexes = work / "indexes"
    command = [
        *(sys.executable, "-m", "regionsearch.cli", "index", str(world / "images")),
        *("--index-dir", str(indexes), "--name", "world", "--embedder", embedder),
        *("--max-regions", "12", "--no-progress"),
    ]
    subprocess.run(command, check=True)
    return indexes / "world"


def screenshots(url: str, query: str, expression: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url + "/")
            page.fill("#q", query)
            page.press("#q", "Enter")
            page.locator(".card").first.wait_for(timeout=30_000)
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.card canvas')).slice(0, 8)"
                ".every(c => c.dataset.drawn === '1')",
                timeout=30_000,
            )
            page.screenshot(path=str(out / "web_search.png"))
            page.locator(".card").first.click()
            page.locator("#viewer").wait_for(state="visible", timeout=10_000)
            page.fill("#expr", expression)
            page.press("#expr", "Enter")
            page.locator("#refer-results li.best").wait_for(timeout=30_000)
            page.wait_for_function("document.getElementById('viewer-img').complete", timeout=30_000)
            page.screenshot(path=str(out / "web_refer.png"))
        finally:
            browser.close()
    print(f"wrote {out / 'web_search.png'} and {out / 'web_refer.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="maskinversion")
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7, help="world seed (the generator's default)")
    parser.add_argument("--query", default="a red star")
    parser.add_argument("--expression", default="the blue circle")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} not found: install Debian's chromium (.ci/chromium.sh)")
    with tempfile.TemporaryDirectory(prefix="regionsearch-web-") as tmp:
        index_dir = build_index(Path(tmp), args.scenes, args.seed, args.embedder)
        from regionsearch.api import Settings, create_app

        app = create_app(Settings(index_dir=index_dir, read_only=True))
        with serve_in_thread(app, start_timeout_s=120) as url:
            screenshots(url, args.query, args.expression, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
