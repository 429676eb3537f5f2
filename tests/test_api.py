"""The HTTP API through TestClient: every endpoint, errors, uploads, no filesystem paths."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_search import DIM, EXPRESSION, QUERY, Demo, build_demo_index, exact_match_score

from regionsearch.api import Settings, create_app
from regionsearch.masks import rle as rle_mod
from regionsearch.search import RegionSearcher
from regionsearch.store import NewRegion, RegionIndex

KEY = "s3cret"
#: Routes whose ``path`` parameter filters results by a glob on stored image paths.
SEARCH_ROUTES = ("/api/search", "/api/search/by-image", "/api/regions/{region_id}/similar")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo_index(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def client(demo: Demo, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("api-copy") / "index"
    shutil.copytree(demo.directory, directory)  # uploads write here, keep the demo pristine
    settings = Settings(
        index_dir=directory,
        api_key=KEY,
        max_upload_bytes=200_000,
        cors_origins=["http://example.test"],
    )
    with TestClient(create_app(settings, backbone=demo.backbone)) as c:
        yield c


def png_bytes(size=(64, 48), seed=1) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = (40, 90, 160)
    pixels[10:30, 10:40] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_health_stats_docs(client: TestClient, demo: Demo) -> None:
    assert client.get("/api/health").json()["status"] == "ok"
    stats = client.get("/api/stats").json()
    assert stats["regions"] >= 18 and stats["dimension"] == 32 and stats["uploads_enabled"]
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/api/search" in schema["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize(
    ("embedder", "open_set", "repetition"), [("masked-crop", 1.0, 0.5), ("global", 0.0, 0.0)]
)
def test_stats_report_the_index_switch_defaults(
    demo: Demo, tmp_path: Path, embedder: str, open_set: float, repetition: float
) -> None:
    """The web page shows these as its blank fields' meaning, so they must be what a search
    without ``open_set``/``repetition`` really applies for this index's embedder."""
    directory = tmp_path / "index"
    RegionIndex.create(
        directory, model=demo.backbone.name, embedder=embedder, dimension=DIM
    ).close()
    with TestClient(create_app(Settings(index_dir=directory), backbone=demo.backbone)) as c:
        stats = c.get("/api/stats").json()
        assert (stats["embedder"], stats["open_set"], stats["repetition"]) == (
            embedder,
            open_set,
            repetition,
        )
        page = c.get("/").text
        assert 'id="open-set"' in page and 'id="repetition"' in page
        assert c.get("/static/search_params.js").status_code == 200


def test_search(client: TestClient, demo: Demo) -> None:
    res = client.get("/api/search", params={"q": QUERY, "k": 5})
    assert res.status_code == 200
    data = res.json()
    assert data["count"] == 5 and data["templated"] is True
    top = data["results"][0]
    exact = exact_match_score(demo.backbone, QUERY)  # calibrated score of an exact match
    assert top["id"] == demo.umbrella_region and top["score"] == pytest.approx(exact, abs=1e-4)
    assert top["overlay_url"] == f"/api/regions/{top['id']}/overlay.jpg"
    scores = [r["score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)
    none = client.get("/api/search", params={"q": QUERY, "min_score": 0.999999}).json()
    assert none["count"] <= 1
    empty = client.get("/api/search", params={"q": "zebra crossing at night", "min_score": 1.0})
    assert empty.status_code == 200 and empty.json()["results"] == []
    filtered = client.get("/api/search", params={"q": QUERY, "path": "b/*", "k": 30}).json()
    assert filtered["count"] == 9
    assert all(r["image_path"].startswith("b/") for r in filtered["results"])
    one = client.get("/api/search", params={"q": QUERY, "k": 4, "one_per_image": True}).json()
    assert len({r["image_id"] for r in one["results"]}) == 4
    # open_set: the searcher's open-set term (only ever lowers a score; weight 1 by default
    # for this masked-crop index)
    open_set = client.get("/api/search", params={"q": QUERY, "k": 5, "open_set": 2}).json()
    lowered = {r["id"]: r["score"] for r in open_set["results"]}
    default = {r["id"]: r["score"] for r in data["results"]}
    shared = set(lowered) & set(default)
    assert shared and all(lowered[i] < default[i] for i in shared)
    assert client.get("/api/search", params={"q": QUERY, "open_set": -1}).status_code == 422


def build_tiles_index(directory: Path, demo: Demo) -> tuple[Path, dict[int, float]]:
    """One photo cut into five disjoint tiles that all look like QUERY (a textured background
    of the queried kind): each repeats the four others, so the repeated-stuff term lowers them."""
    index = RegionIndex.create(
        directory, model=demo.backbone.name, embedder="masked-crop", dimension=DIM
    )
    query = RegionSearcher(index, demo.backbone).encode_query(QUERY)
    rng = np.random.default_rng(3)
    try:
        (record,) = index.upsert_images([{"path": "tiles.png", "width": 60, "height": 20}])
        regions, vectors = [], []
        for i in range(5):
            mask = np.zeros((20, 60), bool)
            mask[5:15, 12 * i + 1 : 12 * i + 11] = True
            rle = rle_mod.encode(mask)
            regions.append(NewRegion(rle, tuple(rle_mod.bbox(rle)), 100.0, source="proposal"))
            tile = query + 0.02 * rng.normal(size=query.shape)
            vectors.append(tile / np.linalg.norm(tile))
        tiles = np.stack(vectors).astype(np.float32)
        (ids,) = index.add_images_regions([(record.id, regions, tiles)])
        index.checkpoint()
    finally:
        index.close()
    cosines = tiles @ tiles.T
    np.fill_diagonal(cosines, -np.inf)
    repetition = np.sort(cosines, axis=1)[:, -3:].mean(axis=1)  # 3 look-alikes, all disjoint
    return directory, dict(zip(ids.tolist(), repetition.tolist(), strict=True))


def test_search_repetition_weight(demo: Demo, tmp_path: Path) -> None:
    directory, repetition = build_tiles_index(tmp_path / "tiles", demo)
    with TestClient(create_app(Settings(index_dir=directory), backbone=demo.backbone)) as c:

        def scores(**params: float) -> dict[int, float]:
            res = c.get("/api/search", params={"q": QUERY, "k": 5, **params})
            assert res.status_code == 200, res.text
            return {r["id"]: r["score"] for r in res.json()["results"]}

        off, default, strong = scores(repetition=0), scores(), scores(repetition=2)
        assert set(off) == set(default) == set(strong) and len(off) == 5
        # each tile repeats the others (cosine ~0.99), so the term takes w * (that - 0.75)
        for region, score in off.items():
            excess = repetition[region] - 0.75
            assert excess > 0.2
            assert default[region] == pytest.approx(score - 0.5 * excess, abs=1e-4)
            assert strong[region] == pytest.approx(score - 2 * excess, abs=1e-4)
        assert c.get("/api/search", params={"q": QUERY, "repetition": -1}).status_code == 422


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": ""},
        {"q": "   "},
        {"q": "x", "k": 0},
        {"q": "x", "k": "ten"},
        {"q": "x", "k": 100000},
        {"q": "x", "min_score": 3},
        {"q": "x", "one_per_image": "maybe"},
        {"q": "x" * 501},
    ],
)
def test_search_bad_params(client: TestClient, params: dict) -> None:
    res = client.get("/api/search", params=params)
    assert 400 <= res.status_code < 500, res.text
    assert "detail" in res.json()


