"""Reconciliation of the SQL rows and the vector file after a crash: orphans, missing and
pending vectors, HNSW/IVF indexes, and a ``kill -9`` at every point of a checkpoint.

Tests taking ``open_index`` run on SQLite and, when REGIONSEARCH_TEST_PG_URL is set, on
PostgreSQL too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from store_fixtures import add_image_with_regions, assert_consistent, region_states, unit_vectors

from regionsearch.store import (
    open_vector_backend,
)
from regionsearch.store.models import Image, Region

D = 16
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


# ----------------------------------------------------------------------------- reconcile


def _open_vectors(index, read_only: bool = False):
    """The vectors of a closed ``index`` opened directly (whatever backend it uses)."""
    return open_vector_backend(
        index.vectors_location, dimension=D, factory=None, read_only=read_only, create=False
    )


def test_reconcile_removes_orphan_vectors(open_index):
    index = open_index()
    _, _ids, _ = add_image_with_regions(index, "a.jpg", 3)
    index.close()
    store = _open_vectors(index)
    store.add([10**6], unit_vectors(1, D, 99))  # a vector whose SQL row never existed
    store.commit()
    store.close()
    index = open_index(existing=True)
    rep = index.last_reconcile
    assert rep.orphans_removed == 1 and rep.missing_marked == 0 and rep.pending_dropped == 0
    assert 10**6 not in index.vectors
    assert _open_vectors(index, read_only=True).ntotal == 3  # repaired on disk too
    assert_consistent(index)
    assert index.reconcile().clean  # idempotent


def test_reconcile_marks_missing_vectors_for_reembedding(open_index):
    index = open_index()
    _img, ids, vecs = add_image_with_regions(index, "a.jpg", 3)
    index.close()
    store = _open_vectors(index)
    store.remove(ids[1:2])
    store.commit()
    store.close()
    index = open_index(existing=True)
    rep = index.last_reconcile
    assert rep.missing_marked == 1 and rep.images_reset == 1
    assert region_states(index)[int(ids[1])] == ("missing", False)
    assert index.get_image("a.jpg").status == "pending"
    missing = index.regions_missing_vectors()
    assert [r.id for r in missing] == [ids[1]]
    # the indexer re-embeds just that region
    index.restore_vectors([missing[0].id], vecs[1:2])
    index.checkpoint()
    assert index.get_image("a.jpg").status == "indexed"
    assert region_states(index)[int(ids[1])] == ("committed", False)
    assert_consistent(index)
    with pytest.raises(KeyError):
        index.restore_vectors([ids[0]], vecs[:1])


def test_reconcile_drops_pending_rows_without_vectors(open_index):
    """Crash before the FAISS checkpoint (C1): rows pending, vectors never reached the disk."""
    index = open_index()
    _img_a, ids_a, _ = add_image_with_regions(index, "a.jpg", 2)
    index.checkpoint()
    _img_b, ids_b, _ = add_image_with_regions(index, "b.jpg", 3)
    index._abandon()  # the process dies: no checkpoint, lock released by the OS
    index = open_index(existing=True)
    rep = index.last_reconcile
    assert rep.pending_dropped == 3 and rep.images_reset >= 1 and rep.orphans_removed == 0
    assert index.get_image("b.jpg").status == "pending"
    assert index.get_image("a.jpg").status == "indexed"
    assert set(region_states(index)) == set(ids_a.tolist())
    assert_consistent(index)
    # ids are never reused, even after dropping the highest ones
    _, ids_c, _ = add_image_with_regions(index, "c.jpg", 1)
    assert ids_c[0] > ids_b.max()


def test_reconcile_handles_hand_made_pending_rows(open_index):
    index = open_index()
    img, ids, _ = add_image_with_regions(index, "a.jpg", 2)
    index.checkpoint()
    with index.session() as s:
        s.add(
            Region(
                image_id=img.id,
                rle={"size": [1, 1], "counts": "1"},
                bbox_x=0,
                bbox_y=0,
                bbox_w=1,
                bbox_h=1,
                area=1,
                source="png",
                embedder="e",
                vector_state="pending",
            )
        )
        s.execute(sa.update(Image).where(Image.id == img.id).values(status="indexed"))
    index.close()
    index = open_index(existing=True)
    assert index.last_reconcile.pending_dropped == 1
    assert index.get_image("a.jpg").status == "pending"  # re-process it
    assert set(region_states(index)) == set(ids.tolist())
    assert_consistent(index)


def test_reconcile_promotes_pending_rows_whose_vectors_are_durable(open_index):
    """Crash between the FAISS checkpoint (C1) and the SQL commit (C2): keep the work."""
    index = open_index()
    _, _ids, _ = add_image_with_regions(index, "a.jpg", 3)
    index.vectors.commit()  # C1 done...
    index._abandon()  # ...and the process dies before C2
    index = open_index(existing=True)
    rep = index.last_reconcile
    assert rep.promoted == 3 and rep.images_indexed == 1 and rep.pending_dropped == 0
    assert index.get_image("a.jpg").status == "indexed"
    assert {v for v in region_states(index).values()} == {("committed", False)}
    assert_consistent(index)


def test_reconcile_after_deletes_that_were_not_checkpointed(open_index):
    index = open_index()
    img, _ids, _ = add_image_with_regions(index, "a.jpg", 3)
    index.checkpoint()
    index.delete_image(img.id)  # SQL tombstones committed, FAISS removal only in memory
    index._abandon()
    index = open_index(existing=True)
    assert index.last_reconcile.orphans_removed == 3
    assert index.vectors.ntotal == 0
    assert_consistent(index)


def test_hnsw_index_deletes_and_reopen(open_index):
    index = open_index(factory="HNSW32", vector_options={"rebuild_threshold": 0.9})
    img, ids, vecs = add_image_with_regions(index, "a.jpg", 5)
    add_image_with_regions(index, "b.jpg", 5, seed=3)
    index.checkpoint()
    index.delete_image(img.id)
    assert index.vectors.n_tombstones == 5
    _, found = index.search(vecs[0], 10)
    assert not np.isin(found, ids).any()
    index.close()
    index = open_index(existing=True)
    assert index.last_reconcile.clean
    assert index.vectors.ntotal == 5
    assert_consistent(index)


def test_ivf_index_trains_through_region_index(open_index):
    index = open_index(factory="IVF4,Flat", vector_options={"train_size": 40})
    for i in range(6):
        add_image_with_regions(index, f"{i}.jpg", 10, seed=i)
    assert index.vectors.is_trained
    index.close()
    index = open_index(existing=True)
    assert index.vectors.is_trained and index.vectors.ntotal == 60
    assert index.manifest.factory == "IDMap2,IVF4,Flat"
    assert_consistent(index)


# ----------------------------------------------------------------------------- kill -9

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from regionsearch.store import RegionIndex, NewRegion
    from regionsearch.store import index as index_mod

    where = sys.argv[1]
    url = sys.argv[2] or None
    ix = RegionIndex.open({path!r}, model="m", embedder="e", dimension=8, create=True,
                          db_url=url, checkpoint_every_s=None, checkpoint_every_vectors=None)
    rng = np.random.default_rng(0)
    def add(name, n):
        img = ix.upsert_image(name)
        v = rng.standard_normal((n, 8)).astype("float32")
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        regs = [NewRegion(rle={{"size": [2, 2], "counts": "4"}}, bbox=(0, 0, 2, 2), area=4,
                          source="full-image") for _ in range(n)]
        return ix.add_image_regions(img.id, regs, v)
    add("a.jpg", 3)
    ix.checkpoint()
    add("b.jpg", 4)
    ix.delete_image(ix.get_image("a.jpg").id)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "before-c1":
        die()
    if where == "between-c1-c2":
        index_mod.RegionIndex._commit_flushed = die
    if where == "inside-save":
        from regionsearch.store import vectors as vmod
        vmod.os.replace = die
    ix.checkpoint()
    print("survived")
    """
)


@pytest.mark.parametrize("where", ["before-c1", "inside-save", "between-c1-c2"])
def test_kill_9_at_any_point_is_repaired(open_index, where):
    path = open_index.root / "killed"
    script = KILL_SCRIPT.format(repo=str(REPO), path=str(path))
    proc = subprocess.run(
        [sys.executable, "-c", script, where, open_index.db_url or ""],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    index = open_index("killed", existing=True)
    assert_consistent(index)
    a, b = index.get_image("a.jpg"), index.get_image("b.jpg")
    assert a.status in ("indexed", "deleted")
    if where == "between-c1-c2":  # the FAISS file was durable: nothing to redo
        assert index.last_reconcile.promoted == 4
        assert b.status == "indexed" and len(index.regions_of_image(b.id)) == 4
    else:  # b must be processed again; none of its rows survive
        assert b.status == "pending" and index.regions_of_image(b.id) == []
    assert index.reconcile().clean
