"""The API as an app uses it: "more like this", query by example, stateless referring
expressions (nothing stored, same answer as once indexed), errors, and the OpenAPI schema."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_search import Demo, build_demo_index

from regionsearch.api import Settings, create_app
from regionsearch.search import RegionSearcher, SearchFilters
from regionsearch.search.examples import EXAMPLE_RESULTS, similar
from regionsearch.search.postprocess import ResultOptions
from regionsearch.store import RegionIndex

KEY = "s3cret"
AUTH = {"X-API-Key": KEY}
EXPR = "the red block on the left"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo_index(tmp_path_factory.mktemp("apps"))


@pytest.fixture(scope="module")
def client(demo: Demo, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("apps-copy") / "index"
    shutil.copytree(demo.directory, directory)
    settings = Settings(
        index_dir=directory,
        api_key=KEY,
        max_upload_bytes=200_000,
        max_k=50,
        cors_origins=["http://example.test"],
    )
    with TestClient(create_app(settings, backbone=demo.backbone)) as c:
        yield c


def photo_bytes() -> bytes:
    """A photo with three clear objects (automatic proposals find them), lightly textured so
    that no two regions embed alike (ties would make the order of equals arbitrary)."""
    pixels = np.full((48, 64, 3), (40, 90, 160), np.int16)
    pixels[8:30, 4:22] = (220, 30, 30)
    pixels[20:44, 36:60] = (30, 200, 60)
    pixels[2:12, 40:62] = (240, 220, 40)
    noise = np.random.default_rng(7).integers(-12, 13, pixels.shape)
    pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uploaded(client: TestClient) -> dict:
    """The photo, indexed through the upload route (real embeddings of its proposals)."""
    res = client.post(
        "/api/images", files={"file": ("p.png", photo_bytes(), "image/png")}, headers=AUTH
    )
    assert res.status_code == 201, res.text
    return res.json()


def counts(client: TestClient) -> tuple:
    stats = client.get("/api/stats").json()
    return stats["images"], stats["regions"], stats["vectors"]


# ----------------------------------------------------------------------------- more like this


def test_similar_matches_brute_force(demo: Demo) -> None:
    index = RegionIndex.open(demo.directory, read_only=True)
    try:
        searcher = RegionSearcher(index, demo.backbone)
        for row in (0, 5, 10):
            rid = int(demo.ids[row])
            hits = similar(searcher, rid, k=6, results=ResultOptions.plain())
            scores = demo.vectors @ demo.vectors[row]
            order = [i for i in np.argsort(-scores) if int(demo.ids[i]) != rid][:6]
            assert [h.region_id for h in hits] == [int(demo.ids[i]) for i in order]
            np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
            folder = similar(
                searcher, rid, k=20, filters=SearchFilters(path_glob="b/*"),
                results=ResultOptions.plain(),
            )  # fmt: skip
            assert folder and all(h.image_path.startswith("b/") for h in folder)
            assert rid not in {h.region_id for h in folder}
        with pytest.raises(KeyError):
            similar(searcher, 987654)
    finally:
        index.close()


def test_similar_route(client: TestClient, demo: Demo) -> None:
    rid = int(demo.ids[4])
    res = client.get(f"/api/regions/{rid}/similar", params={"k": 5})
    assert res.status_code == 200, res.text
    data = res.json()
    assert data["region_id"] == rid and data["count"] == len(data["results"]) == 5
    ids = [r["id"] for r in data["results"]]
    assert rid not in ids
    index = RegionIndex.open(demo.directory, read_only=True)
    try:
        expected = similar(RegionSearcher(index, demo.backbone), rid, k=5)
    finally:
        index.close()
    assert ids == [h.region_id for h in expected]
    scores = [r["score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)
    one = client.get(f"/api/regions/{rid}/similar", params={"k": 10, "one_per_image": True})
    images = [r["image_id"] for r in one.json()["results"]]
    assert len(images) == len(set(images)) and demo.image_of[rid] not in images
    cut = client.get(f"/api/regions/{rid}/similar", params={"min_score": 0.99}).json()
    assert all(r["score"] >= 0.99 for r in cut["results"])
    glob = client.get(f"/api/regions/{rid}/similar", params={"path": "a/*", "k": 20}).json()
    assert glob["count"] and all(r["image_path"].startswith("a/") for r in glob["results"])
    assert client.get("/api/regions/987654/similar").status_code == 404
    assert client.get(f"/api/regions/{2**63}/similar").status_code == 404
    for bad in ({"k": 0}, {"k": 51}, {"min_score": 2}, {"one_per_image": "maybe"}):
        res = client.get(f"/api/regions/{rid}/similar", params=bad)
        assert res.status_code == 422 and "detail" in res.json()


# ----------------------------------------------------------------------------- by example


def test_by_image_finds_the_indexed_region(client: TestClient, uploaded: dict) -> None:
    before = counts(client)
    regions = [r for r in uploaded["regions"] if r["source"] == "proposal"]
    for region in regions[:2]:
        res = client.post(
            "/api/search/by-image",
            files={"file": ("q.png", photo_bytes(), "image/png")},
            data={"rle": json.dumps(region["rle"])},
            params={"k": 3},
            headers=AUTH,
        )
        assert res.status_code == 200, res.text
        data = res.json()
        assert data["query"]["mask_from"] == "rle" and data["query"]["rle"] == region["rle"]
        assert data["query"]["bbox"] == region["bbox"]
        top = data["results"][0]
        # the same photo and mask embed to the stored vector: cosine 1 (minus the objectness
        # prior of a proposal, at most a few hundredths)
        assert top["id"] == region["id"] and top["score"] > 0.85
    assert counts(client) == before


def test_by_image_box_png_and_whole_image(client: TestClient, demo: Demo) -> None:
    from regionsearch.embedders import get_embedder
    from regionsearch.image_io import decode_bytes

    before = counts(client)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 12:40] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    photo = ("q.png", photo_bytes(), "image/png")
    by_png = client.post(
        "/api/search/by-image",
        files=[("file", photo), ("mask", ("m.png", buf.getvalue(), "image/png"))],
        params={"k": 4},
        headers=AUTH,
    ).json()
    by_box = client.post(
        "/api/search/by-image",
        files={"file": photo},
        data={"box": "[12, 10, 28, 20]"},
        params={"k": 4},
        headers=AUTH,
    ).json()
    assert by_png["query"]["mask_from"] == "mask" and by_box["query"]["mask_from"] == "box"
    assert by_png["query"]["rle"] == by_box["query"]["rle"]  # the same pixels
    assert [r["id"] for r in by_png["results"]] == [r["id"] for r in by_box["results"]]
    # slow reference: embed the mask here and search the index with that vector
    embedder = get_embedder("masked-crop", demo.backbone)
    vec = embedder.embed(decode_bytes(photo[1]), mask[None] > 0).numpy()[0]
    index = RegionIndex.open(client.app.state.regionsearch.settings.index_dir, read_only=True)
    try:
        expected = RegionSearcher(index, demo.backbone).search_vector(
            vec, k=4, results=EXAMPLE_RESULTS
        )
    finally:
        index.close()
    assert [r["id"] for r in by_box["results"]] == [h.region_id for h in expected]
    np.testing.assert_allclose(
        [r["score"] for r in by_box["results"]], [h.score for h in expected], atol=1e-4
    )
    whole = client.post(
        "/api/search/by-image", files={"file": photo}, params={"path": "b/*"}, headers=AUTH
    ).json()
    assert whole["query"]["mask_from"] == "image" and whole["query"]["area"] == 48 * 64
    assert all(r["image_path"].startswith("b/") for r in whole["results"])
    assert counts(client) == before


# ----------------------------------------------------------------------------- stateless refer


def test_stateless_refer_equals_indexed_refer(client: TestClient, uploaded: dict) -> None:
    before = counts(client)
    uploads = client.app.state.regionsearch.index.directory / "uploads"
    files_before = sorted(uploads.iterdir())
    image_id = uploaded["id"]
    indexed = client.get("/api/refer", params={"image_id": image_id, "q": EXPR, "k": 4}).json()
    indexed_hits = [indexed["best"], *indexed["alternatives"]]
    photo = {"file": ("q.png", photo_bytes(), "image/png")}
    rles = [r["rle"] for r in uploaded["regions"]]
    given = client.post(
        "/api/refer",
        files=photo,
        data={"rle": json.dumps(rles)},
        params={"q": EXPR, "k": 4},
        headers=AUTH,
    )
    assert given.status_code == 200, given.text
    proposed = client.post("/api/refer", files=photo, params={"q": EXPR, "k": 4}, headers=AUTH)
    assert proposed.status_code == 200, proposed.text
    for data, origin in ((given.json(), "given"), (proposed.json(), "proposals")):
        assert data["candidates_from"] == origin and data["candidates"] == len(rles)
        hits = [data["best"], *data["alternatives"]]
        assert [h["rle"] for h in hits] == [h["rle"] for h in indexed_hits]
        assert [h["bbox"] for h in hits] == [h["bbox"] for h in indexed_hits]
        np.testing.assert_allclose(
            [h["score"] for h in hits], [h["score"] for h in indexed_hits], atol=1e-4
        )
    assert [h["candidate"] for h in [given.json()["best"]]] == [rles.index(indexed["best"]["rle"])]
    assert counts(client) == before
    assert sorted(uploads.iterdir()) == files_before


def test_stateless_refer_masks_and_png(client: TestClient) -> None:
    left = np.zeros((48, 64), np.uint8)
    left[8:30, 4:22] = 255
    buf = io.BytesIO()
    Image.fromarray(left).save(buf, format="PNG")
    res = client.post(
        "/api/refer",
        files=[
            ("file", ("q.png", photo_bytes(), "image/png")),
            ("mask", ("m.png", buf.getvalue(), "image/png")),
        ],
        data={"box": "[[36, 20, 24, 24], [40, 2, 22, 10]]"},
        params={"q": EXPR, "k": 3, "mask_png": True},
        headers=AUTH,
    )
    assert res.status_code == 200, res.text
    data = res.json()
    assert data["candidates"] == 3 and data["candidates_from"] == "given"
    hits = [data["best"], *data["alternatives"]]
    assert sorted(h["candidate"] for h in hits) == [0, 1, 2]
    assert {h["source"] for h in hits} == {"given"}
    box_of = {0: [4.0, 8.0, 18.0, 22.0], 1: [36.0, 20.0, 24.0, 24.0], 2: [40.0, 2.0, 22.0, 10.0]}
    for h in hits:
        assert h["bbox"] == box_of[h["candidate"]]
        header, payload = h["mask_png"].split(",", 1)
        assert header == "data:image/png;base64"
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))))
        from regionsearch.masks import rle as rle_mod

        assert np.array_equal(png > 0, rle_mod.decode(h["rle"]))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("route", "params"),
    [("/api/search/by-image", {}), ("/api/refer", {"q": EXPR})],
)
def test_stateless_routes_refuse_bad_requests(client: TestClient, route: str, params) -> None:
    photo = ("q.png", photo_bytes(), "image/png")
    index_dir = str(client.app.state.regionsearch.index.directory)

    def post(files=None, data=None, headers=AUTH, query=params):
        res = client.post(route, files=files, data=data, params=query, headers=headers)
        assert "detail" in res.json() and index_dir not in res.text
        return res

    assert post({"file": photo}, headers={}).status_code == 401
    assert post({"file": photo}, headers={**AUTH, "Origin": "http://evil.test"}).status_code == 403
    big = ("big.png", photo_bytes() + b"\0" * 250_000, "image/png")
    assert post({"file": big}).status_code == 413
    assert post({"file": ("x.jpg", b"not an image" * 20, "image/jpeg")}).status_code == 415
    assert post().status_code == 422  # no body
    cases = {
        "unknown form field": {"colour": "red"},
        "rle #1 is not valid JSON": {"rle": "{size"},
        "rle #1 has size": {"rle": json.dumps({"size": [10, 10], "counts": "abc"})},
        "'counts' is not a valid": {"rle": json.dumps({"size": [48, 64], "counts": 5})},
        "box #1 must be four numbers": {"box": "[1, 2, 3]"},
        "lies outside": {"box": "[100, 100, 5, 5]"},
        "positive width": {"box": "[1, 1, 0, 5]"},
    }
    for words, data in cases.items():
        res = post({"file": photo}, data)
        assert res.status_code == 422 and words in res.json()["detail"], (words, res.text)
    empty = io.BytesIO()
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(empty, format="PNG")
    res = post([("file", photo), ("mask", ("m.png", empty.getvalue(), "image/png"))])
    assert res.status_code == 422 and "empty" in res.json()["detail"]
    small = io.BytesIO()
    Image.fromarray(np.ones((10, 10), np.uint8)).save(small, format="PNG")
    res = post([("file", photo), ("mask", ("m.png", small.getvalue(), "image/png"))])
    assert res.status_code == 422 and "10x10" in res.json()["detail"]


def test_by_image_takes_one_mask_and_refer_needs_q(client: TestClient) -> None:
    photo = ("q.png", photo_bytes(), "image/png")
    two = client.post(
        "/api/search/by-image",
        files={"file": photo},
        data={"box": "[[1, 1, 5, 5], [9, 9, 5, 5]]"},
        headers=AUTH,
    )
    assert two.status_code == 422 and "at most one" in two.json()["detail"]
    assert client.post("/api/refer", files={"file": photo}, headers=AUTH).status_code == 422
    blank = client.post("/api/refer", files={"file": photo}, params={"q": "  "}, headers=AUTH)
    assert blank.status_code == 422
    too_many = client.post(
        "/api/search/by-image", files={"file": photo}, params={"k": 51}, headers=AUTH
    )
    assert too_many.status_code == 422


def test_read_only_server_answers_stateless_queries(demo: Demo) -> None:
    settings = Settings(index_dir=demo.directory, read_only=True)
    with TestClient(create_app(settings, backbone=demo.backbone)) as c:
        res = c.post(
            "/api/refer",
            files={"file": ("q.png", photo_bytes(), "image/png")},
            data={"box": "[4, 8, 18, 22]"},
            params={"q": EXPR, "k": 1},
        )
        assert res.status_code == 200 and res.json()["best"]["bbox"] == [4.0, 8.0, 18.0, 22.0]


# ----------------------------------------------------------------------------- OpenAPI


def test_openapi_documents_every_field_with_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    undocumented = [
        f"{name}.{prop}"
        for name, component in schema["components"]["schemas"].items()
        if not name.startswith(("HTTPValidationError", "ValidationError"))
        for prop, spec in component.get("properties", {}).items()
        if "description" not in spec or not (spec.get("examples") or "$ref" in str(spec))
    ]
    assert not undocumented, undocumented
    routes = {
        ("/api/regions/{region_id}/similar", "get"),
        ("/api/search/by-image", "post"),
        ("/api/refer", "post"),
    }
    for path, method in routes:
        op = schema["paths"][path][method]
        for p in op.get("parameters", []):
            if p["in"] == "query":
                documented = p.get("description") and ("examples" in p or "examples" in p["schema"])
                assert documented, (path, p["name"])
        if method == "post":
            body = op["requestBody"]["content"]["multipart/form-data"]["schema"]
            assert set(body["properties"]) == {"file", "mask", "rle", "box"}
            assert all(v.get("description") for v in body["properties"].values())
            assert {"401", "403", "413", "415", "422"} <= set(op["responses"])
    assert "get" in schema["paths"]["/api/refer"]  # the indexed-photo refer stays
