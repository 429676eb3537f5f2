"""RegionIndex and the SQL side: migrations, manifest checks, the SQL/FAISS protocol (reconcile
and kill -9: tests/test_store_reconcile.py).

Tests taking ``open_index``/``db_url``/``raw_db_url`` run on SQLite and, when
REGIONSEARCH_TEST_PG_URL is set, on PostgreSQL too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from store_fixtures import add_image_with_regions, assert_consistent, make_regions, unit_vectors

from regionsearch.store import (
    ImageStatus,
    IndexDatabaseError,
    IndexLockedError,
    IndexMismatchError,
    IndexNotFoundError,
    ReadOnlyIndexError,
    RegionIndex,
    SchemaTooNewError,
    migrations_dir,
    open_database,
)
from regionsearch.store import images as images_mod
from regionsearch.store import sql as sql_mod
from regionsearch.store.db import current_revisions, head_revisions
from regionsearch.store.models import Base, Region

D = 16
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


# ----------------------------------------------------------------------------- migrations


def test_migrations_are_shipped_inside_the_package():
    d = migrations_dir()
    assert d == REPO / "regionsearch" / "store" / "migrations"
    assert (d / "env.py").exists() and (d / "script.py.mako").exists()
    assert (d / "versions" / "0001_initial.py").exists()
    assert (REPO / "migrations" / "README.md").exists()


def test_migrations_create_schema_and_are_idempotent(raw_db_url):
    db = open_database(raw_db_url)
    try:
        tables = set(sa.inspect(db.engine).get_table_names())
        assert {"images", "regions", "manifest", "alembic_version"} <= tables
        assert current_revisions(db.engine) == head_revisions() == {"0003"}
    finally:
        db.dispose()
    db = open_database(raw_db_url)  # second time: nothing to do, nothing breaks
    try:
        assert current_revisions(db.engine) == {"0003"}
        # the migrations produce exactly what the models declare
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        db.dispose()


def test_sqlite_gets_wal_and_foreign_keys(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(sa.exc.IntegrityError), db.session() as s:
            s.add(
                Region(
                    image_id=12345,
                    rle={"size": [1, 1], "counts": "1"},
                    bbox_x=0,
                    bbox_y=0,
                    bbox_w=1,
                    bbox_h=1,
                    area=1,
                    source="png",
                    embedder="e",
                )
            )
    finally:
        db.dispose()


def test_database_from_a_newer_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    open_database(url).dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    with pytest.raises(SchemaTooNewError, match="9999"):
        open_database(url)


# ----------------------------------------------------------------------------- basics


def test_create_add_checkpoint_search_fetch(open_index):
    index = open_index()
    _img_a, ids_a, vecs_a = add_image_with_regions(index, "a.jpg", 4, seed=1)
    img_b, ids_b, vecs_b = add_image_with_regions(index, "sub/b.png", 3, seed=2)
    assert len(ids_a) == 4 and len(ids_b) == 3 and ids_b.min() > ids_a.max()
    st = index.stats()
    assert st.regions_pending == 7 and st.regions == 0 and st.unflushed == 7
    assert index.get_image("a.jpg").status == "pending"
    index.checkpoint()
    st = index.stats()
    assert st.regions == 7 and st.regions_pending == 0 and st.vectors == 7
    assert st.images["indexed"] == 2 and st.unflushed == 0
    assert index.get_image("a.jpg").indexed_at is not None
    # search -> ids -> fetch in FAISS order
    scores, found = index.search(vecs_b[1], 3)
    assert found[0, 0] == ids_b[1] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    order = [int(ids_b[2]), int(ids_a[0]), -1, int(ids_a[3]), 10**9]
    records = index.fetch_regions(order)
    assert [r.id for r in records] == [order[0], order[1], order[3]]
    rec = records[0]
    assert rec.image_path == "sub/b.png" and rec.image_width == 48 and rec.image_height == 32
    assert rec.rle == make_regions(3)[2].rle and rec.bbox == (2.0, 1.0, 7.0, 6.0)
    assert rec.source == "proposal" and rec.embedder == "test-embedder"
    assert rec.external_id == "1002" and rec.vector_state == "committed"
    # filtered search by image
    _, found = index.search(vecs_a[0], 5, image_ids=[img_b.id])
    assert set(found[0][found[0] >= 0]) == set(ids_b.tolist())
    _s, f = index.range_search(vecs_a[2], 0.99)
    assert f.tolist() == [ids_a[2]]
    assert_consistent(index)


def test_fetch_regions_chunks_and_keeps_order(open_index, monkeypatch):
    index = open_index()
    _, ids, _ = add_image_with_regions(index, "a.jpg", 25)
    index.checkpoint()
    monkeypatch.setattr(sql_mod, "SQL_CHUNK", 4)
    wanted = [*list(reversed(ids.tolist())), int(ids[3])]
    assert [r.id for r in index.fetch_regions(wanted)] == wanted


def test_rle_bytes_counts_are_stored_as_str(open_index):
    from regionsearch.store import NewRegion

    index = open_index()
    img = index.upsert_image("a.jpg")
    region = NewRegion(
        rle={"size": [4, 4], "counts": b"04L4"},
        bbox=(0, 0, 4, 4),
        area=16,
        source="coco",
        category="dog",
    )
    (rid,) = index.add_image_regions(img.id, [region], unit_vectors(1, D))
    (rec,) = index.fetch_regions([rid])
    assert rec.rle == {"size": [4, 4], "counts": "04L4"} and rec.category == "dog"
    with pytest.raises(ValueError, match="COCO RLE"):
        index.add_image_regions(
            img.id,
            [NewRegion(rle={"counts": "x"}, bbox=(0, 0, 1, 1), area=1, source="png")],
            unit_vectors(1, D),
        )
    with pytest.raises(ValueError, match="normalised"):
        index.add_image_regions(img.id, make_regions(1), unit_vectors(1, D) * 2)
    with pytest.raises(KeyError, match="unknown image"):
        index.add_image_regions(999, make_regions(1), unit_vectors(1, D))


def test_upsert_images_semantics(open_index):
    index = open_index()
    recs = index.upsert_images(
        [
            {"path": "a.jpg", "content_hash": "h1", "size_bytes": 10, "mtime": 1.5},
            {"path": "b.jpg", "content_hash": "h2"},
        ]
    )
    assert [r.status for r in recs] == ["pending", "pending"]
    index.add_image_regions(recs[0].id, make_regions(2), unit_vectors(2, D))
    index.checkpoint()
    same = index.upsert_image("a.jpg", content_hash="h1", mtime=2.0)
    assert same.status == "indexed" and same.mtime == 2.0 and same.size_bytes == 10
    changed = index.upsert_image("a.jpg", content_hash="h1-new")
    assert changed.status == "pending" and changed.id == recs[0].id
    assert set(index.images_by_paths(["a.jpg", "b.jpg", "zzz.jpg"])) == {"a.jpg", "b.jpg"}
    assert [r.path for r in index.images_by_hash("h2")] == ["b.jpg"]
    assert [r.path for r in index.iter_images(ImageStatus.PENDING, batch_size=1)] == [
        "a.jpg",
        "b.jpg",
    ]
    assert index.get_image_by_id(recs[1].id).path == "b.jpg"
    assert index.get_image("nope.jpg") is None


def test_replace_delete_fail(open_index):
    index = open_index()
    img, old_ids, _ = add_image_with_regions(index, "a.jpg", 3)
    index.checkpoint()
    new_ids = index.add_image_regions(img.id, make_regions(2), unit_vectors(2, D, 7))
    assert set(new_ids).isdisjoint(old_ids)
    assert not index.vectors.contains(old_ids).any()
    assert index.fetch_regions(old_ids) == []
    assert len(index.fetch_regions(old_ids, include_deleted=True)) == 3
    index.checkpoint()
    assert [r.id for r in index.regions_of_image(img.id)] == new_ids.tolist()
    assert index.delete_image_regions(img.id) == 2
    assert index.vectors.ntotal == 0
    img2, _ids2, _ = add_image_with_regions(index, "b.jpg", 2)
    index.mark_image_failed(img2.id, "decoder exploded" * 1000)
    rec = index.get_image("b.jpg")
    assert rec.status == "failed" and rec.error.startswith("decoder exploded")
    assert len(rec.error) <= images_mod.MAX_ERROR_CHARS
    img3, _ids3, _ = add_image_with_regions(index, "c.jpg", 2)
    index.checkpoint()
    assert index.delete_image(img3.id) == 2
    assert index.get_image("c.jpg").status == "deleted"
    index.checkpoint()
    st = index.stats()
    assert st.regions == 0 and st.vectors == 0 and st.regions_deleted == 9
    assert st.images["deleted"] == 1 and st.images["failed"] == 1
    # a deleted file that comes back is pending again
    assert index.upsert_image("c.jpg").status == "pending"
    assert_consistent(index)


def test_image_without_regions_is_indexed_at_once(open_index):
    index = open_index()
    img = index.upsert_image("empty.jpg")
    ids = index.add_image_regions(img.id, [], np.empty((0, D), np.float32))
    assert ids.size == 0 and index.get_image("empty.jpg").status == "indexed"


def test_manifest_mismatch_is_a_clear_error(open_index):
    index = open_index("photos", factory="IDMap2,Flat")
    index.close()
    with pytest.raises(IndexMismatchError) as err:
        open_index("photos", model="ViT-L-14/openai", dimension=768)
    msg = str(err.value)
    assert "test-model" in msg and "ViT-L-14/openai" in msg and "768" in msg and "16" in msg
    # the suggested name is tagged with what differs (the model), not the unchanged embedder
    assert "--name photos-vit-l-14-openai" in msg and "photos-test-embedder" not in msg
    assert err.value.differences == {
        "model": ("test-model", "ViT-L-14/openai"),
        "dimension": (16, 768),
    }
    with pytest.raises(IndexMismatchError, match="--name photos-alpha-clip"):
        open_index("photos", embedder="alpha-clip")
    with pytest.raises(IndexMismatchError, match="factory"):
        open_index("photos", factory="HNSW32")
    # None = whatever the index holds
    again = open_index("photos", existing=True)
    assert (again.model, again.embedder, again.dimension) == ("test-model", "test-embedder", 16)
    again.close()
    copy = RegionIndex.read_manifest(open_index.root / "photos")
    assert copy.model == "test-model" and copy.dimension == 16 and copy.factory == "IDMap2,Flat"
    data = json.loads((open_index.root / "photos" / "manifest.json").read_text())
    assert data["embedder"] == "test-embedder"
    if open_index.db_url:
        assert "regionsearch:***@" in data["database"] or "***" in data["database"]


def test_missing_index_and_missing_settings(tmp_path):
    with pytest.raises(IndexNotFoundError):
        RegionIndex.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs model"):
        RegionIndex.open(tmp_path / "new", create=True, dimension=8)


def test_a_damaged_database_is_one_clear_error(tmp_path):
    """A regions.db that is not SQLite (a bad copy, a truncated disk) is named in one error,
    for readers and writers alike, and leaves no writer lock behind."""
    index = RegionIndex.create(tmp_path / "ix", model="m", embedder="e", dimension=8)
    index.close()
    (tmp_path / "ix" / "regions.db").write_bytes(b"not a database at all" * 10)
    for read_only in (False, False, True):  # twice as writer: the lock was released
        with pytest.raises(IndexDatabaseError, match=r"regions\.db: file is not a database"):
            RegionIndex.open(tmp_path / "ix", read_only=read_only)


def test_a_truncated_vector_segment_is_one_short_error_naming_it(tmp_path):
    """A damaged segment file (a copy cut short, a full disk) names the file and what FAISS
    found, without its C++ source location, and says the vectors are nowhere else."""
    from regionsearch.store.segment_files import SegmentStoreError

    with RegionIndex.create(tmp_path / "ix", model="m", embedder="e", dimension=16) as index:
        add_image_with_regions(index, "a.png", 40)
    (segment,) = sorted((tmp_path / "ix").rglob("seg-*.faiss"))
    segment.write_bytes(segment.read_bytes()[:100])
    with (  # at open (a small segment loads at once) or at the first search
        pytest.raises(SegmentStoreError) as caught,
        RegionIndex.open(tmp_path / "ix", read_only=True) as reader,
    ):
        reader.search(unit_vectors(1, 16, seed=1), 3)
    message = str(caught.value)
    assert segment.name in message and "damaged or truncated" in message
    assert "index_read.cpp" not in message and "Error in" not in message


def test_a_damaged_manifest_copy_is_skipped_and_rewritten(tmp_path, caplog):
    """manifest.json is a copy of the database's manifest: a bad edit does not lock users out."""
    RegionIndex.create(tmp_path / "ix", model="m", embedder="e", dimension=8).close()
    copy = tmp_path / "ix" / "manifest.json"
    copy.write_text("{bad")
    assert RegionIndex.read_manifest(tmp_path / "ix") is None
    assert "unreadable manifest copy" in caplog.text
    with RegionIndex.open(tmp_path / "ix", read_only=True) as reader:
        assert reader.manifest.model == "m"
    RegionIndex.open(tmp_path / "ix").close()  # a writer rewrites the copy
    assert json.loads(copy.read_text())["model"] == "m"


