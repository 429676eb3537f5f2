"""The web page in a real browser: search, result cards, open an image, referring expression.

Needs the ``playwright`` Python package and Debian's ``/usr/bin/chromium`` (``.ci/chromium.sh``);
skips cleanly without them. The server is uvicorn on 127.0.0.1, a free port, in a thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from web_helpers import CHROMIUM, launch_chromium, serve_in_thread

# Test-run screenshots go to the git-ignored runs/ folder (the README's come from
# benchmarks/web_demo.py, over a real index).
SCREENSHOTS = Path(__file__).resolve().parents[1] / "runs" / "web"

sync_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    pytest.skip("/usr/bin/chromium is not installed (see .ci/chromium.sh)", allow_module_level=True)

from test_search import EXPRESSION, QUERY, build_demo_index, exact_match_score  # noqa: E402

from regionsearch.api import Settings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    demo = build_demo_index(tmp_path_factory.mktemp("web"))
    directory = tmp_path_factory.mktemp("web-copy") / "index"
    shutil.copytree(demo.directory, directory)
    app = create_app(Settings(index_dir=directory, read_only=True), backbone=demo.backbone)
    with serve_in_thread(app) as url:
        yield url, demo


def test_search_click_refer(server, tmp_path: Path) -> None:
    url, demo = server
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url + "/")
            page.fill("#q", QUERY)
            page.press("#q", "Enter")
            cards = page.locator(".card")
            cards.first.wait_for(timeout=20_000)
            assert cards.count() >= 5
            first = cards.first
            assert first.get_attribute("data-region-id") == str(demo.umbrella_region)
            assert f"{exact_match_score(demo.backbone, QUERY):.3f}" in first.inner_text()
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.card canvas')).slice(0, 4)"
                ".every(c => c.dataset.drawn === '1' && c.width > 0)",
                timeout=20_000,
            )
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOTS / "web_search.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 1000

            # open the dog's image and point at the dog
            page.evaluate(f"openImage({demo.dog_image}, [])")
            page.locator("#viewer").wait_for(state="visible", timeout=10_000)
            page.fill("#expr", EXPRESSION)
            page.press("#expr", "Enter")
            page.locator("#refer-results li.best").wait_for(timeout=20_000)
            assert f"region {demo.dog_region}" in page.inner_text("#refer-results li.best")
            img = page.locator("#viewer-img")
            assert img.get_attribute("data-highlight") == str(demo.dog_region)
            assert f"highlight={demo.dog_region}" in (img.get_attribute("src") or "")
            page.wait_for_function("document.getElementById('viewer-img').complete", timeout=20_000)
            refer_shot = SCREENSHOTS / "web_refer.png"
            page.screenshot(path=str(refer_shot))
            assert refer_shot.exists()

            # clicking a result card opens the viewer on that image
            page.click("#close")
            cards.first.click()
            page.locator("#viewer").wait_for(state="visible", timeout=10_000)
            src = page.locator("#viewer-img").get_attribute("src") or ""
            assert f"highlight={demo.umbrella_region}" in src
        finally:
            browser.close()


def test_ranking_fields_show_defaults_and_reach_the_search(server) -> None:
    """The "ranking" fields show this index's switch defaults (masked crop: open-set 1,
    repetition 0.5); typed weights, 0 included, go to /api/search and the cards show its
    scores for them."""
    url, _ = server
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url + "/")
            page.wait_for_function(
                "document.getElementById('repetition').placeholder !== ''", timeout=20_000
            )
            assert page.get_attribute("#open-set", "placeholder") == "default 1"
            assert page.get_attribute("#repetition", "placeholder") == "default 0.5"
            assert "regions of" in page.inner_text("#status")

            page.click("#ranking summary")
            page.fill("#open-set", "0")
            page.fill("#repetition", "2")
            page.fill("#q", QUERY)
            with page.expect_response(lambda r: "/api/search?" in r.url) as sent:
                page.press("#q", "Enter")
            response = sent.value
            assert "open_set=0" in response.url and "repetition=2" in response.url
            expected = [f"{hit['score']:.3f}" for hit in response.json()["results"]]
            page.locator(".card").first.wait_for(timeout=20_000)
            shown = page.locator(".card .score").all_inner_texts()
            assert shown == expected and len(shown) >= 5
        finally:
            browser.close()
