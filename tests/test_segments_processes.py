"""SegmentedFaissBackend across processes: a scripted writer SIGKILLed at random moments
(commits and background merges in flight) always reopens at a committed state, and a reader
process sees only committed states, both checked against a numpy oracle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from store_fixtures import oracle_search, unit_vectors

from regionsearch.store.segments import SegmentedFaissBackend

D = 16
BATCH = 12  # vectors the scripted writer adds per round


pytestmark = pytest.mark.usefixtures("faiss_single_thread")  # see store_fixtures


# ----------------------------------------------------------------------------- scripted writer
# Round i adds ids [i*BATCH+1, (i+1)*BATCH] and removes every 5th id of round i-2, then commits.
# The parent recomputes the expected state after any round from the round number alone.


def round_ids(i: int) -> np.ndarray:
    return np.arange(i * BATCH + 1, (i + 1) * BATCH + 1, dtype=np.int64)


def round_removed(i: int) -> np.ndarray:
    return round_ids(i - 2)[::5] if i >= 2 else np.empty(0, np.int64)


def expected_state(rounds_done: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted live ids, their vectors) after ``rounds_done`` committed rounds."""
    if rounds_done <= 0:
        return np.empty(0, np.int64), np.empty((0, D), np.float32)
    ids = np.concatenate([round_ids(i) for i in range(rounds_done)])
    vecs = np.concatenate([unit_vectors(BATCH, D, seed=i) for i in range(rounds_done)])
    gone = np.concatenate([round_removed(i) for i in range(rounds_done)])
    keep = ~np.isin(ids, gone)
    return ids[keep], vecs[keep]


def writer_main(directory: str, rounds: int, pause: float) -> None:
    """The child process: commit ``rounds`` rounds, printing each round number once durable.
    Tiny segments and a low merge threshold keep background merges running all the time."""
    import faiss

    faiss.omp_set_num_threads(1)
    backend = SegmentedFaissBackend(
        directory, D, segment_size=48, merge_threshold=3, background_merge=True
    )
    held = backend.ids()
    start = int(held.max()) // BATCH if held.size else 0  # continue after a kill
    for i in range(start, start + rounds):
        backend.add(round_ids(i), unit_vectors(BATCH, D, seed=i))
        backend.remove(round_removed(i))
        backend.commit()
        print(i + 1, flush=True)
        if i % 4 == 3:
            backend.merge()
        time.sleep(pause)
    backend.close()


def start_writer(directory: Path, rounds: int, pause: float) -> subprocess.Popen:
    here = Path(__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r}); from test_segments_processes import writer_main; "
        f"writer_main({str(directory)!r}, {rounds}, {pause})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )


def assert_state(backend: SegmentedFaissBackend, rounds_done: int) -> None:
    ids, vecs = expected_state(rounds_done)
    np.testing.assert_array_equal(backend.ids(), ids)
    if ids.size:
        q = unit_vectors(3, D, seed=999)
        scores, found = backend.search(q, 7)
        o_scores, o_ids = oracle_search(vecs, ids, q, 7)
        np.testing.assert_array_equal(found, o_ids)
        np.testing.assert_allclose(scores, o_scores, atol=1e-5)


def matching_round(backend: SegmentedFaissBackend, candidates: range) -> int:
    """The committed round count whose expected ids ``backend`` holds (fails if none)."""
    got = backend.ids()
    for r in candidates:
        if np.array_equal(got, expected_state(r)[0]):
            return r
    raise AssertionError(f"state matches no committed round in {list(candidates)}")


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_committed_state(tmp_path):
    rng = np.random.default_rng(1)
    directory = tmp_path / "v.segments"
    done = 0
    for _ in range(3):
        proc = start_writer(directory, rounds=200, pause=0.0)
        first = proc.stdout.readline()  # the first commit is durable: start-up is behind us
        time.sleep(float(rng.uniform(0.0, 0.6)))  # then rounds and merges, killed at random
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        printed = [int(x) for x in (first + out).split()]
        last = printed[-1] if printed else done
        # the kill can land between the commit and its print: one round more is committed too
        backend = SegmentedFaissBackend(directory, D, read_only=True)
        done = matching_round(backend, range(last, last + 2))
        assert_state(backend, done)
        backend.close()
    assert done >= 3  # every run committed at least once before its kill


@pytest.mark.slow
def test_reader_process_sees_only_committed_states(tmp_path):
    directory = tmp_path / "v.segments"
    proc = start_writer(directory, rounds=30, pause=0.02)
    reader = SegmentedFaissBackend(directory, D, read_only=True)
    seen = [0]
    try:
        while proc.poll() is None:
            if reader.refresh():
                r = matching_round(reader, range(seen[-1], seen[-1] + 31))
                assert_state(reader, r)
                seen.append(r)
    finally:
        proc.wait(timeout=60)
    reader.refresh()
    assert_state(reader, 30)
    assert len(seen) > 3 and seen == sorted(seen)