def test_refer(client: TestClient, demo: Demo) -> None:
    res = client.get("/api/refer", params={"image_id": demo.dog_image, "q": EXPRESSION, "k": 3})
    assert res.status_code == 200
    data = res.json()
    assert data["best"]["id"] == demo.dog_region and len(data["alternatives"]) == 2
    assert client.get("/api/refer", params={"image_id": 99999, "q": "x"}).status_code == 404
    assert client.get("/api/refer", params={"image_id": "a", "q": "x"}).status_code == 422
    assert client.get("/api/refer", params={"image_id": demo.dog_image}).status_code == 422


def test_regions_and_overlays(client: TestClient, demo: Demo) -> None:
    rid = demo.umbrella_region
    region = client.get(f"/api/regions/{rid}").json()
    assert region["image_id"] == demo.image_of[rid] and region["rle"]["size"] == [48, 64]
    png = client.get(f"/api/regions/{rid}/overlay.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 48)
    jpg = client.get(region["overlay_url"])
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpg.content)).format == "JPEG"
    assert client.get(region["overlay_url"], params={"max_side": 4096}).status_code == 422
    for url in (
        "/api/regions/424242",
        "/api/regions/424242/overlay.png",
        "/api/regions/424242/overlay.jpg",
        "/api/regions/-1",
    ):
        assert client.get(url).status_code == 404
    assert client.get("/api/regions/abc").status_code == 422


def test_images(client: TestClient, demo: Demo) -> None:
    image_id = demo.dog_image
    meta = client.get(f"/api/images/{image_id}").json()
    assert meta["path"] == demo.path_of[image_id] and len(meta["regions"]) == 3
    thumb = client.get(f"/api/images/{image_id}/thumbnail.jpg", params={"size": 32})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 32
    assert (
        client.get(f"/api/images/{image_id}/thumbnail.jpg", params={"size": 5}).status_code == 422
    )
    over = client.get(
        f"/api/images/{image_id}/overlay.png", params={"highlight": [demo.dog_region]}
    )
    assert over.status_code == 200
    # Context regions are outlined only: away from the outlines the photo keeps its colours
    # exactly (fills would pile up over overlapping regions and the whole-image one); the
    # highlighted region is tinted.
    from scipy.ndimage import binary_dilation
    from skimage.segmentation import find_boundaries

    from regionsearch.image_io import read_rgb
    from regionsearch.masks import rle as rle_mod

    photo = read_rgb(demo.photos / demo.path_of[image_id]).astype(int)
    drawn = np.asarray(Image.open(io.BytesIO(over.content)).convert("RGB")).astype(int)
    masks = {r["id"]: rle_mod.decode(r["rle"]) for r in meta["regions"]}
    near_outline = binary_dilation(
        np.any([find_boundaries(m, mode="inner") for m in masks.values()], 0), iterations=3
    )
    change = np.abs(drawn - photo).sum(-1)
    assert change[masks[demo.dog_region] & ~near_outline].mean() > 10
    assert change[~masks[demo.dog_region] & ~near_outline].max() == 0
    for url in ("/api/images/777777", "/api/images/777777/thumbnail.jpg"):
        assert client.get(url).status_code == 404


