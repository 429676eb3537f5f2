"""SegmentedFaissBackend beyond the shared contract: commit cost, refresh, merge, crash safety.

The contract (search, filters, durability) runs in tests/test_vector_backend_contract.py; here
are the properties only a segmented store has: a commit writes what was added (old files are
never touched), a reader's refresh opens only new files, a merge changes no result and drops
tombstones (a writer SIGKILLed at random moments: tests/test_segments_processes.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from store_fixtures import make_regions, oracle_search, unit_vectors

from regionsearch.store.ann_policy import IndexChoice
from regionsearch.store.backend import RegionFilter
from regionsearch.store.segment_files import (
    LIST_FILE,
    SegmentStoreError,
    read_list,
    read_segment,
    segment_name,
)
from regionsearch.store.segments import SegmentedFaissBackend

D = 16


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


# ----------------------------------------------------------------------------- helpers


def fill(
    directory: Path, n: int, seed: int = 0, **options
) -> tuple[SegmentedFaissBackend, np.ndarray, np.ndarray]:
    backend = SegmentedFaissBackend(directory, D, background_merge=False, **options)
    ids = np.arange(1, n + 1, dtype=np.int64) * 2
    vecs = unit_vectors(n, D, seed)
    backend.add(ids, vecs)
    return backend, ids, vecs


def file_stats(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in directory.iterdir()
    }


# ----------------------------------------------------------------------------- commit cost


def test_commit_writes_only_what_was_added(tmp_path):
    backend, ids, _ = fill(tmp_path, 2000)
    backend.commit()
    before = file_stats(tmp_path)
    written = []
    for round_ in range(3):
        new_ids = np.arange(10_000 + 100 * round_, 10_000 + 100 * round_ + 50, dtype=np.int64)
        backend.add(new_ids, unit_vectors(50, D, seed=round_ + 1))
        backend.remove(ids[round_ * 10 : round_ * 10 + 3])
        backend.commit()
        after = file_stats(tmp_path)
        changed = {n for n in after if after[n] != before.get(n)} - {LIST_FILE}
        # one new segment (the 50 added vectors) and one tombstone file (3 ids), nothing else
        assert {n.split("-")[0] for n in changed} == {"seg", "tomb"} and len(changed) == 2
        for name in set(before) & set(after):
            if name != LIST_FILE:
                assert after[name] == before[name]  # old files never rewritten
        seg = next(n for n in changed if n.startswith("seg"))
        written.append(after[seg][2])
        before = after
    # the new segment's size is the added vectors' bytes (+ a constant header), not the index's
    assert all(w < 50 * D * 4 + 50 * 8 + 1024 for w in written)
    assert backend.ntotal == 2000 + 150 - 9


def test_empty_commit_writes_nothing(tmp_path):
    backend, _, _ = fill(tmp_path, 10)
    backend.commit()
    generation = read_list(tmp_path).generation
    before = file_stats(tmp_path)
    backend.commit()
    assert read_list(tmp_path).generation == generation and file_stats(tmp_path) == before


def test_large_commit_is_cut_into_bounded_segments(tmp_path):
    backend, ids, vecs = fill(tmp_path, 250, segment_size=100)
    backend.commit()
    assert [s.n for s in read_list(tmp_path).segments] == [100, 100, 50]
    backend.close()
    again = SegmentedFaissBackend(tmp_path, D, read_only=True)
    q = unit_vectors(4, D, seed=3)
    np.testing.assert_array_equal(again.search(q, 9)[1], oracle_search(vecs, ids, q, 9)[1])


def test_removed_before_commit_never_reaches_disk(tmp_path):
    backend, ids, _ = fill(tmp_path, 30)
    backend.remove(ids[:5])
    backend.commit()
    listing = read_list(tmp_path)
    assert listing.tombstones == [] and sum(s.n for s in listing.segments) == 25
    assert backend.n_tombstones == 0 and backend.ntotal == 25


def test_a_removed_id_can_be_added_again(tmp_path):
    """Reconciliation re-adds the vector of a region whose vector was lost: the old copy stays
    tombstoned in its segment, the new one lives in a newer segment."""
    backend, ids, vecs = fill(tmp_path, 20)
    backend.commit()
    backend.remove(ids[:3])
    backend.commit()
    new = unit_vectors(3, D, seed=77)
    backend.add(ids[:3], new)
    backend.remove(ids[:1])  # removed and added again before a commit, too
    backend.add(ids[:1], new[:1])
    backend.commit()
    expected = vecs.copy()
    expected[:3] = new
    q = unit_vectors(4, D, seed=78)
    for check in ("committed", "merged"):
        reader = SegmentedFaissBackend(tmp_path, D, read_only=True)
        np.testing.assert_array_equal(reader.ids(), ids, err_msg=check)
        np.testing.assert_allclose(reader.reconstruct(ids[:3]), new, atol=1e-6)
        np.testing.assert_array_equal(reader.search(q, 6)[1], oracle_search(expected, ids, q, 6)[1])
        assert reader.ntotal == 20
        backend.merge(everything=True)


# ----------------------------------------------------------------------------- readers


def test_refresh_opens_only_new_files(tmp_path):
    writer, ids, vecs = fill(tmp_path, 100)
    writer.commit()
    reader = SegmentedFaissBackend(tmp_path, D, read_only=True)
    old = dict(reader._segments)
    new_ids = np.arange(1000, 1040, dtype=np.int64)
    new_vecs = unit_vectors(40, D, seed=5)
    writer.add(new_ids, new_vecs)
    writer.remove(ids[:7])
    writer.commit()
    assert reader.refresh()
    for name, seg in old.items():
        assert reader._segments[name] is seg  # not re-read
    assert len(reader._segments) == len(old) + 1
    all_ids = np.concatenate([ids[7:], new_ids])
    all_vecs = np.concatenate([vecs[7:], new_vecs])
    np.testing.assert_array_equal(reader.ids(), np.sort(all_ids))
    q = unit_vectors(3, D, seed=6)
    np.testing.assert_array_equal(
        reader.search(q, 10)[1], oracle_search(all_vecs, all_ids, q, 10)[1]
    )
    assert not reader.refresh()


def test_read_only_open_returns_before_big_segments_load_and_searches_wait(tmp_path):
    """A reader's open does not wait for big segment files; the first search does, and its
    answers equal the eager open's (lazy_load_bytes=0 makes every segment "big")."""
    writer, ids, _ = fill(tmp_path, 150, segment_size=60)
    writer.remove(ids[:5])
    writer.commit()
    release, started = threading.Event(), threading.Event()

    def blocked_reader(directory: Path, name: str):
        started.set()
        assert release.wait(10), "test never released the load"
        return read_segment(directory, name)

    lazy = SegmentedFaissBackend(
        tmp_path, D, read_only=True, lazy_load_bytes=0, segment_reader=blocked_reader
    )
    assert started.wait(10) and lazy._loads.pending >= 1  # open returned; loads still running
    eager = SegmentedFaissBackend(tmp_path, D, read_only=True, lazy_load_bytes=None)
    q = unit_vectors(4, D, seed=3)
    release.set()
    sel = RegionFilter.from_ids(ids[::3])
    for got, want in [
        (lazy.search(q, 7), eager.search(q, 7)),
        (lazy.search(q, 5, sel), eager.search(q, 5, sel)),
    ]:
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert lazy.ntotal == eager.ntotal == 145 and lazy._loads.pending == 0
    lazy.close()
    eager.close()