def test_one_database_holds_one_index(open_index):
    if open_index.db_url is None:
        pytest.skip("the default SQLite database lives inside its own index directory")
    open_index("first").close()
    with pytest.raises(IndexMismatchError, match="already holds the index 'first'"):
        open_index("second")


def test_writer_lock_and_read_only_reader(open_index):
    writer = open_index("idx")
    add_image_with_regions(writer, "a.jpg", 2)
    writer.checkpoint()
    with pytest.raises(IndexLockedError):
        open_index("idx", existing=True)
    reader = open_index("idx", existing=True, read_only=True, mmap=True)
    assert reader.vectors.ntotal == 2
    with pytest.raises(ReadOnlyIndexError):
        reader.upsert_image("b.jpg")
    assert reader.reload_if_changed() is False
    _, ids, vecs = add_image_with_regions(writer, "b.jpg", 3, seed=4)
    writer.checkpoint()
    assert reader.reload_if_changed() is True
    assert reader.vectors.ntotal == 5
    _, found = reader.search(vecs[0], 1)
    assert found[0, 0] == ids[0]
    writer.close()
    again = open_index("idx", existing=True)  # lock released by close()
    assert again.stats().regions == 5


def test_lock_message_speaks_cli(open_index):
    writer = open_index("idx")
    with pytest.raises(IndexLockedError) as err:
        open_index("idx", existing=True)
    message = str(err.value)
    assert f"process {os.getpid()}" in message and "regionsearch index" in message
    assert "read_only" not in message and "\n" not in message
    writer.close()


def test_embedder_description_is_recorded_once_and_checked(open_index):
    from regionsearch.store.manifest import EmbedderMismatchError, check_embedder_description

    index = open_index("idx")
    assert index.manifest.embedder_description is None  # an index from before: accepts anything
    check_embedder_description(index.manifest, {"embedder": "test-embedder", "steps": 5})
    described = {"embedder": "test-embedder", "steps": 5, "lr": 0.5, "batch_size": 8}
    index.record_embedder_description(described)
    index.close()
    again = open_index("idx", existing=True)
    assert again.manifest.embedder_description == described
    check_embedder_description(again.manifest, {**described, "batch_size": 64})  # speed only
    with pytest.raises(EmbedderMismatchError, match=r"steps: index has 5, this run 10"):
        check_embedder_description(again.manifest, {**described, "steps": 10})
    with pytest.raises(EmbedderMismatchError, match="alpha"):
        check_embedder_description(again.manifest, {**described, "alpha": 1.0})
