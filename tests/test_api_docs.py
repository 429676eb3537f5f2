"""``/docs`` and ``/redoc`` work offline: every asset they load is served by the app itself."""

from __future__ import annotations

import re
from types import SimpleNamespace

from fastapi.testclient import TestClient

from regionsearch.api import Settings, create_app


def _no_index_state(settings, backbone):
    return SimpleNamespace(index=SimpleNamespace(close=lambda: None))


def test_docs_pages_load_only_local_assets(tmp_path):
    app = create_app(Settings(index_dir=tmp_path), state_factory=_no_index_state)
    with TestClient(app) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200 and "text/html" in html.headers["content-type"]
            sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
            sources += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)
            assert sources, page
            for url in sources:
                assert not url.startswith(("http:", "https:", "//")), f"{page} loads {url}"
                assert client.get(url).status_code == 200, url
        assert "openapi.json" in client.get("/docs").text