def test_a_failed_background_load_is_raised_on_search_and_close(tmp_path):
    writer, _, _ = fill(tmp_path, 40)
    writer.commit()

    def broken_reader(directory: Path, name: str):
        raise OSError(f"disk gone while reading {name}")

    reader = SegmentedFaissBackend(
        tmp_path, D, read_only=True, lazy_load_bytes=0, segment_reader=broken_reader
    )
    for _ in range(2):  # every call that needs the segment raises, not a partial answer
        with pytest.raises(SegmentStoreError, match="failed to load: disk gone"):
            reader.search(unit_vectors(1, D, seed=1), 3)
    with pytest.raises(SegmentStoreError, match="disk gone"):
        reader.close()


def test_reader_opened_before_first_commit_is_empty_then_refreshes(tmp_path):
    reader = SegmentedFaissBackend(tmp_path / "v.segments", D, read_only=True)
    assert reader.ntotal == 0 and not (tmp_path / "v.segments").exists()
    writer, _ids, _ = fill(tmp_path / "v.segments", 20)
    writer.commit()
    assert reader.refresh() and reader.ntotal == 20


def test_second_writer_is_refused(tmp_path):
    writer, _, _ = fill(tmp_path, 5)
    with pytest.raises(RuntimeError, match="another writer"):
        SegmentedFaissBackend(tmp_path, D)
    writer.close()
    SegmentedFaissBackend(tmp_path, D).close()


