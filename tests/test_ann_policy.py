"""The ANN policy: valid, monotone choices that FAISS builds and the store can search."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from regionsearch.store import VectorStore
from regionsearch.store.ann_policy import (
    EXACT_MAX_FLOATS,
    IndexChoice,
    bytes_per_vector,
    choose_index,
    ivf_nlist,
    ivf_nprobe,
    pq_subquantizers,
)

SIZES = [0, 1, 1_000, 50_000, 100_000, 200_000, 1_000_000, 3_000_000, 10_000_000, 100_000_000]
# kinds from most to least exact: the policy may only move down this list as n grows
RANK = {"Flat": 0, "IVF": 1, "PQ-refined": 2, "PQ": 3}


def kind(choice: IndexChoice) -> str:
    if choice.exact:
        return "Flat"
    if "PQ" not in choice.factory:
        return "IVF"
    return "PQ-refined" if "Refine" in choice.factory else "PQ"


def scanned_vectors(n: int, choice: IndexChoice, dimension: int) -> float:
    ivf = faiss.try_extract_index_ivf(faiss.index_factory(dimension, choice.factory))
    return n * choice.nprobe / ivf.nlist


@pytest.mark.parametrize("dimension", [256, 512])
@pytest.mark.parametrize("budget", [None, 8 * 2**30])
def test_choices_are_monotone_in_size(dimension: int, budget: int | None) -> None:
    choices = [choose_index(n, dimension, budget) for n in SIZES]
    ranks = [RANK[kind(c)] for c in choices]
    assert ranks == sorted(ranks), [c.factory for c in choices]
    # past the exact range, the vectors a query scans never shrink as the collection grows
    scanned = [
        scanned_vectors(n, c, dimension) for n, c in zip(SIZES, choices, strict=True) if not c.exact
    ]
    assert scanned == sorted(scanned), scanned
    for k in RANK:  # within one kind, more vectors never get fewer training points
        trains = [c.train_size for c in choices if kind(c) == k]
        assert trains == sorted(trains)


def test_exact_threshold_and_ivf_above_it() -> None:
    n_exact = EXACT_MAX_FLOATS // 512
    assert choose_index(n_exact, 512).exact
    above = choose_index(n_exact + 1, 512)
    assert above.factory.startswith("IVF") and above.nprobe and above.train_size > 0
    # a lower dimension scans faster: the exact range extends further
    assert choose_index(n_exact + 1, 256).exact


def test_memory_budget_forces_compressed_codes_that_fit() -> None:
    n, d = 10_000_000, 512
    unlimited = choose_index(n, d)
    assert unlimited.factory.startswith("IVF")
    assert n * unlimited.bytes_per_vector > 8 * 2**30  # float32 vectors alone are 20 GB
    budgeted = choose_index(n, d, 8 * 2**30)
    assert "PQ" in budgeted.factory and "Refine" in budgeted.factory
    assert n * budgeted.bytes_per_vector <= 8 * 2**30
    assert budgeted.k_factor and budgeted.k_factor > 1
    tight = choose_index(n, d, 2 * 2**30)
    assert "Refine" not in tight.factory and "PQ" in tight.factory
    assert tight.bytes_per_vector < budgeted.bytes_per_vector


def test_rule_helpers() -> None:
    assert ivf_nlist(1_000_000) == 4096  # 4 * sqrt(1M) = 4000 -> nearest power of two
    assert ivf_nlist(10) == 256 and ivf_nlist(10**12) == 65_536
    assert ivf_nprobe(4096) == 64 and ivf_nprobe(8192) == 128 and ivf_nprobe(16) == 16
    assert pq_subquantizers(512) == 64 and 300 % pq_subquantizers(300) == 0
    assert bytes_per_vector("Flat", 512) < bytes_per_vector("IVF4096,Flat", 512)
    assert bytes_per_vector("IVF4096,PQ64", 512) < bytes_per_vector("IVF4096,Flat", 512) / 10


@pytest.mark.parametrize("bad", [(-1, 512, None), (10, 0, None), (10, 512, 0)])
def test_bad_input_is_named(bad: tuple[int, int, int | None]) -> None:
    with pytest.raises(ValueError, match=r"n_vectors|dimension|memory_budget"):
        choose_index(*bad)


@pytest.mark.parametrize(
    "n, budget", [(1_000, None), (1_000_000, None), (10_000_000, 8 * 2**30), (10**7, 2**31)]
)
def test_factories_build_in_faiss_and_the_store(n: int, budget: int | None) -> None:
    choice = choose_index(n, 64, budget)
    index = faiss.index_factory(64, choice.factory, faiss.METRIC_INNER_PRODUCT)
    assert index.d == 64
    store = VectorStore(64, choice.factory, **choice.vector_options())
    assert store.factory.endswith(choice.factory)
    ivf = faiss.try_extract_index_ivf(faiss.index_factory(64, choice.factory))
    if choice.nprobe is not None:
        assert ivf is not None and choice.nprobe <= ivf.nlist
        assert choice.train_size >= 30 * ivf.nlist


# ----------------------------------------------------------------------------- recall on real vectors

FIXTURE = Path(__file__).parent / "fixtures" / "region_vectors_reference.npz"
GENERATOR = Path(__file__).parent.parent / "benchmarks" / "realistic_vectors.py"


def realistic_vectors_module() -> Any:
    """``benchmarks/realistic_vectors.py`` (the benchmarks' generator; not an installed module)."""
    spec = importlib.util.spec_from_file_location("realistic_vectors", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_policy_ivf_parameters_reach_the_recall_target_on_real_region_vectors() -> None:
    """Real MaskInversion region vectors (600, from the bundled model) replicated to 20k; text
    queries from its text tower: the policy's nlist/nprobe rule must reach recall@10 >= 0.95."""
    rv = realistic_vectors_module()
    with np.load(FIXTURE) as z:
        base, text = z["vectors"].astype(np.float32), z["text_vectors"].astype(np.float32)
    n, k = 20_000, 10
    database = rv.Replicator(base, seed=3).generate(n)
    truth = rv.exact_topk(database, text, k)[1] + 1  # ids are rows + 1
    nlist = ivf_nlist(n)
    choice = IndexChoice(f"IVF{nlist},Flat", nprobe=ivf_nprobe(nlist), train_size=30 * nlist)
    store = VectorStore(database.shape[1], choice.factory, **choice.vector_options())
    store.add(np.arange(1, n + 1), database)
    assert store.is_trained  # trained on the first train_size vectors, as the store does
    found = store.search(text, k)[1]
    recall = rv.recall_at_k(found, truth)
    assert recall >= 0.95, recall
    # and the knob matters: one probe loses recall on the same index (the test can fail)
    faiss.extract_index_ivf(store.index).nprobe = 1
    assert rv.recall_at_k(store.search(text, k)[1], truth) < recall
