"""The query layer: ranking, thresholds, filters inside FAISS, one-per-image, refer, CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionsearch.backbone import Backbone
from regionsearch.backbone.tiny import tiny_loaded_model
from regionsearch.masks import rle as rle_mod
from regionsearch.search import RegionSearcher, SearchFilters, is_short_phrase
from regionsearch.search.postprocess import ResultOptions, open_set_penalty, results_for
from regionsearch.store import NewRegion, RegionIndex

DIM = 32
QUERY = "red umbrella"
EXPRESSION = "the dog on the left of the bench"


@dataclass
class Demo:
    directory: Path
    photos: Path
    backbone: Backbone
    ids: np.ndarray  # region ids, in insertion order
    vectors: np.ndarray  # their vectors
    image_of: dict[int, int]  # region id -> image id
    path_of: dict[int, str]  # image id -> stored path
    umbrella_region: int
    dog_region: int
    dog_image: int


@functools.lru_cache(maxsize=1)
def tiny_backbone() -> Backbone:
    """One tiny random backbone per session (shared by the search/API/web test modules)."""
    return Backbone(tiny_loaded_model(seed=0), device="cpu")


def exact_match_score(backbone: Backbone, text: str, embedder: str = "masked-crop") -> float:
    """The default searcher's score, on an index of ``embedder``, of a region whose vector *is*
    the query of ``text``: ``1 - calibration * q . t_bar`` plus the open-set term where that
    embedder's defaults have it (no objectness score, not degenerate; the other regions of its
    image are random vectors, far below the repetition floor)."""
    results = results_for(embedder)
    searcher = RegionSearcher(None, backbone, results=results)  # type: ignore[arg-type]
    query = searcher.encode_query(text)
    score = 1.0 - results.calibration * query @ searcher.calibration_direction()
    bank_cos = searcher.calibration_bank() @ query
    term = open_set_penalty([1.0], bank_cos[None, :], results.open_set_tau, results.open_set)
    return float(score + term[0])


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def build_demo_index(root: Path, backbone: Backbone | None = None, n_images: int = 6) -> Demo:
    """A small index with known vectors: images in folders a/ and b/, 3 regions each.

    One region of ``a/img1.png`` holds exactly the query vector of QUERY (templated), one region
    of ``b/img4.png`` exactly the vector of EXPRESSION (as typed); the rest are random.
    """
    backbone = backbone or tiny_backbone()
    photos = root / "photos"
    rng = np.random.default_rng(0)
    directory = root / "index"
    index = RegionIndex.create(
        directory, model=backbone.name, embedder="masked-crop", dimension=DIM
    )
    searcher = RegionSearcher(index, backbone)
    q_vec = searcher.encode_query(QUERY)
    e_vec = searcher.encode_query(EXPRESSION, templated=False)
    try:
        index.set_image_root(str(photos))
        items, paths = [], []
        for i in range(n_images):
            rel = f"{'a' if i < n_images // 2 else 'b'}/img{i}.png"
            path = photos / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            paths.append(rel)
            items.append({"path": rel, "width": 64, "height": 48})
        records = index.upsert_images(items)
        batch, all_vecs = [], []
        for n, rec in enumerate(records):
            regions, vecs = [], []
            for j in range(3):
                mask = np.zeros((48, 64), bool)
                mask[4 + 12 * j : 14 + 12 * j, 5 + 15 * j : 25 + 15 * j] = True
                rle = rle_mod.encode(mask)
                regions.append(
                    NewRegion(
                        rle=rle,
                        bbox=tuple(rle_mod.bbox(rle)),
                        area=float(mask.sum()),
                        source="proposal",
                    )
                )
                vecs.append(_unit(rng.normal(size=DIM)))
            if n == 1:
                vecs[2] = q_vec
            if n == 4:
                vecs[0] = e_vec
            vecs_arr = np.stack(vecs).astype(np.float32)
            batch.append((rec.id, regions, vecs_arr))
            all_vecs.append(vecs_arr)
        ids = index.add_images_regions(batch)
        index.checkpoint()
    finally:
        index.close()
    flat_ids = np.concatenate(ids)
    image_of = {int(r): rec.id for rec, chunk in zip(records, ids, strict=True) for r in chunk}
    return Demo(
        directory=directory,
        photos=photos,
        backbone=backbone,
        ids=flat_ids,
        vectors=np.concatenate(all_vecs),
        image_of=image_of,
        path_of={rec.id: rec.path for rec in records},
        umbrella_region=int(ids[1][2]),
        dog_region=int(ids[4][0]),
        dog_image=records[4].id,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo_index(tmp_path_factory.mktemp("search"))


@pytest.fixture
def searcher(demo: Demo):
    index = RegionIndex.open(demo.directory, read_only=True)
    yield RegionSearcher(index, demo.backbone, results=ResultOptions.plain())
    index.close()


def brute_force(demo: Demo, vec: np.ndarray, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    scores = demo.vectors @ vec
    ids = demo.ids
    if allowed is not None:
        keep = np.isin(ids, list(allowed))
        scores, ids = scores[keep], ids[keep]
    order = np.argsort(-scores, kind="stable")
    return scores[order], ids[order]


def test_prompt_rule() -> None:
    assert is_short_phrase("red umbrella")
    assert is_short_phrase("a red umbrella")
    assert not is_short_phrase("the dog on the left of the bench")
    assert not is_short_phrase("umbrella, red")


def test_ranking_equals_brute_force(demo: Demo, searcher: RegionSearcher) -> None:
    hits = searcher.search(QUERY, k=7)
    vec = searcher.encode_query(QUERY)
    scores, ids = brute_force(demo, vec)
    assert [h.region_id for h in hits] == ids[:7].tolist()
    np.testing.assert_allclose([h.score for h in hits], scores[:7], rtol=1e-5, atol=1e-5)
    assert hits[0].region_id == demo.umbrella_region
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    top = hits[0]
    assert top.image_path == demo.path_of[top.image_id]
    assert rle_mod.decode(top.rle).sum() == top.area
    assert len(top.bbox) == 4 and top.source == "proposal"
    assert searcher.last_timings["fetch_ms"] >= 0


def test_search_vector_matches_search(searcher: RegionSearcher) -> None:
    vec = searcher.encode_query(QUERY)
    a = [h.region_id for h in searcher.search_vector(vec, k=5)]
    b = [h.region_id for h in searcher.search(QUERY, k=5)]
    assert a == b


def test_reads_only_the_rows_the_bound_needs(demo: Demo, monkeypatch) -> None:
    """FAISS over-fetches 4k; SQL reads 2k rows first and stops there when the k-th kept hit
    already beats the next candidate; the hits are those of a search that read every row.
    (The superset rule is off here: it widens the bound by its margin.)"""
    index = RegionIndex.open(demo.directory, read_only=True)
    try:
        options = ResultOptions(superset_margin=None)
        searcher = RegionSearcher(index, demo.backbone, threads=1, results=options)
        everything = [(h.region_id, h.score) for h in searcher.search(QUERY, k=len(demo.ids))]
        read: list[int] = []
        original = index.fetch_regions

        def spy(ids, **kwargs):
            read.append(len(ids))
            return original(ids, **kwargs)

        monkeypatch.setattr(index, "fetch_regions", spy)
        for k in (1, 2, 3):
            read.clear()
            hits = searcher.search(QUERY, k=k)
            assert [(h.region_id, h.score) for h in hits] == everything[:k]
            assert sum(read) == 2 * k  # no region of the demo is dropped or demoted
    finally:
        index.close()
    with pytest.raises(ValueError, match="threads"):
        RegionSearcher(None, demo.backbone, threads=0)  # type: ignore[arg-type]


def test_min_score_can_return_nothing(searcher: RegionSearcher) -> None:
    assert searcher.search(QUERY, k=5, min_score=1.01) == []
    hits = searcher.search(QUERY, k=5, min_score=0.99)
    assert [h.score >= 0.99 for h in hits] == [True] * len(hits) and len(hits) == 1


def test_filters_are_passed_to_faiss(demo: Demo, searcher: RegionSearcher, monkeypatch) -> None:
    calls = []
    original = searcher.index.search

    def spy(queries, k, *, images=None, **kwargs):  # the plan's filter, as the pre-filter
        calls.append(searcher.index.region_filter(images.images))
        return original(queries, k, images=images, **kwargs)

    def images_of(selector) -> list[int]:
        return sorted({demo.image_of[r] for r in demo.image_of if selector.allows([r])[0]})

    monkeypatch.setattr(searcher.index, "search", spy)
    b_images = sorted(i for i, p in demo.path_of.items() if p.startswith("b/"))
    hits = searcher.search(QUERY, k=20, filters=SearchFilters(path_glob="b/*.png"))
    # resolved in SQL to id ranges, handed to the vector backend as one RegionFilter
    assert images_of(calls[-1]) == b_images and calls[-1].image_ids.tolist() == b_images
    assert hits and all(h.image_path.startswith("b/") for h in hits)
    allowed = [r for r, img in demo.image_of.items() if img in b_images]
    _, ids = brute_force(demo, searcher.encode_query(QUERY), allowed)
    assert [h.region_id for h in hits] == ids.tolist()  # all 9 allowed regions (pre or post)
    hits = searcher.search(QUERY, k=3, filters=SearchFilters(folder="a"))
    assert images_of(calls[-1]) == sorted(i for i, p in demo.path_of.items() if p.startswith("a/"))
    assert all(h.image_path.startswith("a/") for h in hits)
    absolute = str(demo.photos / "a" / "img1.png")
    hits = searcher.search(QUERY, k=3, filters=SearchFilters(path_glob=absolute))
    assert {h.image_path for h in hits} == {"a/img1.png"}
    assert searcher.search(QUERY, k=3, filters=SearchFilters(path_glob="zzz/*")) == []
    assert calls[-1].is_empty


def test_one_per_image(demo: Demo, searcher: RegionSearcher) -> None:
    hits = searcher.search(QUERY, k=4, one_per_image=True)
    images = [h.image_id for h in hits]
    assert len(images) == 4 and len(set(images)) == 4
    # each image's best region, images ordered by that score
    vec = searcher.encode_query(QUERY)
    _, ids = brute_force(demo, vec)
    best: dict[int, int] = {}
    for r in ids.tolist():
        best.setdefault(demo.image_of[r], r)
    assert [h.region_id for h in hits] == list(best.values())[:4]
    assert len(searcher.search(QUERY, k=50, one_per_image=True)) == len(demo.path_of)


def test_refer_picks_the_region(demo: Demo, searcher: RegionSearcher) -> None:
    result = searcher.refer(demo.dog_image, EXPRESSION, k=3)
    assert result.best is not None and result.best.region_id == demo.dog_region
    assert len(result.alternatives) == 2
    assert all(h.image_id == demo.dog_image for h in result.hits)
    assert result.best.score >= max(h.score for h in result.alternatives)
    other = next(i for i in demo.path_of if i != demo.dog_image)
    assert searcher.refer(other, EXPRESSION).best.region_id != demo.dog_region
    assert searcher.refer_collection(EXPRESSION, k=1)[0].region_id == demo.dog_region
    with pytest.raises(KeyError):
        searcher.refer(10_000, EXPRESSION)


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def cli(demo: Demo, monkeypatch):
    from typer.testing import CliRunner

    import regionsearch.cli.search as search_cli
    from regionsearch.cli import app

    monkeypatch.setattr(search_cli, "load_backbone", lambda *a, **k: demo.backbone)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def test_cli_search_json_and_show(demo: Demo, cli, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    res = cli(
        "search", QUERY, "--name", str(demo.directory), "--k", "3", "--json", "--show", str(sheet)
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.splitlines()[0])
    assert data["templated"] is True
    assert data["results"][0]["region_id"] == demo.umbrella_region
    assert len(data["results"]) == 3
    with Image.open(sheet) as im:
        assert im.width >= 256
    res = cli("search", QUERY, "--name", str(demo.directory), "--min-score", "1.5")
    assert res.exit_code == 0 and "no match" in res.stdout
    res = cli(
        "search", QUERY, "--name", str(demo.directory), "--path", "b/*", "--json", "--one-per-image"
    )
    paths = [r["image_path"] for r in json.loads(res.stdout)["results"]]
    assert paths and all(p.startswith("b/") for p in paths) and len(set(paths)) == len(paths)
    # default: calibrated scores; --plain: raw cosine (an exact match scores 1)
    scores = {}
    for flags in ((), ("--plain",)):
        res = cli("search", QUERY, "--name", str(demo.directory), "--k", "1", "--json", *flags)
        scores[flags] = json.loads(res.stdout)["results"][0]["score"]
    assert scores[("--plain",)] == pytest.approx(1.0, abs=1e-4)
    assert scores[()] == pytest.approx(exact_match_score(demo.backbone, QUERY), abs=1e-4)
    assert scores[()] != pytest.approx(1.0, abs=1e-3)
    # --open-set: the searcher's open-set term on top of the defaults (only ever lower)
    res = cli(
        "search", QUERY, "--name", str(demo.directory), "--k", "1", "--json", "--open-set", "2"
    )
    open_set_score = json.loads(res.stdout)["results"][0]["score"]
    index = RegionIndex.open(demo.directory, read_only=True)
    try:
        options = dataclasses.replace(results_for("masked-crop"), open_set=2.0)
        expected = RegionSearcher(index, demo.backbone, results=options).search(QUERY, k=1)
        assert RegionSearcher(index, demo.backbone).results == results_for("masked-crop")
    finally:
        index.close()
    assert open_set_score == pytest.approx(expected[0].score, abs=1e-5)
    assert open_set_score < scores[()]
    # a masked-crop index has the open-set term on by default; --open-set 0 turns it off
    res = cli(
        "search", QUERY, "--name", str(demo.directory), "--k", "1", "--json", "--open-set", "0"
    )
    assert json.loads(res.stdout)["results"][0]["score"] > scores[()]
    assert cli("search", QUERY, "--name", str(demo.directory), "--open-set", "-1").exit_code == 2
    assert cli("search", QUERY, "--name", str(demo.directory), "--repetition", "-1").exit_code == 2
    for bad in ("nan", "inf"):  # NaN would drop every result without a word
        res = cli("search", QUERY, "--name", str(demo.directory), "--min-score", bad)
        assert res.exit_code == 2 and "not a finite number" in res.output
    res = cli(
        "search",
        QUERY,
        "--name",
        str(demo.directory),
        "--k",
        "1",
        "--json",
        "--calibration",
        "0",
        "--open-set",
        "0",
    )
    uncalibrated = json.loads(res.stdout)["results"][0]["score"]
    assert uncalibrated == pytest.approx(scores[("--plain",)], abs=1e-4)  # the same exact match


def test_cli_refer_reads_a_photo_no_index_holds(demo: Demo, cli, tmp_path: Path) -> None:
    """A photo file outside the index is answered on the spot with the index's embedder (the
    default one without an index) and nothing is stored."""
    import shutil

    photo = tmp_path / "new.png"
    shutil.copy(demo.photos / demo.path_of[demo.dog_image], photo)
    before = RegionIndex.open(demo.directory, read_only=True)
    try:
        counts_before = (before.stats().images, before.stats().regions)
    finally:
        before.close()
    res = cli("refer", str(photo), EXPRESSION, "--name", str(demo.directory), "--json")
    assert res.exit_code == 0, res.output
    assert "not in index" in res.stderr and "nothing is stored" in res.stderr
    out = json.loads(res.stdout)
    assert out["image_id"] is None and out["candidates"] >= 1
    x, y, w, h = out["best"]["bbox"]
    assert min(x, y) >= 0 and x + w <= 64 and y + h <= 48 and out["best"]["source"]
    after = RegionIndex.open(demo.directory, read_only=True)
    try:
        assert (after.stats().images, after.stats().regions) == counts_before
    finally:
        after.close()
    shown = tmp_path / "shown.png"
    res = cli(
        "refer", str(photo), EXPRESSION, "--name", str(tmp_path / "none"), "--show", str(shown)
    )
    assert res.exit_code == 0 and "no index" in res.stderr and shown.is_file(), res.output


def test_cli_refer(demo: Demo, cli, tmp_path: Path) -> None:
    out = tmp_path / "refer.png"
    rel = demo.path_of[demo.dog_image]
    for image in (str(demo.dog_image), rel, str(demo.photos / rel)):
        res = cli(
            "refer", image, EXPRESSION, "--name", str(demo.directory), "--json", "--show", str(out)
        )
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout.splitlines()[0])
        assert data["best"]["region_id"] == demo.dog_region
    assert out.exists()
    missing = cli("refer", "no/such.png", EXPRESSION, "--name", str(demo.directory))
    assert missing.exit_code == 1 and "not in index" in missing.stderr  # a runtime error
    for args in (("refer", str(demo.dog_image), " "), ("search", "")):
        empty = cli(*args, "--name", str(demo.directory))
        assert empty.exit_code == 2 and empty.stderr.startswith("error: empty query")  # usage
