"""Cached pictures: overlays and thumbnails equal what is rendered without the cache, carry an
ETag a browser can revalidate with (304), decode a photo once for all its regions, and never
outlive a change of the photo file; the cache stays within its byte budget."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_search import Demo, build_demo_index

from regionsearch.api import Settings, create_app
from regionsearch.api.picture_cache import PictureCache
from regionsearch.search.render import encode_picture, load_rgb, region_picture


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo_index(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def client(demo: Demo):
    settings = Settings(index_dir=demo.directory, read_only=True)
    with TestClient(create_app(settings, backbone=demo.backbone)) as c:
        yield c


def _pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_cached_overlay_equals_uncached_and_revalidates(client: TestClient, demo: Demo) -> None:
    pictures = client.app.state.regionsearch.pictures
    pictures.clear()
    image = demo.image_of[demo.umbrella_region]
    regions = [r for r, i in demo.image_of.items() if i == image]
    path = demo.photos / demo.path_of[image]
    for rid in regions:  # three regions of one photo: one decode
        res = client.get(f"/api/regions/{rid}/overlay.png", params={"max_side": 48})
        assert res.status_code == 200 and res.headers["etag"]
        rle = client.get(f"/api/regions/{rid}").json()["rle"]
        assert np.array_equal(_pixels(res.content), region_picture(path, rle, 48))
    assert sum(key[0] == "photo" for key in pictures._items) == 1
    url = f"/api/regions/{regions[0]}/overlay.png"
    first = client.get(url, params={"max_side": 48})
    again = client.get(
        url, params={"max_side": 48}, headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    assert client.get(url, params={"max_side": 40}).headers["etag"] != first.headers["etag"]
    other = client.get(f"/api/regions/{regions[1]}/overlay.png", params={"max_side": 48})
    assert other.headers["etag"] != first.headers["etag"]


def test_thumbnail_cached_and_follows_the_file(client: TestClient, demo: Demo) -> None:
    image = demo.dog_image
    path = demo.photos / demo.path_of[image]
    url = f"/api/images/{image}/thumbnail.jpg"
    first = client.get(url, params={"size": 32})
    assert first.content == encode_picture(load_rgb(path, 32))
    assert client.get(url, params={"size": 32}).content == first.content
    tag = first.headers["etag"]
    assert client.get(url, params={"size": 32}, headers={"If-None-Match": tag}).status_code == 304
    # the photo changes on disk: a new picture and a new ETag, not the cached one
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = client.get(url, params={"size": 32}, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    assert changed.content == encode_picture(load_rgb(path, 32))
    path.unlink()
    assert client.get(url, params={"size": 32}).status_code == 404


def test_picture_cache_keeps_its_budget() -> None:
    cache = PictureCache(max_bytes=100)
    made = []

    def make(n: int):
        return lambda: made.append(n) or bytes(n)

    assert cache.get("a", make(40)) == bytes(40)
    assert cache.get("a", make(40)) == bytes(40) and made == [40]  # second one cached
    cache.get("b", make(50))
    cache.get("a", make(40))  # a is now the most recent
    cache.get("c", make(30))  # over budget: b (least recent) goes
    assert set(cache._items) == {"a", "c"} and cache._bytes == 70
    assert cache.get("huge", make(500)) == bytes(500) and "huge" not in cache._items
    array = cache.get("arr", lambda: np.zeros(3, np.uint8))
    assert not array.flags.writeable  # shared between requests: read-only
    with pytest.raises(ValueError, match="max_bytes"):
        PictureCache(max_bytes=-1)