# ----------------------------------------------------------------------------- merging


def test_merge_changes_no_result_and_drops_tombstones(tmp_path):
    backend = SegmentedFaissBackend(tmp_path, D, segment_size=64, background_merge=False)
    all_ids, all_vecs = [], []
    for i in range(10):
        ids = np.arange(i * 20 + 1, i * 20 + 21, dtype=np.int64)
        vecs = unit_vectors(20, D, seed=i)
        backend.add(ids, vecs)
        backend.commit()
        all_ids.append(ids)
        all_vecs.append(vecs)
    ids, vecs = np.concatenate(all_ids), np.concatenate(all_vecs)
    backend.remove(ids[::3])
    backend.commit()
    reader = SegmentedFaissBackend(tmp_path, D, read_only=True)
    q = unit_vectors(5, D, seed=42)
    before = backend.search(q, 25)
    filt_before = backend.range_search(q[0], 0.2)
    assert backend.n_tombstones == ids[::3].size
    old_files = {s.name for s in read_list(tmp_path).segments}
    rewritten = backend.merge()
    assert rewritten == 10
    listing = read_list(tmp_path)
    assert len(listing.segments) < 10 and all(s.n <= 64 for s in listing.segments)
    assert backend.n_tombstones == 0 and listing.tombstones == []
    assert not any((tmp_path / n).exists() for n in old_files)  # sources deleted
    after = backend.search(q, 25)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    np.testing.assert_array_equal(backend.range_search(q[0], 0.2)[1], filt_before[1])
    keep = ~np.isin(ids, ids[::3])
    np.testing.assert_array_equal(after[1], oracle_search(vecs[keep], ids[keep], q, 25)[1])
    # a reader that still maps the deleted sources keeps answering, then refreshes
    np.testing.assert_array_equal(reader.search(q, 25)[1], before[1])
    assert reader.refresh()
    np.testing.assert_array_equal(reader.search(q, 25)[1], before[1])
    assert reader.n_tombstones == 0


def test_background_merge_starts_past_the_threshold(tmp_path):
    backend = SegmentedFaissBackend(
        tmp_path, D, segment_size=400, merge_threshold=4, background_merge=True
    )
    for i in range(6):
        backend.add(np.arange(i * 10 + 1, i * 10 + 11), unit_vectors(10, D, seed=i))
        backend.commit()
        backend.search(unit_vectors(1, D, seed=7), 5)  # searches go on while it merges
    backend._merger.wait()
    assert len(read_list(tmp_path).segments) < 6
    assert backend.ntotal == 60
    np.testing.assert_array_equal(backend.ids(), np.arange(1, 61))


def test_unlisted_files_of_a_crashed_merge_are_ignored_then_deleted(tmp_path):
    backend, ids, _vecs = fill(tmp_path, 40)
    backend.commit()
    listing = read_list(tmp_path)
    backend.close()
    # what a merge killed before its list swap leaves: a complete output and a partial one
    stray = tmp_path / segment_name(listing.next_seq)
    stray.write_bytes((tmp_path / listing.segments[0].name).read_bytes())
    (tmp_path / (segment_name(listing.next_seq + 1) + ".tmp")).write_bytes(b"partial")
    reader = SegmentedFaissBackend(tmp_path, D, read_only=True)
    assert len(reader._segments) == 1 and reader.ntotal == 40  # the list alone counts
    writer = SegmentedFaissBackend(tmp_path, D)
    assert not stray.exists() and len(list(tmp_path.glob("*.tmp"))) == 0
    np.testing.assert_array_equal(writer.ids(), ids)


