"""Image filters -> RegionFilter (SQL id ranges) -> FAISS selectors, against brute-force oracles.

The index is built by random operations (batches of images, deletes, re-indexing with new ids,
failures, an image whose regions stop being contiguous) while a plain Python model keeps which
region ids are live per image; every filter is then checked against that model and every
filtered search against numpy brute force over the allowed vectors.
"""

from __future__ import annotations

import fnmatch

import faiss
import numpy as np
import pytest
from sqlalchemy import select, text
from store_fixtures import make_regions, oracle_search, unit_vectors

from regionsearch.store import ImageFilter, RegionFilter, open_database
from regionsearch.store import sql as sql_mod
from regionsearch.store.db import alembic_config, create_db_engine
from regionsearch.store.faiss_filters import region_selector
from regionsearch.store.filter_ops import (
    allowed_ids,
    filter_bits,
    filter_mask,
    intersect,
    merged_ranges,
)
from regionsearch.store.models import Image
from regionsearch.store.region_filters import region_filter

D = 16
PATHS = [
    *(f"f0/a{i}.jpg" for i in range(6)),
    *(f"f1/sub/b{i}.png" for i in range(6)),
    *(f"f1/c{i}.png" for i in range(5)),
    "f10/x.jpg",  # a folder 'f1' must not match 'f10'
    "a_b%/odd.jpg",  # LIKE wildcards in a folder name
    "top.jpg",
]


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


class Model:
    """What the index should hold: live region ids per image, and every vector ever added."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}
        self.vectors: dict[int, np.ndarray] = {}

    def added(self, image_id: int, ids: np.ndarray, vecs: np.ndarray, replace: bool) -> None:
        kept = [] if replace else self.live.get(image_id, [])
        self.live[image_id] = kept + ids.tolist()
        self.vectors.update(zip(ids.tolist(), vecs, strict=True))

    def allowed(self, paths: dict[int, str], f: ImageFilter) -> np.ndarray:
        out = []
        for image_id, path in paths.items():
            if f.path_glob and not fnmatch.fnmatchcase(path, f.path_glob):
                continue
            if f.folder and not path.startswith(f.folder.rstrip("/") + "/"):
                continue
            if f.image_ids is not None and image_id not in set(f.image_ids):
                continue
            out += self.live.get(image_id, [])
        return np.asarray(sorted(out), dtype=np.int64)


def _build(index, seed: int) -> tuple[Model, dict[int, str]]:
    rng = np.random.default_rng(seed)
    model = Model()
    records = index.upsert_images([{"path": p} for p in PATHS])
    paths = {r.id: r.path for r in records}
    ids = list(paths)
    counter = iter(range(10_000))

    def batch(image_ids: list[int], replace: bool = True) -> None:
        items = []
        for image_id in image_ids:
            n = int(rng.integers(0, 6))
            items.append((image_id, make_regions(n), unit_vectors(n, D, next(counter))))
        new_ids = index.add_images_regions(items, replace=replace)
        for (image_id, _, vecs), got in zip(items, new_ids, strict=True):
            model.added(image_id, got, vecs, replace)

    for start in range(0, len(ids), 7):  # several images per batch, as the indexer does
        batch(ids[start : start + 7])
    index.checkpoint()
    for image_id in rng.choice(ids, size=5, replace=False).tolist():  # re-indexed: new ids
        batch([image_id])
    gone = [i for i in rng.choice(ids, size=3, replace=False).tolist() if model.live.get(i)]
    index.delete_images(gone)
    for image_id in gone:
        model.live[image_id] = []
    failed = next(i for i in ids if model.live.get(i) and i not in gone)
    index.mark_image_failed(failed, "unreadable")
    model.live[failed] = []
    scattered = next(i for i in ids if model.live.get(i))
    batch([ids[-1]])  # takes the next ids...
    batch([scattered], replace=False)  # ...so this image's live ids are no longer contiguous
    index.checkpoint()
    return model, paths


FILTERS = [
    ImageFilter(path_glob="f1/*"),
    ImageFilter(path_glob="*.png"),
    ImageFilter(path_glob="f0/a?.jpg"),
    ImageFilter(path_glob="*sub*"),
    ImageFilter(path_glob="nothing/*"),
    ImageFilter(folder="f1"),
    ImageFilter(folder="f1/sub/"),
    ImageFilter(folder="a_b%"),
    ImageFilter(folder="F1"),  # case-sensitive on every database
    ImageFilter(path_glob="*.jpg", folder="f0"),
]


def _with_ids(paths: dict[int, str], seed: int) -> list[ImageFilter]:
    rng = np.random.default_rng(seed)
    some = sorted(rng.choice(list(paths), size=8, replace=False).tolist())
    return [
        ImageFilter(image_ids=some),
        ImageFilter(image_ids=[]),
        ImageFilter(image_ids=[*some, 10**6]),  # unknown ids allow nothing more
        ImageFilter(path_glob="f1/*", image_ids=some),
        ImageFilter(image_ids=list(paths)),  # every image
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_region_filter_equals_oracle(open_index, seed, monkeypatch):
    index = open_index()
    model, paths = _build(index, seed)
    every_id = np.arange(max(model.vectors) + 2, dtype=np.int64)
    for chunk in (None, 3):  # 3: long image-id lists are tested in numpy, not SQL IN lists
        if chunk is not None:
            monkeypatch.setattr(sql_mod, "SQL_CHUNK", chunk)
        for f in FILTERS + _with_ids(paths, seed):
            got = index.region_filter(f)
            expected = model.allowed(paths, f)
            np.testing.assert_array_equal(every_id[got.allows(every_id)], expected, str(f))
            np.testing.assert_array_equal(allowed_ids(got), expected)
            assert got.is_empty == (expected.size == 0)


def _merge_reference(spans: list[tuple[int, int]]) -> list[list[int]]:
    """Touching or overlapping half-open spans merged, the obvious way."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def test_image_filter_is_merged_ranges_of_contiguous_images(open_index):
    index = open_index()
    model, paths = _build(index, 0)
    got = index.region_filter(ImageFilter(image_ids=list(paths)))
    with_regions = [i for i, live in model.live.items() if live]
    scattered = [
        i for i in with_regions if max(model.live[i]) - min(model.live[i]) + 1 > len(model.live[i])
    ]
    assert len(scattered) == 1  # the image added to without replace
    spans = [
        (min(model.live[i]), max(model.live[i]) + 1) for i in with_regions if i not in scattered
    ]
    merged = _merge_reference(spans)
    assert len(merged) < len(spans)  # images of one batch are adjacent: their ranges merge
    assert got.id_ranges.tolist() == merged
    assert sorted(got.ids.tolist()) == sorted(model.live[scattered[0]])
    assert got.image_ids.tolist() == sorted(with_regions)


