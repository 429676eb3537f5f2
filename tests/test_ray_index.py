"""``index --ray``: images embedded on Ray Data actors, stored by the driver's single writer.

A local Ray cluster (3 logical CPUs) is started once for the module; a few generated world scenes, one
corrupt file, the bundled reference model and CPU actors. The single-process run is the
reference: the Ray runs must store the same regions with the same vectors (cosine >= 0.9999),
fail the same file for the same reason, and resume an interrupted run without losing or
doubling anything.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from regionsearch.backbone import load_backbone
from regionsearch.cli.index import register
from regionsearch.embedders import get_embedder
from regionsearch.eval.world.cli import world_app
from regionsearch.indexer import Indexer
from regionsearch.masks import AutomaticProposals
from regionsearch.store import RegionIndex

ray = pytest.importorskip("ray")

from regionsearch.indexer.distributed import (  # noqa: E402  (after the skip)
    EmbedderSpec,
    RayClusterError,
    RayMapper,
    check_reachable,
)

pytestmark = pytest.mark.slow  # a Ray cluster and its actors start in seconds, not ms

MAX_REGIONS = 5
BATCH_IMAGES = 2


#: Ray waits a fixed 30 s for its raylet to register; on a loaded 2-core CI host that once ran out.
CLUSTER_START_ATTEMPTS = 3


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local cluster; startup is retried, and a host that cannot start one skips, not fails.

    Whether this host can start Ray's processes in time is not what these tests check; what the
    cluster then stores is, and that still fails loudly.
    """
    for _ in range(CLUSTER_START_ATTEMPTS):
        try:
            # 3 logical CPUs: 2 actors and the decode + mask tasks of the split pipeline
            ray.init(num_cpus=3, include_dashboard=False, logging_level="warning")
            break
        except Exception as error:  # Ray raises a bare Exception on a startup timeout
            last_error = f"{type(error).__name__}: {error}"
            ray.shutdown()
            time.sleep(5)
    else:
        pytest.skip(f"no local Ray cluster started in {CLUSTER_START_ATTEMPTS} tries: {last_error}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five world scenes (``regionsearch world generate``) and one truncated PNG."""
    out = tmp_path_factory.mktemp("world")
    result = CliRunner().invoke(
        world_app, ["generate", str(out), "--n", "5", "--size", "64", "--seed", "11"]
    )
    assert result.exit_code == 0, result.output
    images = out / "images"
    data = next(images.glob("*.png")).read_bytes()
    (images / "broken.png").write_bytes(data[: len(data) // 3])
    return images


@pytest.fixture(scope="module")
def embedder():
    return get_embedder("maskinversion", load_backbone("reference", device="cpu"))


def new_index(path: Path, embedder) -> RegionIndex:
    backbone = embedder.backbone
    return RegionIndex.create(
        path, model=backbone.name, embedder=embedder.name, dimension=backbone.embed_dim
    )


def run(index: RegionIndex, embedder, photos: Path, mapper=None):
    indexer = Indexer(
        index,
        embedder.backbone,
        embedder,
        AutomaticProposals(max_regions=MAX_REGIONS),
        workers=0,
        batch_images=BATCH_IMAGES,
        progress=False,
        mapper=mapper,
    )
    return indexer.run(photos)


def contents(path: Path) -> dict[str, list[tuple[str, tuple, np.ndarray]]]:
    """path -> [(RLE counts, bbox, vector)] of every live region, and a consistency check."""
    out = {}
    with RegionIndex.open(path, read_only=True) as index:
        live = []
        for rec in index.iter_images():
            regions = index.regions_of_image(rec.id)
            ids = np.array([r.id for r in regions], dtype=np.int64)
            live.extend(ids.tolist())
            vectors = index.vectors.reconstruct(ids) if len(ids) else np.empty((0, 0))
            out[rec.path] = [
                (str(r.rle["counts"]), tuple(r.bbox), v)
                for r, v in zip(regions, vectors, strict=True)
            ]
        assert sorted(index.vectors.ids().tolist()) == sorted(live)  # nothing doubled or lost
    return out


def assert_same(expected: dict, got: dict) -> None:
    assert got.keys() == expected.keys()
    for path, regions in expected.items():
        assert [(c, b) for c, b, _ in got[path]] == [(c, b) for c, b, _ in regions], path
        for (_, _, a), (_, _, b) in zip(regions, got[path], strict=True):
            cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            assert cosine >= 0.9999, (path, cosine)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos, embedder):
    """The single-process run: its report and what it stored."""
    path = tmp_path_factory.mktemp("single") / "idx"
    with new_index(path, embedder) as index:
        report = run(index, embedder, photos)
    assert report.images_indexed == 5 and report.images_failed == 1
    return report, contents(path)


def test_ray_stores_what_the_single_process_run_stores(
    tmp_path, ray_local, photos, embedder, reference
):
    """Two actors, the pipeline GPU actors use (decode + masks as tasks ahead of them)."""
    expected_report, expected = reference
    mapper = RayMapper(EmbedderSpec.of(embedder, "reference"), actors=2, split=True)
    with new_index(tmp_path / "idx", embedder) as index:
        report = run(index, embedder, photos, mapper)
        stats = index.stats()
    assert not report.interrupted
    assert report.images_indexed == 5 and report.regions_indexed == stats.regions
    assert report.failures == expected_report.failures  # the corrupt file, the same reason
    assert "broken.png" in report.failures[0][0] and "decode" in report.failures[0][1]
    assert_same(expected, contents(tmp_path / "idx"))


class InterruptAfter:
    """Ctrl-C as the writer sees it: raised while it waits for the next image."""

    def __init__(self, inner: RayMapper, images: int) -> None:
        self.inner, self.images = inner, images

    def map(self, items, job, report):
        outcomes = self.inner.map(items, job, report)
        try:
            for _ in range(self.images):
                yield next(outcomes)
            raise KeyboardInterrupt
        finally:
            outcomes.close()


def test_interrupted_ray_run_resumes_with_nothing_lost_or_doubled(
    tmp_path, ray_local, photos, embedder, reference
):
    _, expected = reference
    location = tmp_path / "idx"
    mapper = InterruptAfter(RayMapper(EmbedderSpec.of(embedder, "reference"), actors=1), 3)
    with new_index(location, embedder) as index:
        first = run(index, embedder, photos, mapper)
        statuses = [rec.status for rec in index.iter_images()]
    assert first.interrupted
    assert first.images_indexed + first.images_failed == 3  # the 3rd is stored on Ctrl-C
    assert statuses.count("pending") == 6 - 3
    # resume through the CLI, on the cluster this process runs (the JSON report says what)
    app = typer.Typer()
    register(app)
    args = ["index", str(photos), "--name", str(location), "--ray", "--ray-actors", "1"]
    args += ["--model", "reference", "--max-regions", str(MAX_REGIONS), "--json", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 3), result.output  # 3: the corrupt file failed
    second = json.loads(result.stdout[result.stdout.index("{") :])
    assert second["images_indexed"] == 5 - first.images_indexed
    assert_same(expected, contents(location))


def test_unreachable_address_fails_fast_naming_it(tmp_path, photos):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = typer.Typer()
    register(app)
    address = f"127.0.0.1:{port}"
    start = time.monotonic()
    result = CliRunner().invoke(
        app, ["index", str(photos), "--name", str(tmp_path / "idx"), "--ray-address", address]
    )
    assert time.monotonic() - start < 10  # ray.init alone retries for minutes
    assert result.exit_code == 1
    assert f"cannot reach a Ray cluster at '{address}'" in result.output
    assert not (tmp_path / "idx").exists()  # checked before anything is created
    with pytest.raises(RayClusterError, match="expected HOST:PORT"):
        check_reachable("head-node-without-port")
