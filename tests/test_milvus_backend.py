"""Milvus specifics beyond the shared contract (tests/test_vector_backend_contract.py).

Locations and their errors, filters written as bounded expressions (checked against the
RegionFilter oracle), the image-id field, paged range search, schema checks on reopen, ANN
indexes, and the errors an operator sees when Milvus is not there. Runs on Milvus Lite.
Credentials: a password in a location never reaches manifest.json, the SQL manifest row or an
error message (pure URL handling and an unreachable server; no Milvus server needed).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from store_fixtures import oracle_search, unit_vectors

from regionsearch.store.backend import RegionFilter
from regionsearch.store.backends import open_vector_backend, scheme_for
from regionsearch.store.lock import release_writer_lock
from regionsearch.store.manifest import MANIFEST_JSON, ManifestInfo, write_manifest_json
from regionsearch.store.milvus import (
    MilvusBackend,
    MilvusCollectionNotFoundError,
    MilvusConnectionError,
    MilvusError,
)
from regionsearch.store.milvus_filters import filter_expressions, merged_ranges
from regionsearch.store.milvus_location import (
    PASSWORD_ENV,
    TOKEN_ENV,
    MilvusLocationError,
    index_from_factory,
    is_milvus_location,
    parse_milvus_url,
    without_password,
)
from regionsearch.store.opening import DB_FILE, locate_vectors, open_sql

D = 16


def _open(location: str | Path, **kwargs) -> MilvusBackend:
    kwargs.setdefault("dimension", D)
    return MilvusBackend.open(str(location), **kwargs)


@pytest.fixture
def lite(tmp_path: Path):
    backends: list[MilvusBackend] = []

    def opener(name: str = "vectors.db", **kwargs) -> MilvusBackend:
        backend = _open(tmp_path / name, **kwargs)
        backends.append(backend)
        return backend

    yield opener
    for b in backends:
        b.close()


def _fill(backend: MilvusBackend, n_images: int = 40, per_image: int = 6, seed: int = 0):
    """Images with contiguous id blocks (as RegionIndex allocates them), a gap between images."""
    image_ids = np.repeat(np.arange(1, n_images + 1), per_image)
    ids = image_ids * 10 + np.tile(np.arange(per_image), n_images)
    x = unit_vectors(ids.size, D, seed)
    backend.add(ids, x, image_ids=image_ids)
    return ids, image_ids, x


def _image_filter(image_ids_all: np.ndarray, ids: np.ndarray, images: np.ndarray) -> RegionFilter:
    """What RegionIndex builds for an image filter: one [min, max+1) range per image."""
    ranges = [
        (ids[image_ids_all == g].min(), ids[image_ids_all == g].max() + 1) for g in images.tolist()
    ]
    return RegionFilter(id_ranges=np.array(ranges, np.int64), image_ids=images)


# ----------------------------------------------------------------------------- locations


def test_server_url_parses_with_defaults_options_and_hidden_password():
    loc = parse_milvus_url("milvus://u:s3cret@milvus.example:19531/regions?index=hnsw&M=32&ef=128")
    assert loc.uri == "http://milvus.example:19531" and loc.collection == "regions"
    assert not loc.lite and loc.token == "u:s3cret"
    assert loc.index_type == "HNSW" and loc.build_params == {"M": 32}
    assert loc.search_params == {"ef": 128} and loc.consistency == "Strong"
    assert "s3cret" not in loc.display and loc.display.endswith("/regions")
    tls = parse_milvus_url("milvus+https://db.example/photos?consistency=bounded&timeout=5")
    assert tls.uri == "https://db.example:19530" and tls.consistency == "Bounded"
    assert tls.timeout == 5.0 and tls.index_type is None


def test_lite_forms_parse_to_an_absolute_db_path(tmp_path: Path, monkeypatch):
    url = parse_milvus_url(f"milvus-lite://{tmp_path}/v.db?collection=photos&index=FLAT")
    assert url.lite and url.uri == str(tmp_path / "v.db") and url.collection == "photos"
    monkeypatch.chdir(tmp_path)
    plain = parse_milvus_url("sub/vectors.db")
    assert plain.uri == str(tmp_path / "sub" / "vectors.db") and plain.collection == "regions"
    assert all(is_milvus_location(s) for s in ("a.db", "milvus://h/c", "milvus-lite:///a.db"))
    assert not is_milvus_location("a.faiss") and not is_milvus_location("s3://b/a.db")


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("milvus:///regions", "names no host"),
        ("milvus://host:19530", "names no collection"),
        ("milvus://host:99999/c", "bad port"),
        ("milvus://host/has-dash", "not a Milvus name"),
        ("milvus://host/c?index=NOPE", "unknown Milvus index type"),
        ("milvus://host/c?consistency=always", "consistency"),
        ("milvus://host/c?ef=1&ef=2", "given twice"),
        ("milvus://host/c?ef=", "has no value"),
        ("milvus://host/c?collection=x", "collection is the path"),
        ("milvus://host/c?timeout=-1", "timeout"),
        ("milvus-lite://host/x.db", "three slashes"),
        ("milvus-lite:///tmp/x.sqlite", "ends in .db"),
        ("milvus-lite:///tmp/x.db?db=other", "not Milvus Lite"),
        ("mivlus://host/c", "unknown scheme"),
        ("vectors.faiss", "not a Milvus location"),
    ],
)
def test_bad_locations_say_what_is_wrong(location: str, message: str):
    with pytest.raises(MilvusLocationError, match=message):
        parse_milvus_url(location)


def test_registry_routes_milvus_locations_to_this_backend():
    for location in ("x.db", "milvus://h:19530/c", "milvus+https://h/c", "milvus-lite:///x.db"):
        assert scheme_for(location).opener == "regionsearch.store.milvus:open_milvus"


def test_faiss_factories_map_to_milvus_indexes():
    assert index_from_factory(None) == (None, {})
    assert index_from_factory("IDMap2,Flat") == ("FLAT", {})
    assert index_from_factory("HNSW32") == ("HNSW", {"M": 32})
    assert index_from_factory("IVF1024,Flat") == ("IVF_FLAT", {"nlist": 1024})
    assert index_from_factory("gpu_cagra") == ("GPU_CAGRA", {})
    with pytest.raises(MilvusLocationError, match="no Milvus equivalent"):
        index_from_factory("OPQ32,IVF4096,PQ32")


def test_unreachable_server_names_the_url():
    with pytest.raises(MilvusConnectionError, match=r"milvus://127\.0\.0\.1:1/regions"):
        _open("milvus://127.0.0.1:1/regions?timeout=2")


# ----------------------------------------------------------------------------- credentials

SECRET = "s3cret-Pw"
SERVER = f"milvus://u:{SECRET}@127.0.0.1:1/regions?index=HNSW&ef=64&timeout=2"


def _new_index_sql(directory: Path):
    return open_sql(
        directory,
        model="m",
        embedder="e",
        dimension=D,
        factory=None,
        db_url=None,
        create=True,
        read_only=False,
        mmap=False,
        image_root=None,
    )


def _sql_manifest_extra(directory: Path) -> str:
    with sqlite3.connect(directory / DB_FILE) as con:
        return "".join(str(row[0]) for row in con.execute("SELECT extra FROM manifest"))


@pytest.mark.parametrize(
    ("location", "recorded"),
    [
        (SERVER, "milvus://u@127.0.0.1:1/regions?index=HNSW&ef=64&timeout=2"),
        (f"milvus+https://u:{SECRET}@h/c", "milvus+https://u@h/c"),
        ("milvus://u:p%40ss@h:19530/c?db=x", "milvus://u@h:19530/c?db=x"),
        ("milvus://h/c", "milvus://h/c"),
        ("/data/vectors.faiss", "/data/vectors.faiss"),
    ],
)
def test_without_password_keeps_everything_but_the_password(location: str, recorded: str):
    assert without_password(location) == recorded


def test_recorded_location_takes_its_password_from_the_environment():
    recorded = without_password(SERVER)
    given = parse_milvus_url(SERVER, env={})
    from_env = parse_milvus_url(recorded, env={PASSWORD_ENV: SECRET})
    assert given.token == from_env.token == f"u:{SECRET}"
    assert (given.uri, given.search_params) == (from_env.uri, from_env.search_params)
    assert parse_milvus_url("milvus://h/c", env={TOKEN_ENV: "api-key"}).token == "api-key"
    assert parse_milvus_url("milvus://h/c", env={}).token == ""
    with pytest.raises(MilvusLocationError, match=PASSWORD_ENV) as err:
        parse_milvus_url(recorded, env={})
    assert "'u'" in str(err.value)


def test_index_records_the_location_without_the_password(tmp_path: Path):
    directory = tmp_path / "idx"
    db, manifest, lock = _new_index_sql(directory)
    try:
        # Created with the full URL: the backend gets the password, the manifest does not.
        assert locate_vectors(db, directory, manifest, SERVER, read_only=False) == SERVER
        write_manifest_json(directory, manifest)
        on_disk = (directory / MANIFEST_JSON).read_text() + _sql_manifest_extra(directory)
        assert SECRET not in on_disk and without_password(SERVER) in on_disk
        assert SECRET not in (directory / DB_FILE).read_bytes().decode("latin-1")
        assert manifest.vector_backend == "milvus"
        # Reopened: with nothing asked, the recorded (password-free) location; with the full
        # URL, that URL; with another server, an error that quotes neither password.
        assert locate_vectors(db, directory, manifest, None, False) == without_password(SERVER)
        assert locate_vectors(db, directory, manifest, SERVER, False) == SERVER
        other = f"milvus://u:{SECRET}@elsewhere:1/regions"
        with pytest.raises(ValueError, match="keeps its vectors at") as err:
            locate_vectors(db, directory, manifest, other, False)
        assert SECRET not in str(err.value) and "elsewhere" in str(err.value)
    finally:
        db.dispose()
        release_writer_lock(lock)


def test_manifest_json_drops_a_password_recorded_before_the_rule():
    info = ManifestInfo(name="x", model="m", embedder="e", dimension=D, extra={"vectors": SERVER})
    data = info.to_json()
    assert SECRET not in json.dumps(data)
    assert data["extra"]["vectors"] == without_password(SERVER) and info.extra["vectors"] == SERVER


@pytest.mark.parametrize(
    ("location", "message"),
    [
        (f"milvus://u:{SECRET}@host:99999/c", "bad port"),
        (f"milvus://u:{SECRET}@host/has-dash", "not a Milvus name"),
        (f"milvus://u:{SECRET}@host/c?index=NOPE", "unknown Milvus index type"),
        (f"milvus://u:{SECRET}@host", "names no collection"),
        (f"milvus-lite://u:{SECRET}@host/x.db", "three slashes"),
        (f"mivlus://u:{SECRET}@host/c", "unknown scheme"),
    ],
)
def test_location_errors_never_show_the_password(location: str, message: str):
    with pytest.raises(MilvusLocationError, match=message) as err:
        parse_milvus_url(location)
    assert SECRET not in str(err.value)


def test_connection_errors_repr_and_stats_never_show_the_password(tmp_path: Path):
    loc = parse_milvus_url(SERVER)
    assert SECRET not in repr(loc) and SECRET not in loc.display
    assert loc.scrub(f"auth failed for u:{SECRET} ({SECRET})") == "auth failed for *** (***)"
    with pytest.raises(MilvusConnectionError) as err:
        _open(SERVER)
    assert SECRET not in str(err.value) and "127.0.0.1:1" in str(err.value)


def test_region_index_on_an_unreachable_server_keeps_the_password_off_disk(tmp_path: Path):
    from regionsearch.store.index import RegionIndex

    directory = tmp_path / "idx"
    with pytest.raises(MilvusConnectionError) as err:
        RegionIndex.open(
            directory, model="m", embedder="e", dimension=D, create=True, vectors_location=SERVER
        )
    assert SECRET not in str(err.value)
    assert without_password(SERVER) in _sql_manifest_extra(directory)
    assert SECRET not in (directory / DB_FILE).read_bytes().decode("latin-1")
    assert (
        not (directory / MANIFEST_JSON).exists()
        or SECRET not in (directory / MANIFEST_JSON).read_text()
    )


@pytest.mark.slow  # two interpreters importing pymilvus: ~7 s on the shared 2 cores
def test_lite_file_held_by_another_process_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "held.db"  # opened only in children: this process would hold it to exit
    holder = textwrap.dedent(
        f"""
        import sys, time
        from milvus_lite import MilvusLite
        db = MilvusLite({str(path)!r})
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    code = textwrap.dedent(
        f"""
        import subprocess, sys
        from regionsearch.store.milvus import MilvusBackend, MilvusConnectionError
        p = subprocess.Popen([sys.executable, "-c", {holder!r}], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        try:
            MilvusBackend.open({str(path)!r}, dimension={D})
        except MilvusConnectionError as exc:
            print("ERROR:", exc)
        finally:
            p.stdin.close()
            p.wait()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout
    assert "ERROR: could not connect to Milvus at" in out and "one process at a time" in out


def test_missing_lite_file_is_not_created_without_create(tmp_path: Path):
    with pytest.raises(MilvusCollectionNotFoundError):
        _open(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


# ----------------------------------------------------------------------------- filters


def test_merged_ranges_allow_exactly_what_the_ranges_allow():
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 500, 60)
    ranges = np.stack([starts, starts + rng.integers(-3, 25, 60)], axis=1)
    merged = merged_ranges(ranges)
    probe = np.arange(-5, 560)
    np.testing.assert_array_equal(
        RegionFilter(id_ranges=merged).allows(probe), RegionFilter(id_ranges=ranges).allows(probe)
    )
    assert (merged[1:, 0] > merged[:-1, 1]).all()  # disjoint, not even touching
    assert merged_ranges(np.array([[1, 5], [5, 9], [20, 21]])).tolist() == [[1, 9], [20, 21]]


def test_large_filters_are_split_into_bounded_expressions():
    images = np.arange(1, 301)
    filt = RegionFilter(
        id_ranges=np.stack([images * 10, images * 10 + 5], axis=1),
        image_ids=images,
        ids=np.arange(10_000, 10_050),
    )
    by_image = filter_expressions(filt, image_field_usable=True, max_terms=64)
    by_range = filter_expressions(filt, image_field_usable=False, max_terms=64)
    assert all("image_id in" in e or "id in" in e for e in by_image)
    assert not any("image_id" in e for e in by_range)
    assert len(by_image) == 6  # 300 images in 5 lists of <= 64, 50 ids in one more
    assert all(len(e) < 64 * 30 for e in by_image + by_range)  # bounded
    assert (
        filter_expressions(RegionFilter(id_ranges=np.empty((0, 2))), image_field_usable=True) == []
    )


@pytest.mark.parametrize("image_field", [True, False], ids=["image-ids", "unlabelled-rows"])
def test_filtered_search_matches_oracle_through_every_expression_form(lite, image_field):
    backend = lite(filter_terms=8)  # tiny expressions: many parts, merged top-k
    ids, image_ids, x = _fill(backend)
    if not image_field:  # one row without its image: image-id expressions would miss it
        backend.add([5], unit_vectors(1, D, seed=9), image_ids=None)
        ids, x = np.append(ids, 5), np.vstack([x, unit_vectors(1, D, seed=9)])
        image_ids = np.append(image_ids, 0)
    backend.remove(ids[::7])
    live = backend.contains(ids)
    chosen = np.arange(2, 40, 3)  # 13 images: more than RANGE_TERMS merged ranges
    filt = _image_filter(image_ids, ids, chosen)
    filt = RegionFilter(filt.id_ranges, filt.image_ids, ids=np.array([5, ids[-1], 10**9]))
    allowed = filt.allows(ids) & live
    q = unit_vectors(4, D, seed=3)
    scores, found = backend.search(q, 15, selector=filt)
    o_scores, o_ids = oracle_search(x[allowed], ids[allowed], q, 15)
    np.testing.assert_array_equal(found, o_ids)
    np.testing.assert_allclose(scores, o_scores, atol=1e-5)
    expressions = backend._expressions(filt)
    assert len(expressions) > 1
    assert any("image_id" in e for e in expressions) == image_field


def test_range_search_pages_past_the_result_limit(lite):
    backend = lite(max_topk=7)
    ids, _, x = _fill(backend)
    q = unit_vectors(1, D, seed=5)[0]
    scores, found = backend.range_search(q, 0.1)
    sims = x @ q
    assert found.size > 3 * 7  # several pages
    np.testing.assert_array_equal(np.sort(found), ids[sims >= 0.1])
    assert (np.diff(scores) <= 0).all()
    with pytest.raises(ValueError, match="limit of 7"):
        backend.search(q, 8)


# ----------------------------------------------------------------------------- collections


def test_reopen_checks_dimension_and_index_type(lite, tmp_path):
    lite().commit()
    with pytest.raises(MilvusError, match=f"holds {D}-d vectors, not 8-d"):
        _open(tmp_path / "vectors.db", dimension=8)
    with pytest.raises(MilvusError, match="indexed as FLAT, not HNSW"):
        _open(f"milvus-lite://{tmp_path}/vectors.db?index=HNSW")
    with pytest.raises(TypeError, match="unknown Milvus backend options"):
        _open(tmp_path / "vectors.db", colour="red")


def test_collections_in_one_file_are_separate(lite, tmp_path):
    a = lite()
    b = _open(f"milvus-lite://{tmp_path}/vectors.db?collection=other")
    try:
        a.add([1, 2], unit_vectors(2, D))
        b.add([3], unit_vectors(1, D, seed=1))
        assert a.ids().tolist() == [1, 2] and b.ids().tolist() == [3]
        assert b.stats()["collection"] == "other" and b.stats()["kind"] == "milvus-lite"
    finally:
        b.close()


def test_reader_created_before_the_collection_sees_it_after_refresh(lite):
    reader = lite(read_only=True, create=True)
    assert reader.ntotal == 0 and reader.ids().size == 0 and not reader.refresh()
    writer = lite()
    writer.add([4, 8], unit_vectors(2, D), image_ids=[1, 1])
    writer.commit()
    assert reader.refresh() and reader.ids().tolist() == [4, 8]


def test_hnsw_index_with_search_params_finds_each_vector_itself(tmp_path):
    backend = _open(f"milvus-lite://{tmp_path}/ann.db?index=HNSW&M=16&efConstruction=64&ef=64")
    try:
        ids, _, x = _fill(backend, n_images=30)
        backend.commit()
        _, found = backend.search(x[:20], 1)
        assert (found[:, 0] == ids[:20]).mean() >= 0.95
        stats = backend.stats()
        assert stats["index_type"] == "HNSW" and stats["search_params"] == {"ef": 64}
        assert not backend.on_gpu
    finally:
        backend.close()


def test_open_vector_backend_passes_factory_and_search_options(tmp_path):
    backend = open_vector_backend(
        str(tmp_path / "f.db"),
        dimension=D,
        factory="HNSW32",
        read_only=False,
        create=True,
        ef=48,
        mmap=False,  # a FAISS option: accepted, meaningless here
    )
    try:
        assert backend.stats()["index_type"] == "HNSW"
        assert backend.stats()["search_params"] == {"ef": 48}
    finally:
        backend.close()
