"""VectorStore: FAISS search against a numpy oracle, filters, removal, training, persistence."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from store_fixtures import oracle_search, unit_vectors

from regionsearch.store import vectors as vectors_mod
from regionsearch.store.backend import RegionFilter
from regionsearch.store.vectors import (
    ReadOnlyError,
    VectorStore,
    VectorStoreError,
    VectorValidationError,
    default_train_size,
    normalize_factory,
)

D = 32


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


def _filled(factory: str = "IDMap2,Flat", n: int = 600, seed: int = 0, **kwargs):
    store = VectorStore(D, factory, **kwargs)
    x = unit_vectors(n, D, seed)
    ids = (np.arange(n, dtype=np.int64) * 7) + 3  # sparse, non-contiguous ids
    store.add(ids, x)
    return store, ids, x


def _recall(found: np.ndarray, expected: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(e[e >= 0])) for f, e in zip(found, expected, strict=True))
    return hits / max(1, int((expected >= 0).sum()))


# ----------------------------------------------------------------------------- exact search


def test_flat_search_matches_bruteforce_oracle():
    store, ids, x = _filled(n=1500)
    q = unit_vectors(40, D, seed=1)
    scores, found = store.search(q, 10)
    o_scores, o_ids = oracle_search(x, ids, q, 10)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(found, o_ids)
    np.testing.assert_allclose(scores, o_scores, atol=1e-5)
    assert store.ntotal == 1500 and len(store) == 1500
    np.testing.assert_array_equal(store.ids(), np.sort(ids))


def test_search_pads_with_minus_one_and_minus_inf():
    store, ids, _ = _filled(n=5)
    scores, found = store.search(unit_vectors(2, D, 3), 8)
    assert (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert set(found[0, :5]) == set(ids)
    empty = VectorStore(D)
    s, i = empty.search(unit_vectors(1, D), 3)
    assert (i == -1).all() and np.isneginf(s).all()
    with pytest.raises(ValueError):
        store.search(unit_vectors(1, D), 0)


def test_single_query_vector_is_accepted():
    store, ids, x = _filled(n=50)
    scores, found = store.search(x[7], 1)
    assert found.shape == (1, 1) and found[0, 0] == ids[7]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_add_validation():
    store = VectorStore(D)
    good = unit_vectors(3, D)
    with pytest.raises(VectorValidationError, match="shape"):
        store.add([1, 2, 3], unit_vectors(3, D + 1))
    with pytest.raises(VectorValidationError, match="float32"):
        store.add([1, 2, 3], good.astype(np.float64))
    bad = good.copy()
    bad[1, 0] = np.nan
    with pytest.raises(VectorValidationError, match="NaN"):
        store.add([1, 2, 3], bad)
    with pytest.raises(VectorValidationError, match="normalised"):
        store.add([1, 2, 3], good * 3)
    with pytest.raises(VectorValidationError, match="3 vectors for 2 ids"):
        store.add([1, 2], good)
    with pytest.raises(VectorValidationError, match="duplicate"):
        store.add([1, 1, 2], good)
    with pytest.raises(VectorValidationError, match=">= 0"):
        store.add([-1, 2, 3], good)
    with pytest.raises(VectorValidationError, match="integers"):
        store.add([1.5, 2, 3], good)
    store.add([10, 20, 30], good)
    with pytest.raises(VectorValidationError, match="already in the index"):
        store.add([5, 20], unit_vectors(2, D, 9))
    assert store.ntotal == 3
    # out-of-order but new ids are fine (e.g. restoring lost vectors)
    store.add([5, 15], unit_vectors(2, D, 9))
    assert store.ntotal == 5 and list(store.ids()) == [5, 10, 15, 20, 30]
    assert 15 in store and 16 not in store


def test_factory_strings():
    assert normalize_factory("Flat") == "IDMap2,Flat"
    assert normalize_factory(" IVF256, Flat ") == "IDMap2,IVF256,Flat"
    assert normalize_factory("IDMap,HNSW32") == "IDMap2,HNSW32"
    assert normalize_factory("IDMap2,Flat") == "IDMap2,Flat"
    assert default_train_size("IVF256,Flat") == 30 * 256
    assert default_train_size("IVF64,PQ16") == 30 * 256  # PQ codebooks: 2**8 centroids
    assert default_train_size("IVF1024,PQ16x4") == 30 * 1024
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        VectorStore(D, "NoSuchIndex42")


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "HNSW32", "IVF8,Flat"])
@pytest.mark.parametrize("exact_filter_limit", [0, 2048], ids=["in-faiss", "exact-small"])
def test_filtered_search_returns_only_allowed_ids(factory, exact_filter_limit):
    store, ids, x = _filled(factory, n=800, train_size=300, exact_filter_limit=exact_filter_limit)
    rng = np.random.default_rng(5)
    allowed = rng.choice(ids, size=60, replace=False)
    q = unit_vectors(12, D, seed=6)
    scores, found = store.search(q, 10, selector=RegionFilter.from_ids(allowed))
    assert np.isin(found[found >= 0], allowed).all()
    sub = np.isin(ids, allowed)
    o_scores, o_ids = oracle_search(x[sub], ids[sub], q, 10)
    if factory == "IDMap2,Flat" or exact_filter_limit:
        # exact indexes, and approximate ones on the exact small-allow-list path (IVF cannot
        # look vectors up by id, so it stays in FAISS, where nprobe=nlist is exact anyway)
        np.testing.assert_array_equal(found, o_ids)
        np.testing.assert_allclose(scores, o_scores, atol=1e-5)
    else:
        assert _recall(found, o_ids) >= 0.8


def test_filtered_search_inside_faiss_uses_search_parameters(monkeypatch):
    """The FAISS path must pass SearchParameters with a selector, not post-filter results."""
    store, ids, _ = _filled("HNSW32", n=300, exact_filter_limit=0)
    seen = []
    inner = store.index
    real = inner.search

    class Spy:
        def __getattr__(self, name):
            return getattr(inner, name)

        def search(self, q, k, params=None):
            seen.append(params)
            return real(q, k, params=params)

    monkeypatch.setattr(store, "_index", Spy())
    store.search(unit_vectors(1, D), 5, selector=RegionFilter.from_ids(ids[:10]))
    assert seen and isinstance(seen[0], faiss.SearchParametersHNSW)
    assert seen[0].sel is not None


def test_filter_with_nested_parameters_pretransform():
    store, ids, _x = _filled("PCA16,Flat", n=400, train_size=200)
    allowed = ids[::9]
    _, found = store.search(unit_vectors(5, D, 2), 5, selector=RegionFilter.from_ids(allowed))
    assert (found >= 0).all() and np.isin(found, allowed).all()


def test_empty_selector_returns_nothing():
    store, _, _ = _filled(n=20)
    scores, found = store.search(unit_vectors(2, D), 3, selector=RegionFilter.from_ids([]))
    assert (found == -1).all() and np.isneginf(scores).all()


# ----------------------------------------------------------------------------- range search


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "HNSW32"])
def test_range_search_matches_oracle(factory):
    store, ids, x = _filled(factory, n=500)
    q = unit_vectors(1, D, seed=11)[0]
    t = 0.35
    scores, found = store.range_search(q, t)
    sims = x @ q
    expected = ids[sims >= t]
    assert set(found.tolist()) == set(expected.tolist())
    assert (scores >= t).all() and (np.diff(scores) <= 0).all()  # best first
    np.testing.assert_allclose(scores, np.sort(sims[sims >= t])[::-1], atol=1e-5)
    allowed = expected[::2]
    _s2, f2 = store.range_search(q, t, selector=RegionFilter.from_ids(allowed))
    assert set(f2.tolist()) == set(allowed.tolist())
    lims, _, labels = store.range_search_batch(np.stack([q, -q]), t)
    assert lims.tolist()[0] == 0 and lims[1] == expected.size
    assert set(labels[lims[1] : lims[2]].tolist()) == set(ids[(x @ -q) >= t].tolist())


# ----------------------------------------------------------------------------- removal


def test_remove_flat_physically_and_from_results():
    store, ids, x = _filled(n=400, compact_every=10_000)
    gone = ids[:50]
    assert store.remove(np.concatenate([gone, [999_999]])) == 50  # absent ids ignored
    assert store.remove(gone) == 0  # idempotent
    assert store.ntotal == 350 and store.n_tombstones == 50
    _, found = store.search(x[:50], 5)
    assert not np.isin(found, gone).any()
    assert not np.isin(store.ids(), gone).any()
    assert store.supports_remove
    store.compact()
    assert store.raw_ntotal == 350 and store.n_tombstones == 0
    _scores, found = store.search(x[50:60], 1)
    np.testing.assert_array_equal(found[:, 0], ids[50:60])


def test_remove_hnsw_uses_tombstones_then_rebuild(tmp_path):
    store, ids, x = _filled("HNSW32", n=500, rebuild_threshold=0.5)
    assert not store.supports_remove
    gone = ids[:100]
    assert store.remove(gone) == 100
    assert store.raw_ntotal == 500 and store.ntotal == 400 and store.n_tombstones == 100
    q = unit_vectors(20, D, 4)
    _, found = store.search(q, 10)
    assert not np.isin(found, gone).any()
    # tombstones survive save/open
    store.save(tmp_path / "h.faiss")
    again = VectorStore.open(tmp_path / "h.faiss")
    assert again.n_tombstones == 100 and again.ntotal == 400
    _, found2 = again.search(q, 10)
    assert not np.isin(found2, gone).any()
    # rebuild drops them physically; search still matches the oracle on the live set
    again.rebuild()
    assert again.n_tombstones == 0 and again.raw_ntotal == 400
    live = ~np.isin(ids, gone)
    _, o_ids = oracle_search(x[live], ids[live], q, 10)
    _, found3 = again.search(q, 10)
    assert _recall(found3, o_ids) >= 0.95
    np.testing.assert_array_equal(again.ids(), ids[live])


def test_hnsw_automatic_rebuild_past_threshold():
    store, ids, _ = _filled("HNSW32", n=200, rebuild_threshold=0.1)
    store.remove(ids[:15])
    assert store.n_tombstones == 15  # 7.5 % < 10 %
    store.remove(ids[15:25])
    assert store.n_tombstones == 0 and store.raw_ntotal == 175  # rebuilt


def test_ivf_removal_keeps_ids_right(tmp_path):
    """Regression: IDMap2.remove_ids over IVF shifts ids in FAISS 1.15; tombstones must be used."""
    store, ids, x = _filled("IVF8,Flat", n=600, train_size=300)
    assert store.is_trained and not store.supports_remove
    store.remove(ids[:100])
    store.save(tmp_path / "ivf.faiss")
    again = VectorStore.open(tmp_path / "ivf.faiss")
    scores, found = again.search(x[100:140], 1)
    np.testing.assert_array_equal(found[:, 0], ids[100:140])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    again.rebuild()  # keeps the trained quantiser, drops the tombstoned vectors
    assert again.is_trained and again.raw_ntotal == 500 and again.n_tombstones == 0
    _, found = again.search(x[100:140], 1)
    np.testing.assert_array_equal(found[:, 0], ids[100:140])


# ----------------------------------------------------------------------------- training


def test_ivf_training_buffers_until_enough_points(tmp_path):
    store = VectorStore(D, "IVF8,Flat", train_size=240)
    assert not store.is_trained
    x = unit_vectors(400, D, 3)
    ids = np.arange(1, 401, dtype=np.int64)
    store.add(ids[:100], x[:100])
    assert not store.is_trained and store.ntotal == 100
    q = unit_vectors(5, D, 8)
    _, found = store.search(q, 5)  # exact while buffering
    np.testing.assert_array_equal(found, oracle_search(x[:100], ids[:100], q, 5)[1])
    store.remove(ids[:10])
    # a buffered store saves and reopens in its buffering state
    store.save(tmp_path / "b.faiss")
    store = VectorStore.open(tmp_path / "b.faiss")
    assert not store.is_trained and store.factory == "IDMap2,IVF8,Flat"
    assert store.train_size == 240 and store.ntotal == 90
    store.add(ids[100:300], x[100:300])  # crosses 240 -> trains and moves the buffer
    assert store.is_trained and store.ntotal == 290
    assert isinstance(faiss.downcast_index(store.index.index), faiss.IndexIVFFlat)
    ivf = faiss.extract_index_ivf(store.index)
    assert ivf.nprobe == 8  # default nprobe: nlist/32 clamped to [8, nlist]
    # nprobe == nlist: IVF-Flat is exact
    scores, found = store.search(q, 5)
    live = np.r_[ids[10:300]]
    o_scores, o_ids = oracle_search(x[10:300], live, q, 5)
    np.testing.assert_array_equal(found, o_ids)
    np.testing.assert_allclose(scores, o_scores, atol=1e-5)


def test_ivfpq_trains_and_searches():
    store = VectorStore(D, "IVF4,PQ8x4np", train_size=200)
    x = unit_vectors(300, D, 1)
    ids = np.arange(300, dtype=np.int64) + 1
    store.add(ids, x)
    assert store.is_trained
    _, found = store.search(x[:20], 10)
    assert (found[:, :1] >= 0).all()
    assert _recall(found, oracle_search(x, ids, x[:20], 10)[1]) > 0.3


def test_explicit_train_and_too_few_points():
    store = VectorStore(D, "IVF16,Flat", train_size=10_000)
    store.add(np.arange(5), unit_vectors(5, D))
    with pytest.raises(VectorStoreError, match="training"):
        store.train()
    assert not store.is_trained and store.ntotal == 5
    store.add(np.arange(5, 100), unit_vectors(95, D, 2))
    store.train()
    assert store.is_trained and store.ntotal == 100


# ----------------------------------------------------------------------------- persistence


def test_save_and_open_roundtrip(tmp_path):
    store, ids, x = _filled(n=300)
    path = tmp_path / "v.faiss"
    store.save(path)
    meta, _ = VectorStore.sidecar_paths(path)
    assert meta.exists()
    again = VectorStore.open(path)
    assert again.factory == "IDMap2,Flat" and again.dimension == D and again.ntotal == 300
    q = unit_vectors(5, D, 2)
    np.testing.assert_array_equal(again.search(q, 5)[1], store.search(q, 5)[1])
    np.testing.assert_allclose(again.reconstruct(ids[[3, 1]]), x[[3, 1]], atol=1e-6)
    with pytest.raises(KeyError):
        again.reconstruct([123456])
    with pytest.raises(VectorStoreError, match="built with factory"):
        VectorStore.open(path, factory="HNSW32")
    assert not list(tmp_path.glob("*.tmp"))


def test_atomic_save_crash_before_replace_keeps_old_file(tmp_path, monkeypatch):
    store, _ids, _ = _filled(n=100)
    path = tmp_path / "v.faiss"
    store.save(path)
    before = path.read_bytes()
    store.add([10_000, 10_001], unit_vectors(2, D, 5))
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst) == path:  # die between writing the new file and renaming it
            raise OSError("simulated crash before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(vectors_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.save(path)
    monkeypatch.setattr(vectors_mod.os, "replace", real_replace)
    assert path.read_bytes() == before
    assert VectorStore.open(path).ntotal == 100
    assert not (tmp_path / "v.faiss.tmp").exists()


def test_atomic_save_crash_while_writing_keeps_old_file(tmp_path, monkeypatch):
    store, _, _ = _filled(n=100)
    path = tmp_path / "v.faiss"
    store.save(path)
    before = path.read_bytes()
    store.remove(store.ids()[:10])

    def torn_write(index, filename):
        Path(filename).write_bytes(b"half a faiss file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(vectors_mod.faiss, "write_index", torn_write)
    with pytest.raises(RuntimeError, match="simulated"):
        store.save(path)
    assert path.read_bytes() == before
    # the old index comes back, with the removals of the failed save still applied (the
    # tombstone sidecar is written first and only ever hides ids that really were deleted)
    again = VectorStore.open(path)
    assert again.raw_ntotal == 100 and again.ntotal == 90
    store_ids = store.ids()
    np.testing.assert_array_equal(again.ids(), store_ids)


def test_stale_tombstones_after_crash_are_safe(tmp_path, monkeypatch):
    """Tombstones are written before the index: new tombstones + old index still hide ids."""
    store, ids, _ = _filled("HNSW32", n=100)
    path = tmp_path / "h.faiss"
    store.save(path)
    store.remove(ids[:5])
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst) == path:
            raise OSError("crash")
        return real_replace(src, dst)

    monkeypatch.setattr(vectors_mod.os, "replace", crash)
    with pytest.raises(OSError):
        store.save(path)
    monkeypatch.setattr(vectors_mod.os, "replace", real_replace)
    again = VectorStore.open(path)
    assert again.ntotal == 95 and not np.isin(again.ids(), ids[:5]).any()


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "HNSW32", "IVF8,Flat"])
def test_mmap_open_is_read_only_and_searches_the_same(tmp_path, factory):
    store, ids, _x = _filled(factory, n=400, train_size=300)
    path = tmp_path / "m.faiss"
    store.save(path)
    mapped = VectorStore.open(path, mmap=True)
    assert mapped.read_only
    q = unit_vectors(6, D, 3)
    np.testing.assert_array_equal(mapped.search(q, 5)[1], store.search(q, 5)[1])
    with pytest.raises(ReadOnlyError):
        mapped.add([10**6], unit_vectors(1, D))
    with pytest.raises(ReadOnlyError):
        mapped.remove(ids[:1])


def test_gpu_flag_without_gpu_falls_back(caplog):
    assert faiss.get_num_gpus() == 0  # CI and this machine: CPU only
    assert not VectorStore(D).on_gpu  # auto
    with caplog.at_level(logging.WARNING):
        store = VectorStore(D, use_gpu=True)
    assert not store.on_gpu and "no GPU" in caplog.text


def test_open_rejects_non_idmap2_files(tmp_path):
    path = tmp_path / "plain.faiss"
    faiss.write_index(faiss.IndexFlatIP(D), str(path))
    with pytest.raises(VectorStoreError, match="IndexIDMap2"):
        VectorStore.open(path, factory="Flat")
