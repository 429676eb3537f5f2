"""docs/clients.md: its Python (httpx) and browser (fetch, run by Node) examples against a live
uvicorn server on 127.0.0.1 (a thread), so the documented calls keep working."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_api_apps import EXPR, photo_bytes
from test_search import build_demo_index
from web_helpers import serve_in_thread

from regionsearch.api import Settings, create_app

DOC = Path(__file__).resolve().parents[1] / "docs" / "clients.md"
KEY = "doc-key"
DEFAULT_BASE = '"http://127.0.0.1:8000"'


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    demo = build_demo_index(tmp_path_factory.mktemp("docs"))
    directory = tmp_path_factory.mktemp("docs-copy") / "index"
    shutil.copytree(demo.directory, directory)
    app = create_app(Settings(index_dir=directory, api_key=KEY), backbone=demo.backbone)
    with serve_in_thread(app) as url:
        yield url, demo


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "park.png"
    path.write_bytes(photo_bytes())
    return path


def test_python_example(server, photo: Path, monkeypatch, capsys) -> None:
    url, demo = server
    monkeypatch.setenv("REGIONSEARCH_URL", url)
    monkeypatch.setenv("REGIONSEARCH_API_KEY", KEY)
    definitions, usage = blocks("python")
    namespace: dict = {}
    exec(compile(definitions, str(DOC), "exec"), namespace)
    found = namespace["refer_on_photo"](str(photo), EXPR)
    assert found["candidates_from"] == "proposals" and len(found["alternatives"]) == 2
    hits = namespace["search_with_box"](str(photo), found["best"]["bbox"], k=3)
    assert len(hits) == 3
    rid = int(demo.ids[2])
    like = namespace["more_like"](rid, k=4)
    assert len(like) == 4 and rid not in {h["id"] for h in like}
    exec(compile(usage.replace('"park.jpg"', repr(str(photo))), str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    dog = namespace["refer_on_photo"](str(photo), "the dog on the left")["best"]
    assert printed[0] == f"{dog['bbox']} {dog['score']}"
    assert len(printed) == 11  # the best region, then ten similar regions


def test_fetch_example_in_node(server, photo: Path, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    url, demo = server
    (code,) = blocks("js")
    assert DEFAULT_BASE in code
    rid = int(demo.ids[2])
    script = tmp_path / "client.mjs"
    script.write_text(
        code.replace(DEFAULT_BASE, json.dumps(url))
        + f"""
import {{ readFileSync }} from "node:fs";
const photo = new Blob([readFileSync({json.dumps(str(photo))})], {{ type: "image/png" }});
const found = await referOnPhoto(photo, {json.dumps(EXPR)}, {json.dumps(KEY)});
const like = await moreLikeThis({rid}, 4);
let refused = null;
try {{ await referOnPhoto(photo, {json.dumps(EXPR)}, "wrong"); }} catch (e) {{ refused = e.message; }}
console.log(JSON.stringify({{ found, like, refused }}));
"""
    )
    done = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["found"]["best"]["mask_png"].startswith("data:image/png;base64,")
    assert len(out["found"]["alternatives"]) == 2
    assert len(out["like"]) == 4 and rid not in {h["id"] for h in out["like"]}
    assert out["refused"] == "missing or wrong X-API-Key"
