"""Post-filtering a broad image filter (store/filter_strategy.py) equals the pre-filter exactly on
a Flat index: same ids, same order, same scores, checked against the brute-force oracle of
tests/test_store_filters.py on an index built by random writes (deletes, re-indexing, a failed
image, an image whose live ids are not contiguous)."""

from __future__ import annotations

import numpy as np
import pytest
from store_fixtures import oracle_search, unit_vectors
from test_store_filters import FILTERS, D, Model, _build, _with_ids

from regionsearch.store import ImageFilter
from regionsearch.store import filter_strategy as fs
from regionsearch.store.filter_strategy import FilterPlan, estimate_share, post_filtered_search

pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


def _oracle(model: Model, paths: dict[int, str], f: ImageFilter, q: np.ndarray, k: int):
    allowed = model.allowed(paths, f)
    vecs = np.stack([model.vectors[i] for i in allowed]) if allowed.size else np.empty((0, D))
    return oracle_search(vecs, allowed, q, k)


class Counting:
    """The index's search, recording ``(k, filtered)`` of every call."""

    def __init__(self, index) -> None:
        self.index = index
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, queries, k, selector):
        self.calls.append((k, selector is not None))
        return self.index.vectors.search(queries, k, selector)


def _post(index, plan: FilterPlan, q: np.ndarray, k: int, search) -> tuple:
    with index.db.engine.connect() as conn:
        return post_filtered_search(conn, index.db.dialect, plan, q, k, search)


@pytest.mark.parametrize("seed", [0, 1])
def test_post_filter_equals_pre_filter_and_oracle(open_index, seed):
    """Every filter, narrow or broad (or matching nothing), forced through the post-filter:
    identical to the pre-filter and to brute force; ``search(images=)`` picks either way."""
    index = open_index()
    model, paths = _build(index, seed)
    q = unit_vectors(4, D, seed=70 + seed)
    used_post = 0
    for f in [*FILTERS, *_with_ids(paths, seed), ImageFilter(path_glob="*")]:
        pre = index.region_filter(f)
        for k in (1, 5, 40):
            p_scores, p_ids = index.search(q, k, selector=pre)
            o_scores, o_ids = _oracle(model, paths, f, q, k)
            np.testing.assert_array_equal(p_ids, o_ids, err_msg=str(f))
            np.testing.assert_allclose(p_scores, o_scores, atol=1e-5)
            forced = FilterPlan(images=f, share=1.0)  # post-filter whatever the share
            for got in (_post(index, forced, q, k, Counting(index)), index.search(q, k, images=f)):
                np.testing.assert_array_equal(got[1], p_ids, err_msg=f"{f} k={k}")
                np.testing.assert_array_equal(got[0], p_scores)
            used_post += index.plan_filter(f).candidates(k) is not None
        one = index.search(q[0], 5, images=index.plan_filter(f))  # one (d,) query, a plan
        np.testing.assert_array_equal(one[1], index.search(q[:1], 5, selector=pre)[1])
    assert used_post > 10  # the broad filters did take the post-filter path on their own


def test_low_scoring_matches_retry_then_fall_back(open_index, monkeypatch):
    """A filter whose regions all rank last: ``k'`` doubles; with fewer rounds allowed the
    short queries fall back to the pre-filter. Results stay exact either way."""
    index = open_index()
    model, paths = _build(index, 0)
    f = ImageFilter(folder="f0")
    allowed = set(model.allowed(paths, f).tolist())
    live = np.asarray(sorted(i for ids in model.live.values() for i in ids), dtype=np.int64)
    others = np.stack([model.vectors[i] for i in live.tolist() if i not in allowed])
    q = others.mean(axis=0, keepdims=True).astype(np.float32)
    q /= np.linalg.norm(q)
    ranking = live[np.argsort(-(np.stack([model.vectors[i] for i in live]) @ q[0]))]
    k = 2
    kth_allowed = [r for r, i in enumerate(ranking.tolist()) if i in allowed][k - 1]
    assert kth_allowed >= 4 * k  # precondition: the first two rounds (k' = 2k, 4k) fall short
    expected = _oracle(model, paths, f, q, k)
    monkeypatch.setattr(fs, "MAX_ROUNDS", 10)
    search = Counting(index)
    scores, ids = _post(index, FilterPlan(images=f, share=1.0), q, k, search)
    np.testing.assert_array_equal(ids, expected[1])
    np.testing.assert_allclose(scores, expected[0], atol=1e-5)
    asked = [c for c, _ in search.calls]
    assert asked == [2 * k * 2**i for i in range(len(asked))]  # k' doubles...
    assert asked[-2] <= kth_allowed < asked[-1]  # ...until the k-th allowed region is in
    assert not any(filtered for _, filtered in search.calls)
    monkeypatch.setattr(fs, "MAX_ROUNDS", 1)
    search = Counting(index)
    scores, ids = _post(index, FilterPlan(images=f, share=1.0), q, k, search)
    np.testing.assert_array_equal(ids, expected[1])
    assert search.calls == [(2 * k, False), (k, True)]  # one round, then the pre-filter


def test_share_estimate_is_exact_on_a_small_index_and_picks_the_strategy(open_index):
    index = open_index()
    with index.db.engine.connect() as conn:
        assert estimate_share(conn, ImageFilter(folder="f1"), index.db.dialect) is None  # empty
    model, paths = _build(index, 1)
    n_live = sum(len(ids) for ids in model.live.values())
    for f in [*FILTERS, ImageFilter(image_ids=list(paths)[:4])]:
        plan = index.plan_filter(f)
        assert plan.share == pytest.approx(model.allowed(paths, f).size / n_live), str(f)
        expect_post = plan.share >= fs.MIN_SHARE
        assert (plan.candidates(5) is not None) == expect_post
    broad = index.plan_filter(ImageFilter(path_glob="*"))
    assert broad.share == 1.0 and broad.candidates(5) == 10
    assert broad.candidates(fs.MAX_CANDIDATES) is None  # too many candidates: pre-filter