@pytest.mark.parametrize(
    "choice",
    [
        IndexChoice("IVF8,Flat", nprobe=8, train_size=400),
        pytest.param(  # OPQ training: ~6 s on one idle core
            IndexChoice("OPQ4,IVF8,PQ4x4,Refine(Flat)", nprobe=8, train_size=600, k_factor=50.0),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["ivf", "opq-refine"],
)
def test_merged_ann_segments_search_filter_and_reconstruct(tmp_path, choice):
    """A merge builds the policy's structure; probing every list (and refining with the
    full vectors) it must answer exactly, with tombstones and filters applied inside FAISS."""
    backend = SegmentedFaissBackend(
        tmp_path,
        D,
        segment_size=2000,
        background_merge=False,
        index_policy=lambda n, d, budget: choice,
    )
    n = 900
    ids = np.arange(1, n + 1, dtype=np.int64) * 3
    vecs = unit_vectors(n, D, seed=11)
    for part in np.array_split(np.arange(n), 3):
        backend.add(ids[part], vecs[part])
        backend.commit()
    backend.merge()
    listing = read_list(tmp_path)
    assert [s.factory for s in listing.segments] == [choice.factory]
    backend.remove(ids[::4])
    backend.add(np.array([5000], np.int64), vecs[:1])  # a growing segment beside it
    keep = ~np.isin(ids, ids[::4])
    live_ids = np.concatenate([ids[keep], [5000]])
    live_vecs = np.concatenate([vecs[keep], vecs[:1]])
    q = unit_vectors(4, D, seed=12)
    np.testing.assert_array_equal(
        backend.search(q, 10)[1], oracle_search(live_vecs, live_ids, q, 10)[1]
    )
    filt = RegionFilter(id_ranges=np.array([[0, 1500]], np.int64), ids=np.array([5000]))
    allowed = filt.allows(live_ids)
    found = backend.search(q, 10, selector=filt)[1]
    np.testing.assert_array_equal(
        found, oracle_search(live_vecs[allowed], live_ids[allowed], q, 10)[1]
    )
    tiny = RegionFilter.from_ids(ids[[1, 2, 3]])  # scored exactly: IVF could miss them
    assert set(backend.search(q[:1], 5, selector=tiny)[1][0, :3]) == set(ids[[1, 2, 3]])
    rec = backend.reconstruct(ids[[1, 2]])
    tolerance = 1e-5 if choice.factory.startswith("IVF") else 0.5  # PQ codes are approximate
    np.testing.assert_allclose(rec, vecs[[1, 2]], atol=tolerance)
    backend.commit()
    reader = SegmentedFaissBackend(tmp_path, D, read_only=True)  # memory-mapped IVF lists
    np.testing.assert_array_equal(
        reader.search(q, 10)[1], oracle_search(live_vecs, live_ids, q, 10)[1]
    )


# ----------------------------------------------------------------------------- index + CLI


def test_new_index_uses_segments_and_compact_merges_them(tmp_path):
    from typer.testing import CliRunner

    from regionsearch.cli.app import app
    from regionsearch.store import RegionIndex

    index = RegionIndex.create(tmp_path / "photos", model="m", embedder="e", dimension=D)
    assert index.vectors_location.endswith("vectors.segments")
    assert index.manifest.vector_backend == "faiss-segments"
    images = []
    for i in range(6):  # one checkpoint per photo: six small segments
        image = index.upsert_image(f"{i}.jpg", content_hash=f"h{i}", width=48, height=32)
        index.add_image_regions(image.id, make_regions(4), unit_vectors(4, D, seed=i))
        index.checkpoint()
        images.append(image)
    index.delete_image(images[2].id)
    index.checkpoint()
    q = unit_vectors(2, D, seed=50)
    before = index.search(q, 8)
    index.close()
    directory = tmp_path / "photos" / "vectors.segments"
    assert len(read_list(directory).segments) == 6 and read_list(directory).tombstones

    bad = CliRunner().invoke(app, ["compact", str(tmp_path / "photos"), "--memory-budget", "8XB"])
    assert bad.exit_code == 2 and "--memory-budget" in bad.output and "8XB" in bad.output
    result = CliRunner().invoke(
        app, ["compact", str(tmp_path / "photos"), "--memory-budget", "64MB"]
    )
    assert result.exit_code == 0, result.output
    assert "6 segment(s) rewritten" in result.output
    listing = read_list(directory)
    assert len(listing.segments) == 1 and listing.tombstones == []
    assert listing.memory_budget == 64 * 2**20  # recorded for later merges
    again = RegionIndex.open(tmp_path / "photos", read_only=True)
    after = again.search(q, 8)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    assert again.vectors.ntotal == 20
    again.close()


def test_an_index_with_a_single_faiss_file_keeps_it(tmp_path):
    from regionsearch.store import RegionIndex
    from regionsearch.store.vectors import VectorStore

    (tmp_path / "old").mkdir()
    VectorStore(D).save(tmp_path / "old" / "vectors.faiss")  # as made before segments
    index = RegionIndex.create(tmp_path / "old", model="m", embedder="e", dimension=D)
    assert index.vectors_location.endswith("vectors.faiss")
    assert isinstance(index.vectors, VectorStore)
    assert not (tmp_path / "old" / "vectors.segments").exists()
    index.close()


# ----------------------------------------------------------------------------- memory budget


@pytest.mark.slow  # OPQ training: ~10 s on one idle core
def test_merge_under_a_small_budget_compresses_and_keeps_recall(tmp_path):
    """A budget below what IVF-Flat needs makes a full merge write the policy's compressed
    structure (fast-scan PQ re-ranked by SQ8); on real region vectors (the bundled fixture,
    replicated) its text-query top-10 must still hold >= 0.9 of the exact top-10. The budget
    is recorded in segments.json, so the next writer keeps it."""
    from test_ann_policy import FIXTURE, realistic_vectors_module

    rv = realistic_vectors_module()
    with np.load(FIXTURE) as z:
        base, text = z["vectors"].astype(np.float32), z["text_vectors"].astype(np.float32)
    n, d = 3000, base.shape[1]
    database = rv.Replicator(base, seed=5).generate(n)
    budget = n * 400  # bytes: IVF-Flat needs ~1,090 a vector at d=256, the compressed one ~350
    backend = SegmentedFaissBackend(tmp_path, d, background_merge=False, memory_budget=budget)
    ids = np.arange(1, n + 1, dtype=np.int64)
    for part in np.array_split(np.arange(n), 3):
        backend.add(ids[part], database[part])
        backend.commit()
    assert backend.merge(everything=True) == 3
    listing = read_list(tmp_path)
    assert listing.memory_budget == budget and len(listing.segments) == 1
    factory = listing.segments[0].factory
    assert "x4fs" in factory and "Refine(SQ8)" in factory, factory
    truth = oracle_search(database, ids, text, 10)[1]
    found = backend.search(text, 10)[1]
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    assert np.mean(hits) / 10 >= 0.9, np.mean(hits) / 10
    backend.close()
    reader = SegmentedFaissBackend(tmp_path, d, read_only=True)  # memory-mapped, same answers
    np.testing.assert_array_equal(reader.search(text, 10)[1], found)
    assert reader.memory_budget == budget


def test_a_merged_segment_gets_its_share_of_the_budget(tmp_path):
    backend = SegmentedFaissBackend(tmp_path, D, background_merge=False, memory_budget="1GB")
    vecs = unit_vectors(1200, D, seed=3)
    for part in np.array_split(np.arange(1200), 4):
        backend.add(part + 1, vecs[part])
        backend.commit()
    policy_calls = []
    backend.index_policy = lambda n, d, budget: (
        policy_calls.append((n, budget)) or IndexChoice("IVF8,Flat", nprobe=8, train_size=400)
    )
    assert backend.merge(everything=True) == 4
    assert policy_calls[-1] == (1200, 2**30)  # the whole budget: this segment is the whole store
    assert all(budget == 2**30 * n // 1200 for n, budget in policy_calls)  # shares by size
    for part in np.array_split(np.arange(1200), 2):  # two new segments, half the store...
        backend.add(part + 2001, vecs[part])
        backend.commit()
    policy_calls.clear()
    backend.segment_size = backend.max_segment_size = 1200  # ...merge on their own
    backend.merge(everything=True)
    assert policy_calls[-1] == (1200, 2**29)  # half the store: half the budget


@pytest.mark.parametrize("bad", ["lots", "-1GB", "0", "8XB"])
def test_a_bad_memory_budget_is_named(tmp_path, bad):
    with pytest.raises(ValueError, match="memory budget"):
        SegmentedFaissBackend(tmp_path, D, memory_budget=bad)


def test_a_full_merge_restructures_a_lone_segment_once(tmp_path):
    """A store that grew past the exact range in one commit gets the policy's structure from
    ``compact --all``; a second full merge finds nothing to do."""
    backend, ids, vecs = fill(tmp_path, 900)
    backend.commit()
    backend.index_policy = lambda n, d, budget: IndexChoice("IVF8,Flat", nprobe=8, train_size=400)
    assert backend.merge(everything=True) == 1
    assert [s.factory for s in read_list(tmp_path).segments] == ["IVF8,Flat"]
    assert backend.merge(everything=True) == 0
    q = unit_vectors(3, D, seed=4)
    np.testing.assert_array_equal(backend.search(q, 5)[1], oracle_search(vecs, ids, q, 5)[1])