# ----------------------------------------------------------------------------- spans on image rows


def _image_spans(index) -> dict[int, tuple[int | None, int | None, int]]:
    q = select(Image.id, Image.region_id_start, Image.region_id_end, Image.live_regions)
    with index.session() as s:
        return {int(i): (a, b, int(n)) for i, a, b, n in s.execute(q)}


def _expected_spans(live: dict[int, list[int]], image_ids) -> dict[int, tuple]:
    return {
        i: (min(live[i]), max(live[i]) + 1, len(live[i])) if live.get(i) else (None, None, 0)
        for i in image_ids
    }


def test_image_spans_stay_exact_through_writes_and_reconcile(open_index):
    """Adds, re-indexing, deletes, failures, a non-contiguous add, images without regions, and
    pending rows dropped by reconciliation after a crash: every image row's span is exact."""
    index = open_index()
    model, paths = _build(index, 2)
    assert any(not model.live.get(i) for i in paths)  # some images hold no region
    assert _image_spans(index) == _expected_spans(model.live, paths)
    # crash before C1: a re-index (old rows tombstoned, committed at W1) and an append (old rows
    # stay live) whose new pending rows reconciliation drops
    rng = np.random.default_rng(9)
    with_regions = [i for i in paths if model.live.get(i)]
    replaced, appended = with_regions[:2]
    items = [
        (i, make_regions(3), unit_vectors(3, D, seed=int(rng.integers(1000)))) for i in (replaced,)
    ]
    index.add_images_regions(items, replace=True)
    index.add_images_regions(
        [(appended, make_regions(2), unit_vectors(2, D, seed=3))], replace=False
    )
    assert _image_spans(index)[appended][2] == len(model.live[appended]) + 2
    index._abandon()  # the process dies: no checkpoint
    index = open_index(existing=True)
    assert index.last_reconcile.pending_dropped == 5
    model.live[replaced] = []
    assert _image_spans(index) == _expected_spans(model.live, paths)
    f = ImageFilter(image_ids=list(paths))
    np.testing.assert_array_equal(allowed_ids(index.region_filter(f)), model.allowed(paths, f))


