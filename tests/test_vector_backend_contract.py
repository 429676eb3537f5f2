"""The VectorBackend contract (regionsearch/store/backend.py), run against every engine.

Each test opens engines through ``open_vector_backend`` (the way ``RegionIndex`` does) and
compares what they return with a numpy brute-force oracle over what was added, removed and
committed. Engines are listed in tests/vector_backends.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from store_fixtures import oracle_search, unit_vectors
from vector_backends import BackendCase

from regionsearch.store.backend import ReadOnlyBackendError, RegionFilter, VectorBackend

D = 16
N = 300


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


class Opened:
    """Opens backends of one case at one location; closes them all at teardown."""

    def __init__(self, case: BackendCase, tmp_path: Path) -> None:
        self.case = case
        self.location = case.location(tmp_path)
        self.backends: list[Any] = []

    def __call__(self, *, read_only: bool = False, create: bool = True) -> Any:
        backend = self.case.open(self.location, dimension=D, read_only=read_only, create=create)
        self.backends.append(backend)
        return backend


@pytest.fixture
def opened(backend_case: BackendCase, tmp_path: Path) -> Iterator[Opened]:
    o = Opened(backend_case, tmp_path)
    yield o
    for b in o.backends:
        b.close()


def _ids(n: int, start: int = 1, step: int = 3) -> np.ndarray:
    return start + step * np.arange(n, dtype=np.int64)


def _filled(opened: Opened, n: int = N, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    backend = opened()
    ids, x = _ids(n), unit_vectors(n, D, seed)
    backend.add(ids, x, image_ids=ids // 10)
    return backend, ids, x


def _assert_matches_oracle(backend: Any, x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    scores, found = backend.search(q, k)
    o_scores, o_ids = oracle_search(x, ids, q, k)
    assert scores.shape == found.shape == (len(q), k)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_array_equal(found, o_ids)
    np.testing.assert_allclose(scores, o_scores, atol=1e-5)


# ----------------------------------------------------------------------------- shape of things


def test_is_a_vector_backend(opened):
    backend = opened()
    assert isinstance(backend, VectorBackend)
    assert backend.dimension == D and backend.read_only is False
    assert backend.ntotal == 0 and backend.n_tombstones == 0
    assert isinstance(backend.on_gpu, bool)
    assert isinstance(backend.stats(), dict)


def test_empty_backend_returns_padding(opened):
    backend = opened()
    scores, found = backend.search(unit_vectors(2, D), 4)
    assert (found == -1).all() and np.isneginf(scores).all()
    assert backend.ids().size == 0
    s, i = backend.range_search(unit_vectors(1, D)[0], -1.0)
    assert s.size == i.size == 0


def test_validation_errors_are_clear(opened):
    backend = opened()
    good = unit_vectors(3, D)
    out = backend.validate_vectors(good, n=3)
    assert out.dtype == np.float32 and out.shape == (3, D) and out.flags.c_contiguous
    with pytest.raises(ValueError, match=str(D)):
        backend.validate_vectors(unit_vectors(3, D + 1))
    with pytest.raises(ValueError, match="normalis"):
        backend.validate_vectors(good * 2)
    bad = good.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        backend.validate_vectors(bad)
    with pytest.raises(ValueError, match="float32"):
        backend.validate_vectors(good.astype(np.float64))
    with pytest.raises(ValueError):
        backend.add(_ids(2), good)  # 3 vectors for 2 ids
    with pytest.raises(ValueError):
        backend.search(unit_vectors(1, D + 2), 3)
    backend.add(_ids(3), good)
    with pytest.raises(ValueError, match="already"):
        backend.add(_ids(1), good[:1])  # ids are never reused
    assert backend.ntotal == 3


# ----------------------------------------------------------------------------- search


def test_exact_top_k_equals_oracle(opened):
    backend, ids, x = _filled(opened)
    q = unit_vectors(7, D, seed=1)
    _assert_matches_oracle(backend, x, ids, q, 10)
    _assert_matches_oracle(backend, x, ids, q, N + 5)  # more than stored: padded
    assert backend.ntotal == N
    np.testing.assert_array_equal(backend.ids(), ids)


def test_remove_hides_at_once(opened):
    backend, ids, x = _filled(opened)
    gone = ids[::4]
    assert backend.remove(np.concatenate([gone, [10**9]])) == gone.size  # absent id ignored
    keep = ~np.isin(ids, gone)
    assert backend.ntotal == int(keep.sum())
    np.testing.assert_array_equal(backend.contains(ids), keep)
    np.testing.assert_array_equal(backend.ids(), ids[keep])
    _assert_matches_oracle(backend, x[keep], ids[keep], unit_vectors(5, D, seed=2), 15)
    assert backend.remove(gone) == 0


def test_filtered_search_equals_restricted_oracle(opened):
    backend, ids, x = _filled(opened)
    backend.remove(ids[5:40:3])
    live = backend.contains(ids)
    filt = RegionFilter(
        id_ranges=np.array([[0, 120], [400, 520], [700, 701]], np.int64),
        image_ids=np.array([0, 1], np.int64),
        ids=np.array([ids[-1], ids[-2], 10**9], np.int64),
    )
    allowed = filt.allows(ids) & live
    q = unit_vectors(6, D, seed=3)
    k = 12
    assert allowed.sum() >= k
    scores, found = backend.search(q, k, selector=filt)
    o_scores, o_ids = oracle_search(x[allowed], ids[allowed], q, k)
    np.testing.assert_array_equal(found, o_ids)  # never cut below k, never a disallowed id
    np.testing.assert_allclose(scores, o_scores, atol=1e-5)


def test_filter_smaller_than_k_and_empty_filter(opened):
    backend, ids, _ = _filled(opened)
    few = RegionFilter.from_ids(ids[[3, 50, 200]])
    scores, found = backend.search(unit_vectors(2, D, seed=4), 5, selector=few)
    assert (np.sort(found[:, :3], axis=1) == ids[[3, 50, 200]]).all()
    assert (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    nothing = RegionFilter(id_ranges=np.empty((0, 2), np.int64))
    scores, found = backend.search(unit_vectors(2, D, seed=4), 5, selector=nothing)
    assert (found == -1).all() and np.isneginf(scores).all()


def test_range_search_equals_oracle(opened):
    backend, ids, x = _filled(opened)
    q = unit_vectors(1, D, seed=5)[0]
    t = 0.3
    scores, found = backend.range_search(q, t)
    sims = x @ q
    np.testing.assert_array_equal(np.sort(found), ids[sims >= t])
    assert (np.diff(scores) <= 0).all() and (scores >= t).all()
    filt = RegionFilter(id_ranges=np.array([[0, ids[N // 2]]], np.int64))
    _, f2 = backend.range_search(q, t, selector=filt)
    np.testing.assert_array_equal(np.sort(f2), ids[(sims >= t) & filt.allows(ids)])


def test_reconstruct_returns_stored_vectors(opened):
    backend, ids, x = _filled(opened)
    np.testing.assert_allclose(backend.reconstruct(ids[[7, 2, 99]]), x[[7, 2, 99]], atol=1e-6)
    backend.remove(ids[:1])
    with pytest.raises(KeyError, match=str(int(ids[0]))):
        backend.reconstruct(ids[:1])


# ----------------------------------------------------------------------------- durability


def test_commit_then_reopen_keeps_exactly_what_was_committed(opened):
    backend, ids, x = _filled(opened)
    backend.remove(ids[:10])
    backend.commit()
    later_ids, later_x = _ids(20, start=10_000), unit_vectors(20, D, seed=9)
    backend.add(later_ids, later_x)  # never committed
    backend.remove(ids[10:20])  # never committed
    backend.close()  # dropped: what was not committed may be lost, nothing else
    again = opened(create=False)
    durable = again.ids()
    committed = ids[10:]
    assert np.isin(ids[20:], durable).all()  # every committed id is found
    assert not np.isin(ids[:10], durable).any()  # committed removals stay removed
    assert np.isin(durable, np.concatenate([committed, later_ids])).all()  # nothing invented
    # uncommitted writes may also survive (a Milvus server makes each write durable at once)
    every_id, every_x = np.concatenate([ids, later_ids]), np.concatenate([x, later_x])
    live = np.isin(every_id, durable)
    _assert_matches_oracle(again, every_x[live], every_id[live], unit_vectors(3, D, seed=8), 10)


def test_reopen_after_full_commit_is_identical(opened):
    backend, ids, x = _filled(opened)
    backend.remove(ids[::7])
    backend.commit()
    backend.close()
    again = opened(create=False)
    keep = ~np.isin(ids, ids[::7])
    np.testing.assert_array_equal(again.ids(), ids[keep])
    _assert_matches_oracle(again, x[keep], ids[keep], unit_vectors(4, D, seed=6), 10)


def test_a_removed_id_added_again_holds_its_new_vector(opened):
    """Reconciliation re-adds the vector of an id it removed (RegionIndex.restore_vectors)."""
    backend, ids, x = _filled(opened)
    backend.commit()
    again_ids = ids[:3]
    backend.remove(again_ids)
    backend.commit()
    fresh = unit_vectors(3, D, seed=11)
    backend.add(again_ids, fresh, image_ids=again_ids // 10)
    expected = x.copy()
    expected[:3] = fresh
    assert backend.contains(again_ids).all() and backend.ntotal == ids.size
    np.testing.assert_allclose(backend.reconstruct(again_ids), fresh, atol=1e-6)
    _assert_matches_oracle(backend, expected, ids, fresh, 5)
    backend.commit()
    backend.close()
    reopened = opened(create=False)
    np.testing.assert_array_equal(reopened.ids(), ids)
    _assert_matches_oracle(reopened, expected, ids, fresh, 5)


def test_read_only_refuses_mutation_and_refresh_sees_commits(opened):
    writer, ids, x = _filled(opened)
    writer.commit()
    reader = opened(read_only=True, create=False)
    assert reader.read_only and reader.ntotal == N
    with pytest.raises(ReadOnlyBackendError):
        reader.add(_ids(1, start=50_000), x[:1])
    with pytest.raises(ReadOnlyBackendError):
        reader.remove(ids[:1])
    with pytest.raises(ReadOnlyBackendError):
        reader.commit()
    assert not reader.refresh()  # nothing new
    more_ids = _ids(5, start=20_000)
    writer.add(more_ids, unit_vectors(5, D, seed=7))
    writer.remove(ids[:2])
    writer.commit()
    assert reader.refresh()
    assert reader.contains(more_ids).all() and not reader.contains(ids[:2]).any()
    assert reader.ntotal == N + 5 - 2
    assert not reader.refresh()


def test_open_missing_location_without_create_fails(opened):
    with pytest.raises(FileNotFoundError):
        opened(create=False)
