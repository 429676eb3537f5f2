"""Crash safety of ``regionsearch index``: a child process SIGKILLed at random moments, then
resumed, stores every region exactly once (SQL rows and vectors agree).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from indexer_helpers import run, write_image
from PIL import Image
from store_fixtures import assert_consistent

from regionsearch.backbone import Backbone
from regionsearch.embedders import get_embedder
from regionsearch.masks import PngMaskSource
from regionsearch.store import RegionIndex

pytestmark = pytest.mark.usefixtures("faiss_single_thread")


# ----------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import sys, typer
    from regionsearch.cli.index import register
    app = typer.Typer()
    register(app)
    sys.argv = ["regionsearch"] + sys.argv[1:]
    app()
    """
)


def _label_masks(root: Path, masks: Path, n: int) -> dict[str, int]:
    """n photos with a PNG label image each holding 1..5 instances; returns rel -> count."""
    expected = {}
    masks.mkdir(parents=True)
    for i in range(n):
        p = write_image(root / f"d{i % 3}" / f"img{i:03d}.png", 1000 + i, size=(40, 32))
        k = 1 + i % 5
        label = np.zeros((32, 40), np.uint8)
        for j in range(k):
            label[:, j * 8 : (j + 1) * 8] = j + 1
        Image.fromarray(label).save(masks / f"{p.stem}.png")
        expected[p.relative_to(root).as_posix()] = k
    return expected


def _db_regions(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("select count(*) from regions").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _crash_scenario(
    tmp_path: Path,
    model_dir: Path,
    seed: int,
    kills: int,
    checkpoint_s: float,
    max_delay: float,
    *,
    extra_args: Sequence[str] = (),
    count_rows: Callable[[], int] | None = None,
    open_kwargs: dict[str, Any] | None = None,
) -> None:
    """SIGKILL the CLI indexing a folder, resume, check nothing is lost or doubled.

    ``extra_args`` go to ``regionsearch index`` (another database or vector location), with
    ``count_rows`` counting its region rows and ``open_kwargs`` reopening the index."""
    rng = random.Random(seed)
    root, masks = tmp_path / "photos", tmp_path / "masks"
    expected = _label_masks(root, masks, 30)
    total = sum(expected.values())
    idx_dir = tmp_path / "indexes"
    args = [
        sys.executable,
        "-c",
        CHILD,
        "index",
        str(root),
        "--index-dir",
        str(idx_dir),
        "--name",
        "crash",
        "--model",
        f"local-dir:{model_dir}",
        "-e",
        "masked-crop",
        "--masks",
        str(masks),
        "--batch-images",
        "2",
        "--workers",
        "1",
        "--checkpoint-seconds",
        str(checkpoint_s),
        "--no-progress",
        *extra_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    db = idx_dir / "crash" / "regions.db"
    count = count_rows or (lambda: _db_regions(db))
    for attempt in range(kills):  # the CLI in a child process, SIGKILLed at a random point
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        start_rows = count()
        target = start_rows + rng.randint(1, max(2, (total - start_rows) // 2))
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if count() >= target:
                time.sleep(rng.random() * max_delay)  # land anywhere: W1, W2, C1, C2
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            # A later run may finish the little work left before the random kill point comes;
            # that is a clean exit, not a crash, and leaves nothing more to kill.
            output = proc.communicate()[0].decode(errors="replace")[-2000:]
            assert proc.returncode == 0 and attempt > 0, output
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # resume in-process through the Python API (same settings as the CLI run)
    backbone = Backbone.load(f"local-dir:{model_dir}", device="cpu")
    embedder = get_embedder("masked-crop", backbone)
    with RegionIndex.open(idx_dir / "crash", **(open_kwargs or {})) as index:
        repaired = index.last_reconcile
        durable = index.stats().images["indexed"]
        report = run(index, backbone, embedder, PngMaskSource(masks), root=root, batch_images=2)
        assert report.images_failed == 0 and not report.interrupted
        # durable work is kept, everything else is done once more
        assert report.images_indexed == len(expected) - durable
    assert repaired is not None
    print(f"seed {seed}: {durable} images durable at the kill; reconcile: {repaired}")
    with RegionIndex.open(idx_dir / "crash", **(open_kwargs or {})) as index:
        assert index.last_reconcile is not None and index.last_reconcile.clean
        assert_consistent(index)
        images = {rec.path: rec for rec in index.iter_images()}
        assert set(images) == set(expected)
        assert all(rec.status == "indexed" for rec in images.values())
        for rel, rec in images.items():
            regions = index.regions_of_image(rec.id)
            labels = sorted(int(r.external_id) for r in regions)
            assert labels == list(range(1, expected[rel] + 1)), rel  # none lost, none doubled
        assert index.stats().regions == total == index.vectors.ntotal
        assert index.model == backbone.name


def test_sigkill_anywhere_then_resume(tmp_path, model_dir):
    # checkpoints 1 s apart, kill right after rows appear: uncheckpointed batches must be dropped
    _crash_scenario(tmp_path, model_dir, seed=0, kills=1, checkpoint_s=1.0, max_delay=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_anywhere_then_resume_more_seeds(tmp_path, model_dir, seed):
    checkpoint_s = (0.05, 1.0)[seed % 2]
    _crash_scenario(tmp_path, model_dir, seed, kills=2, checkpoint_s=checkpoint_s, max_delay=0.3)
