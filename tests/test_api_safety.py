"""The API against a hostile or careless client: early refusals, origins, sizes, leaks, locks.

Uploads are driven at the ASGI level where it matters: a receive() that counts the bytes the
app pulls shows what the server read (and so at most what it could have written) before it
answered, for a chunked body without Content-Length.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_api import png_bytes
from test_search import Demo, build_demo_index

from regionsearch.api import Settings, create_app
from regionsearch.store import RegionIndex

KEY = "k3y"
LIMIT = 10_000  # bytes per upload in these tests
BOUNDARY = "regionsearch-test-boundary"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo_index(tmp_path_factory.mktemp("safety"))


def _copy(demo: Demo, tmp_path: Path) -> Path:
    directory = tmp_path / "index"
    shutil.copytree(demo.directory, directory)
    return directory


@pytest.fixture
def index_dir(demo: Demo, tmp_path: Path) -> Path:
    return _copy(demo, tmp_path)


def _client(demo: Demo, directory: Path, **settings) -> TestClient:
    settings.setdefault("max_upload_bytes", LIMIT)
    app = create_app(Settings(index_dir=directory, **settings), backbone=demo.backbone)
    return TestClient(app)


def multipart_head(filename: str = "p.png") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()


def chunked_upload(payload_bytes: int, chunk: int = 4096) -> Iterator[bytes]:
    """A multipart body whose file part is ``payload_bytes`` long, in ``chunk``-byte pieces."""
    yield multipart_head()
    sent = 0
    while sent < payload_bytes:
        n = min(chunk, payload_bytes - sent)
        yield b"\x89" * n
        sent += n
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def asgi_post(
    client: TestClient, path: str, headers: dict[str, str], chunks: Iterable[bytes]
) -> tuple[int, dict, int]:
    """POST ``chunks`` as a streamed body (no Content-Length unless given in ``headers``).

    Returns (status, JSON body, bytes of the body the app pulled before answering).
    """
    pieces = iter(chunks)
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        try:
            piece = next(pieces)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(piece)
        return {"type": "http.request", "body": piece, "more_body": True}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    all_headers = {
        "host": "testserver",
        "content-type": f"multipart/form-data; boundary={BOUNDARY}",
        **headers,
    }
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None, "use inside `with TestClient(...)`"
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    import json

    return start["status"], json.loads(body or b"{}"), pulled


def _files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- refuse early


def test_wrong_key_is_refused_before_the_body_is_read(demo: Demo, index_dir: Path) -> None:
    with _client(demo, index_dir, api_key=KEY) as c:
        status, body, pulled = asgi_post(
            c, "/api/images", {"x-api-key": "wrong"}, chunked_upload(50 * LIMIT)
        )
    assert status == 401, body
    assert pulled == 0, f"the server read {pulled} bytes of a request it was going to refuse"


def test_chunked_upload_is_capped_while_streaming(demo: Demo, index_dir: Path) -> None:
    before = set(_files_under(index_dir))
    with _client(demo, index_dir, api_key=KEY) as c:
        status, body, pulled = asgi_post(
            c, "/api/images", {"x-api-key": KEY}, chunked_upload(100 * LIMIT)
        )
    assert status == 413, body
    assert "limit is 9.77 KB" in body["detail"], body
    # It stopped reading at the limit (plus at most one network chunk and the part's headers):
    # what it never read, it cannot have written.
    assert pulled <= LIMIT + 4096 + len(multipart_head()), pulled
    assert set(_files_under(index_dir)) == before, "an over-limit upload left a file behind"


def test_content_length_over_the_limit_is_refused_up_front(demo: Demo, index_dir: Path) -> None:
    with _client(demo, index_dir, api_key=KEY) as c:
        headers = {"x-api-key": KEY, "content-length": str(2 * 1024**3)}
        status, body, pulled = asgi_post(c, "/api/images", headers, chunked_upload(100 * LIMIT))
    assert status == 413 and "limit is 9.77 KB" in body["detail"], body
    assert pulled == 0


def test_upload_within_the_limit_still_works(demo: Demo, index_dir: Path) -> None:
    data = png_bytes(seed=5)
    assert len(data) < LIMIT
    chunks = [multipart_head(), data[:100], data[100:], f"\r\n--{BOUNDARY}--\r\n".encode()]
    with _client(demo, index_dir, api_key=KEY) as c:
        status, body, _ = asgi_post(c, "/api/images", {"x-api-key": KEY}, chunks)
    assert status == 201, body
    assert body["regions"]


def huge_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit black PNG of ``width x height`` in ~100 KB (rows of zeros compress well)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_image_is_too_large_not_unsupported(demo: Demo, index_dir: Path) -> None:
    data = huge_png()
    assert len(data) < 200_000
    with _client(demo, index_dir, api_key=KEY, max_upload_bytes=200_000) as c:
        res = c.post(
            "/api/images",
            files={"file": ("huge.png", data, "image/png")},
            headers={"X-API-Key": KEY},
        )
        assert res.status_code == 413, res.text
        detail = res.json()["detail"]
        assert "900 megapixels" in detail and "limit is 40 megapixels" in detail, detail
        # just over the server's own limit (below Pillow's bomb limit): the same answer
        buf = io.BytesIO()
        Image.new("1", (7000, 6000)).save(buf, format="PNG")
        res = c.post(
            "/api/images",
            files={"file": ("big.png", buf.getvalue(), "image/png")},
            headers={"X-API-Key": KEY},
        )
        assert res.status_code == 413 and "7000x6000" in res.json()["detail"], res.text


# ----------------------------------------------------------------------------- origins


def test_trusted_origins_must_be_web_origins(tmp_path: Path) -> None:
    """An origin a browser could never send ("app.example", a path) would silently leave CORS
    off; it is refused, on the command line as one usage error."""
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from regionsearch.cli import app

    ok = Settings(index_dir=tmp_path, cors_origins=["https://app.example/", "http://h:8080"])
    assert ok.cors_origins == ["https://app.example", "http://h:8080"]
    for bad in ("app.example", "ftp://app.example", "https://app.example/page"):
        with pytest.raises(ValidationError, match="origin"):
            Settings(index_dir=tmp_path, cors_origins=[bad])
    args = ["serve", "--name", str(tmp_path / "none"), "--cors-origin", "app.example"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--cors-origin: 'app.example' is not a web origin" in (
        result.output
    )


def test_cross_origin_writes_are_refused(demo: Demo, index_dir: Path) -> None:
    good = {"file": ("p.png", png_bytes(seed=7), "image/png")}
    with _client(demo, index_dir, cors_origins=["http://trusted.example"]) as c:
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": "http://testserver.evil.example"},
            {"Origin": "https://testserver"},  # another scheme is another origin
            {"Referer": "http://evil.example/page.html"},
        ):
            res = c.post("/api/images", files=good, headers=headers)
            assert res.status_code == 403, (headers, res.text)
            assert "origin" in res.json()["detail"].lower()
        assert c.get("/api/stats").json()["images"]["indexed"] == 6, "a refused upload wrote"
        for headers in (
            {},  # curl, scripts: no Origin at all
            {"Origin": "http://testserver"},  # the server's own page
            {"Referer": "http://testserver/"},
            {"Origin": "http://trusted.example"},  # configured
        ):
            res = c.post("/api/images", files=good, headers=headers)
            assert res.status_code == 201, (headers, res.text)


def test_dns_rebinding_is_refused_on_a_loopback_server(demo: Demo, index_dir: Path) -> None:
    # A page at evil.example whose name was rebound to 127.0.0.1 sends matching Origin and Host
    # headers; a server listening on loopback answers writes only for loopback host names.
    app = create_app(Settings(index_dir=index_dir, max_upload_bytes=LIMIT), backbone=demo.backbone)
    good = {"file": ("p.png", png_bytes(seed=8), "image/png")}
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
        res = c.post("/api/images", files=good, headers=rebound)
        assert res.status_code == 403, res.text
        own = {"Host": "localhost:8000", "Origin": "http://localhost:8000"}
        assert c.post("/api/images", files=good, headers=own).status_code == 201


def test_every_write_route_checks_the_origin(demo: Demo, index_dir: Path) -> None:
    with _client(demo, index_dir) as c:
        schema = c.get("/openapi.json").json()
        writes = [
            (method, path)
            for path, ops in schema["paths"].items()
            for method in ops
            if method.upper() not in ("GET", "HEAD", "OPTIONS")
        ]
        assert writes, "no write routes found"
        for method, path in writes:
            url = path.replace("{", "").replace("}", "")
            res = c.request(method, url, headers={"Origin": "http://evil.example"})
            assert res.status_code == 403, (method, path, res.text)


# ----------------------------------------------------------------------------- no leaks


def test_no_absolute_server_paths_in_responses(demo: Demo, tmp_path: Path) -> None:
    index_dir = _copy(demo, tmp_path)
    secrets = [str(tmp_path), str(tmp_path.resolve()), str(demo.photos), str(demo.directory)]
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]  # passes verify(), fails decode
    texts: list[str] = []
    with _client(demo, index_dir, max_upload_bytes=200_000) as c:
        up = c.post("/api/images", files={"file": ("x.png", png_bytes(seed=9), "image/png")})
        assert up.status_code == 201, up.text
        data = up.json()
        assert data["path"].startswith("uploads/") and not Path(data["path"]).is_absolute()
        bad = c.post("/api/images", files={"file": ("t.jpg", truncated, "image/jpeg")})
        assert bad.status_code == 422, bad.text
        texts += [up.text, bad.text]
        image_id, region_id = data["id"], data["regions"][0]["id"]
        for url, params in [
            (f"/api/images/{image_id}", None),
            (f"/api/regions/{region_id}", None),
            ("/api/search", {"q": "a photo", "k": 200}),
            ("/api/refer", {"image_id": image_id, "q": "a thing"}),
            ("/api/stats", None),
            ("/api/health", None),
            ("/api/images/99999", None),
            ("/api/regions/99999/overlay.png", None),
            ("/api/search", {"q": "x", "path": "[" * 20}),
        ]:
            res = c.get(url, params=params)
            assert res.status_code < 500, (url, res.text)
            texts.append(res.text)
        hits = c.get("/api/search", params={"q": "a photo", "k": 200}).json()["results"]
        uploaded = [h for h in hits if h["image_id"] == image_id]
        assert uploaded and all(h["image_path"] == data["path"] for h in uploaded)
        # the photo behind a relative path is still served
        assert c.get(f"/api/images/{image_id}/thumbnail.jpg").status_code == 200
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret, text[:300])


def test_huge_region_ids_are_not_found(demo: Demo, index_dir: Path) -> None:
    with _client(demo, index_dir) as c:
        for rid in (2**63, 2**63 + 5, 2**64, 10**30):
            for url in (f"/api/regions/{rid}", f"/api/regions/{rid}/overlay.png"):
                res = c.get(url)
                assert res.status_code == 404, (url, res.status_code, res.text)


# ----------------------------------------------------------------------------- serve and lock


def test_serve_missing_index_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "regionsearch.cli", "serve", "--name", "missing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # a runtime error
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], lines
    assert "Traceback" not in proc.stderr + proc.stdout


def test_running_server_does_not_block_the_indexer(demo: Demo, index_dir: Path) -> None:
    with _client(demo, index_dir, max_upload_bytes=200_000) as c:
        assert c.get("/api/stats").json()["uploads_enabled"] is True
        writer = RegionIndex.open(index_dir)  # what `regionsearch index` does; must not raise
        try:
            res = c.post("/api/images", files={"file": ("p.png", png_bytes(seed=11), "image/png")})
            assert res.status_code == 503, res.text  # the index is busy: try again later
            assert "regionsearch index" in res.json()["detail"]
            assert "read_only" not in res.json()["detail"]
            assert res.headers.get("retry-after")
        finally:
            writer.close()
        res = c.post("/api/images", files={"file": ("p.png", png_bytes(seed=11), "image/png")})
        assert res.status_code == 201, res.text
        writer = RegionIndex.open(index_dir)  # released again after the upload
        writer.close()
        hits = c.get("/api/search", params={"q": "a photo", "k": 200}).json()["results"]
        assert res.json()["id"] in {h["image_id"] for h in hits}, "upload not searchable"