def test_no_endpoint_takes_a_filesystem_path(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        assert "{path" not in path
        for op in ops.values():
            for p in op.get("parameters", []):
                # the only 'path' parameter is a glob matched against stored paths in SQL
                if p["name"] == "path":
                    assert path in SEARCH_ROUTES
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/static/../pyproject.toml").status_code == 404


def test_cors(client: TestClient) -> None:
    res = client.get("/api/health", headers={"Origin": "http://example.test"})
    assert res.headers.get("access-control-allow-origin") == "http://example.test"
    res = client.get("/api/health", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in res.headers


def test_upload_rejections(client: TestClient) -> None:
    good = ("p.png", png_bytes(), "image/png")
    assert client.post("/api/images", files={"file": good}).status_code == 401
    bad_key = client.post("/api/images", files={"file": good}, headers={"X-API-Key": "nope"})
    assert bad_key.status_code == 401
    auth = {"X-API-Key": KEY}
    fake = ("photo.jpg", b"this is not an image at all" * 10, "image/jpeg")
    assert client.post("/api/images", files={"file": fake}, headers=auth).status_code == 415
    big = ("big.png", png_bytes() + b"\0" * 250_000, "image/png")
    assert client.post("/api/images", files={"file": big}, headers=auth).status_code == 413
    assert client.post("/api/images", headers=auth).status_code == 422


def test_upload_is_indexed_and_searchable(client: TestClient) -> None:
    before = client.get("/api/stats").json()["regions"]
    res = client.post(
        "/api/images",
        files={"file": ("../../evil name.png", png_bytes(seed=3), "application/octet-stream")},
        headers={"X-API-Key": KEY},
    )
    assert res.status_code == 201, res.text
    data = res.json()
    assert data["regions"], "the upload got no regions"
    stored = Path(data["path"])
    assert stored.parent.name == "uploads" and "evil" not in stored.name
    after = client.get("/api/stats").json()
    assert after["regions"] == before + len(data["regions"])
    # the demo index recorded no options; the first upload records what embedded it
    assert after["embedder_options"] == {"resolution": 32, "batch_size": 32, "margin": 0.1}
    image_id = data["id"]
    assert client.get(f"/api/images/{image_id}/thumbnail.jpg").status_code == 200
    hits = client.get("/api/search", params={"q": QUERY, "k": 200}).json()["results"]
    assert image_id in {h["image_id"] for h in hits}
    refer = client.get("/api/refer", params={"image_id": image_id, "q": "the blue sky"}).json()
    assert refer["best"]["image_id"] == image_id


def test_upload_is_stored_as_the_indexer_would_store_it(client: TestClient, tmp_path) -> None:
    # A transparent PNG: the indexer composites alpha on white; an upload must see the same
    # pixels, hence the same proposals, masks and boxes as `regionsearch index` on that file.
    from regionsearch.indexer.pipeline import Prepared, prepare_image
    from regionsearch.masks import AutomaticProposals

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[8:40, 6:30] = (200, 30, 30, 255)  # an opaque red block on a transparent canvas
    rgba[20:44, 36:60] = (20, 60, 200, 128)  # a half-transparent blue one
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    res = client.post(
        "/api/images",
        files={"file": ("alpha.png", path.read_bytes(), "image/png")},
        headers={"X-API-Key": KEY},
    )
    assert res.status_code == 201, res.text
    uploaded = sorted((tuple(r["bbox"]), r["rle"]["counts"]) for r in res.json()["regions"])
    expected = prepare_image(path, "alpha.png", AutomaticProposals(), None, keep_masks=False)
    assert isinstance(expected, Prepared)
    assert uploaded == sorted((tuple(r.bbox), r.rle["counts"]) for r in expected.regions)
    thumb = client.get(f"/api/images/{res.json()['id']}/thumbnail.jpg", params={"size": 64})
    corner = np.asarray(Image.open(io.BytesIO(thumb.content)).convert("RGB"))[0, 0]
    assert corner.min() > 200, "transparent pixels are shown white, as they were embedded"


def test_read_only_server_refuses_uploads(demo: Demo) -> None:
    settings = Settings(index_dir=demo.directory, read_only=True)
    with TestClient(create_app(settings, backbone=demo.backbone)) as c:
        assert c.get("/api/stats").json()["read_only"] is True
        res = c.post("/api/images", files={"file": ("p.png", png_bytes(), "image/png")})
        assert res.status_code == 403
