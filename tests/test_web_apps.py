"""The web page's "More like this" in a real browser (skips as ``test_web`` does without
playwright or chromium): the viewer's highlighted region becomes the query."""

from __future__ import annotations

from test_search import QUERY
from test_web import server, sync_api  # noqa: F401
from web_helpers import launch_chromium


def test_more_like_this(server) -> None:  # noqa: F811 - the fixture of test_web
    url, demo = server
    rid = demo.umbrella_region
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url + "/")
            page.fill("#q", QUERY)
            page.press("#q", "Enter")
            cards = page.locator(".card")
            cards.first.wait_for(timeout=20_000)
            cards.first.click()  # the umbrella region, highlighted in the viewer
            page.locator("#viewer").wait_for(state="visible", timeout=10_000)
            page.click("#more-like-this")
            page.wait_for_function(
                f"document.getElementById('status').textContent.includes('like region {rid}')",
                timeout=20_000,
            )
            assert not page.locator("#viewer").is_visible()
            shown = [int(c.get_attribute("data-region-id")) for c in cards.all()]
            expected = page.evaluate(
                f"fetch('/api/regions/{rid}/similar?k=24').then(r => r.json())"
            )
            assert shown == [r["id"] for r in expected["results"]] and rid not in shown
        finally:
            browser.close()