def _upgrade(engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


#: (image id, path, [(region id, deleted)]) written at revision 0002, before spans existed
OLD_ROWS = [
    (1, "a/x.jpg", [(1, False), (2, False), (3, False)]),
    (2, "a/y.jpg", [(4, True), (5, True), (8, False), (9, False)]),  # re-indexed
    (3, "b/z.png", [(6, False), (7, False), (10, False)]),  # not contiguous
    (4, "b/w.png", []),  # no region
    (5, "c.jpg", [(11, True)]),  # only deleted regions
    (6, "b/v.png", [(12, False)]),
]


def test_migration_0003_backfills_spans(raw_db_url):
    """An index written at revision 0002 gets exact spans on upgrade and filters correctly."""
    engine = create_db_engine(raw_db_url)
    try:
        _upgrade(engine, "0002")
        with engine.begin() as conn:
            for image_id, path, regions in OLD_ROWS:
                conn.execute(
                    text("INSERT INTO images (id, path, status) VALUES (:i, :p, 'indexed')"),
                    {"i": image_id, "p": path},
                )
                for rid, deleted in regions:
                    conn.execute(
                        text(
                            "INSERT INTO regions (id, image_id, rle, bbox_x, bbox_y, bbox_w, "
                            "bbox_h, area, source, embedder, vector_state, deleted) VALUES "
                            "(:r, :i, '{}', 0, 0, 1, 1, 1, 'png', 'e', 'committed', :d)"
                        ),
                        {"r": rid, "i": image_id, "d": deleted},
                    )
    finally:
        engine.dispose()
    db = open_database(raw_db_url)  # upgrades to head
    try:
        live = {i: [r for r, d in regions if not d] for i, _, regions in OLD_ROWS}
        with db.session() as s:
            got = {
                int(i): (a, b, int(n))
                for i, a, b, n in s.execute(
                    select(Image.id, Image.region_id_start, Image.region_id_end, Image.live_regions)
                )
            }
        assert got == _expected_spans(live, live)
        paths = {i: p for i, p, _ in OLD_ROWS}
        model = Model()
        model.live = live
        for f in [
            ImageFilter(folder="b"),
            ImageFilter(path_glob="*.jpg"),
            ImageFilter(image_ids=[2, 3, 4, 5]),
            ImageFilter(),
        ]:
            with db.engine.connect() as conn:
                filt = region_filter(conn, f, db.dialect)
            np.testing.assert_array_equal(allowed_ids(filt), model.allowed(paths, f), str(f))
    finally:
        db.dispose()


def test_filtered_search_equals_brute_force(open_index):
    index = open_index()
    model, paths = _build(index, 1)
    q = unit_vectors(3, D, seed=77)
    for f in [*FILTERS, *_with_ids(paths, 1)]:
        selector = index.region_filter(f)
        allowed = model.allowed(paths, f)
        for k in (1, 5, 40):
            scores, found = index.search(q, k, selector=selector)
            vecs = (
                np.stack([model.vectors[i] for i in allowed]) if allowed.size else np.empty((0, D))
            )
            o_scores, o_ids = oracle_search(vecs, allowed, q, k)
            np.testing.assert_array_equal(found, o_ids, err_msg=str(f))
            np.testing.assert_allclose(scores, o_scores, atol=1e-5)
    reopened_ids = index.vectors.ids()
    index.close()
    again = open_index(existing=True, read_only=True)
    np.testing.assert_array_equal(again.vectors.ids(), reopened_ids)
    f = ImageFilter(path_glob="f1/*")
    np.testing.assert_array_equal(allowed_ids(again.region_filter(f)), model.allowed(paths, f))


def test_search_image_ids_and_region_ids_combine(open_index):
    index = open_index()
    model, _ = _build(index, 0)
    images = [i for i, live in model.live.items() if len(live) >= 2][:3]
    region_ids = [model.live[images[0]][0], model.live[images[1]][-1], 10**6]
    q = unit_vectors(1, D, seed=5)
    _, found = index.search(q, 10, image_ids=images[:2], region_ids=region_ids)
    assert sorted(found[0][found[0] >= 0].tolist()) == sorted(region_ids[:2])


# ----------------------------------------------------------------------------- numpy / FAISS


def _random_filter(rng: np.random.Generator, span: int) -> RegionFilter:
    n = int(rng.integers(0, 6))
    starts = rng.integers(-3, span, size=n)
    ranges = np.stack([starts, starts + rng.integers(0, 40, size=n)], axis=1)
    ids = rng.integers(-2, span + 5, size=int(rng.integers(0, 8)))
    return RegionFilter(id_ranges=ranges.astype(np.int64), ids=ids.astype(np.int64))


def test_filter_ops_agree_with_allows():
    rng = np.random.default_rng(3)
    probe = np.arange(0, 260, dtype=np.int64)  # ids are never negative (the contract)
    for _ in range(200):
        f = _random_filter(rng, 200)
        ref = f.allows(probe)
        np.testing.assert_array_equal(allowed_ids(f), probe[ref])
        mask = filter_mask(f, 230)
        np.testing.assert_array_equal(mask, ref[probe < 230])
        g = _random_filter(rng, 200)
        np.testing.assert_array_equal(intersect(f, g).allows(probe), ref & g.allows(probe))
        merged = merged_ranges(f.id_ranges)
        np.testing.assert_array_equal(
            RegionFilter(id_ranges=merged).allows(probe), _ranges_allow(f, probe)
        )
        assert merged.tolist() == _merge_reference(
            [(a, b) for a, b in f.id_ranges.tolist() if b > a]
        )


def _ranges_allow(f: RegionFilter, probe: np.ndarray) -> np.ndarray:
    return RegionFilter(id_ranges=f.id_ranges).allows(probe)


def test_filter_bits_are_the_mask_packed_minus_exclude():
    """Bytes painted whole, partial bytes at range ends, ids and exclusions: bit for bit."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        span = int(rng.integers(0, 400))
        n = int(rng.integers(0, 30))
        starts = rng.integers(-5, span + 5, size=n)
        ranges = np.stack([starts, starts + rng.integers(0, 70, size=n)], axis=1)
        ids = rng.integers(-3, span + 3, size=int(rng.integers(0, 10)))
        f = RegionFilter(id_ranges=ranges.astype(np.int64), ids=ids.astype(np.int64))
        exclude = rng.integers(-3, span + 3, size=int(rng.integers(0, 10)))
        probe = np.arange(span, dtype=np.int64)
        expected = f.allows(probe) & ~np.isin(probe, exclude)
        bits = filter_bits(f, span, exclude)
        assert bits.dtype == np.uint8 and bits.size == (span + 7) // 8
        np.testing.assert_array_equal(bits, np.packbits(expected, bitorder="little"))


def test_faiss_selector_agrees_with_allows():
    rng = np.random.default_rng(4)
    probe = np.arange(0, 300, dtype=np.int64)
    for trial in range(200):
        f = _random_filter(rng, 250)
        if trial % 3 == 0:  # the single-range path
            f = RegionFilter(
                id_ranges=f.id_ranges[:1] if len(f.id_ranges) else np.empty((0, 2), np.int64)
            )
        exclude = rng.integers(0, 300, size=int(rng.integers(0, 5))) if trial % 2 else None
        max_id = int(rng.integers(0, 300))
        sel = region_selector(f, max_id=max_id, exclude=exclude)
        got = np.array([sel.selector.is_member(int(i)) for i in probe])
        expected = f.allows(probe) & (probe <= max_id)
        if exclude is not None:
            expected &= ~np.isin(probe, exclude)
        np.testing.assert_array_equal(got, expected)
        assert isinstance(sel.selector, faiss.IDSelector)


def test_glob_to_regex_matches_fnmatch():
    """PostgreSQL filters by this regex: it must accept exactly what fnmatch accepts."""
    import re

    from regionsearch.store.region_filters import glob_to_regex

    patterns = ["f1/*", "*.png", "f0/a?.jpg", "*sub*", "a[bc]*", "a[!b]x", "[", "x[]]y", "*[0-9]*"]
    names = ["f1/a.png", "f1/sub/b.png", "f0/ab.jpg", "x/sub/y", "abx", "acx", "a]x", "x]y"]
    names += ["[", "ax", "q9r", "a.png.bak", "f1"]
    for p in patterns:
        rx = glob_to_regex(p)
        for name in names:
            assert bool(re.fullmatch(rx, name)) == fnmatch.fnmatchcase(name, p), (p, name, rx)
