"""The resumable indexing run: scan → (decode + masks in a worker pool) → embed → store.

The per-image work lives in :mod:`regionsearch.indexer.work`; an :class:`ImageMapper` (Ray
actors, :mod:`regionsearch.indexer.distributed`) can do it elsewhere, and this module's
single writer stores what comes back exactly as it stores its own.

Flow of :meth:`Indexer.run`::

    plan = build_plan(root, index)                  # stat, then sha256 for stat-changed files
    delete_images(plan.deleted)                     # SQL tombstones + FAISS removes
    upsert_images(new + changed + touched)          # rows exist (ids) before any work
    pool (threads or processes), bounded window:    # decode + EXIF + hash + mask proposals + RLE
        prepare(item) -> Prepared | Failed
    main thread, in plan order:                     # embedding is the heavy part (torch threads)
        vectors = embedder.embed(pixels, masks)
        every `batch_images` images: upsert_images(hash, size, mtime, w, h)
                                     add_images_regions([...])   # W1 + W2 of the store protocol
        the store checkpoints on its own cadence; a final checkpoint at the end
    any failure of one image -> mark_image_failed(image_id, reason); the run goes on

Crash safety comes from the store (``store/index.py``): a killed run leaves rows 'pending'
whose vectors were never checkpointed; the next writable open drops them (R2) and puts their
images back to 'pending', and the next plan retries every 'pending' image. Ctrl-C stops the
pool, stores what is already embedded, checkpoints and returns a report with
``interrupted=True``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from regionsearch import DEFAULT_MAX_PIXELS
from regionsearch.errors import RegionSearchError
from regionsearch.indexer.report import IndexReport
from regionsearch.indexer.scan import PlanItem, ScanPlan, build_plan
from regionsearch.indexer.work import (
    Embedded,
    Failed,
    ImageJob,
    Prepared,
    embed_prepared,
    prepare_image,
)

if TYPE_CHECKING:
    from regionsearch.backbone import Backbone
    from regionsearch.embedders import RegionEmbedder
    from regionsearch.masks import MaskSource
    from regionsearch.store import RegionIndex

__all__ = [
    "Embedded",
    "Failed",
    "ImageJob",
    "ImageMapper",
    "Indexer",
    "Prepared",
    "RootMismatchError",
    "index_folder",
    "prepare_image",
]

log = logging.getLogger(__name__)


class RootMismatchError(RegionSearchError):
    """The index was built from another photo folder."""


class ImageMapper(Protocol):
    """Somewhere else to do the per-image work (e.g. Ray actors): the writer stays here.

    ``map`` yields one ``(item, Embedded | Failed)`` per item, in any order, as they finish;
    it records in ``report`` only what the writer cannot see (``wait_seconds``). Closing the
    iterator (Ctrl-C) stops the work that is still running.
    """

    def map(
        self, items: list[PlanItem], job: ImageJob, report: IndexReport
    ) -> Iterator[tuple[PlanItem, Embedded | Failed]]: ...


# ----------------------------------------------------------------------------- worker side


_WORKER_STATE: dict[str, Any] = {}


def _init_process_worker(mask_source: Any, max_side: int | None, max_pixels: int | None) -> None:
    import torch

    from regionsearch.image_io import configure_pillow

    torch.set_num_threads(1)
    configure_pillow(max_pixels)  # a spawned worker starts with Pillow's defaults
    _WORKER_STATE["source"] = mask_source
    _WORKER_STATE["max_side"] = max_side
    _WORKER_STATE["max_pixels"] = max_pixels


def _prepare_in_process(path: Path, rel: str) -> Prepared | Failed:
    state = _WORKER_STATE
    return prepare_image(path, rel, state["source"], state["max_side"], False, state["max_pixels"])


# ----------------------------------------------------------------------------- the indexer


class Indexer:
    """Index a photo folder into a :class:`RegionIndex` (resumable, incremental).

    Args:
        index: a writable index whose manifest matches ``backbone``/``embedder``.
        backbone: the model the embedder runs on (checked against the manifest).
        embedder: a region embedder (``get_embedder(name, backbone)``).
        mask_source: where regions come from (``AutomaticProposals()``, COCO, PNG, SAM).
        workers: decode + mask workers (0: everything in the main thread).
        executor: ``"thread"`` (default: no start-up cost, Pillow/NumPy/skimage release the
            GIL for most of the work) or ``"process"`` (pure-Python proposal code runs in
            parallel; the mask source must be picklable).
        batch_images: images per ``add_images_regions`` call (one SQL transaction each).
        queue_size: images decoded ahead of the embedder (default ``2 * workers``); bounds
            memory: each holds its pixels and masks.
        max_side: downscale photos whose longest side is larger before masks and embedding
            (stored masks are then at the reduced size; not for COCO/PNG masks). JPEGs are
            decoded at a reduced scale, so photos far above ``max_pixels`` still index.
        max_pixels: refuse (as a failed image, with the reason) photos that would decode to
            more pixels than this.
        retry_failed: re-try images that failed before even if their file is unchanged.
        allow_root_change: accept a photo root other than the one recorded in the index (the
            folder moved; stored paths are relative to it).
        progress: show a tqdm bar (ETA, images/s, regions/s).
        mapper: do the per-image work there instead of in this process (``workers``,
            ``executor`` and ``queue_size`` then do not apply); this process still plans and
            is the only writer, so resumability is the same.
    """

    def __init__(
        self,
        index: RegionIndex,
        backbone: Backbone | None,
        embedder: RegionEmbedder,
        mask_source: MaskSource,
        *,
        workers: int = 2,
        executor: str = "thread",
        batch_images: int = 8,
        queue_size: int | None = None,
        max_side: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        retry_failed: bool = False,
        allow_root_change: bool = False,
        progress: bool = True,
        mapper: ImageMapper | None = None,
    ) -> None:
        from regionsearch.store.manifest import check_embedder_description, check_manifest

        if executor not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}")
        if workers < 0 or batch_images < 1:
            raise ValueError("workers must be >= 0 and batch_images >= 1")
        backbone = backbone if backbone is not None else embedder.backbone
        check_manifest(
            index.manifest,
            model=backbone.name,
            embedder=embedder.name,
            dimension=backbone.embed_dim,
            location=str(index.directory),
        )
        # The options too (e.g. -E steps=5): vectors made two ways must not mix in one index.
        describe = getattr(embedder, "describe", None)  # a bare test double may not describe
        self.description = describe() if callable(describe) else None
        if self.description is not None:
            check_embedder_description(index.manifest, self.description)
        self.index = index
        self.backbone = backbone
        self.embedder = embedder
        self.mask_source = mask_source
        self.workers = int(workers)
        self.executor_kind = executor
        self.batch_images = int(batch_images)
        self.queue_size = int(queue_size) if queue_size else max(2, 2 * self.workers)
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.retry_failed = retry_failed
        self.allow_root_change = allow_root_change
        self.progress = progress
        self.mapper = mapper
        self.job = ImageJob(mask_source, max_side, max_pixels, index.dimension)

    # ------------------------------------------------------------------ planning

    def plan(self, root: str | Path) -> ScanPlan:
        """What :meth:`run` would do (reads only stat-changed files; writes nothing)."""
        root = Path(root).expanduser().resolve()
        self._check_root(root, write=False)
        return build_plan(root, self.index, retry_failed=self.retry_failed)

    def _check_root(self, root: Path, *, write: bool) -> None:
        recorded = self.index.manifest.image_root
        if recorded == str(root):
            return
        if recorded is not None and not self.allow_root_change:
            has_images = next(iter(self.index.iter_images(batch_size=1)), None) is not None
            if has_images:
                raise RootMismatchError(
                    f"index {self.index.name!r} was built from {recorded}, not {root}: use "
                    "another --name for another folder, or --allow-root-change if the folder "
                    "moved (stored paths are relative to it)"
                )
        if write:
            self.index.set_image_root(str(root))

    # ------------------------------------------------------------------ the run

    def run(self, root: str | Path, plan: ScanPlan | None = None) -> IndexReport:
        """Bring the index up to date with the files under ``root``."""
        start = time.perf_counter()
        root = Path(root).expanduser().resolve()
        self._check_root(root, write=True)
        if self.description is not None and self.index.manifest.embedder_description is None:
            self.index.record_embedder_description(self.description)  # older index: accepted
        if plan is None:
            plan = build_plan(root, self.index, retry_failed=self.retry_failed)
        report = IndexReport.for_plan(root, plan)
        idx = self.index
        try:
            if plan.deleted:
                report.regions_deleted = idx.delete_images([r.id for r in plan.deleted])
                report.images_deleted = len(plan.deleted)
            self._register(plan)
            report.touched = len(plan.touched)
            self._process(plan.to_process, report)
        except KeyboardInterrupt:
            report.interrupted = True
            log.warning("interrupted: checkpointing what is done; run again to resume")
        finally:
            idx.checkpoint()
            report.seconds = time.perf_counter() - start
        return report

    def _register(self, plan: ScanPlan) -> None:
        """Image rows for new/changed/touched files (ids for the workers' results)."""
        rows: list[dict[str, Any]] = []
        for item in [*plan.new, *plan.changed, *plan.touched]:
            e = item.entry
            row: dict[str, Any] = {"path": e.rel, "size_bytes": e.size, "mtime": e.mtime}
            if item.content_hash is not None:
                row["content_hash"] = item.content_hash
            rows.append(row)
        if rows:
            records = self.index.upsert_images(rows)
            by_path = {r.path: r.id for r in records}
            for item in [*plan.new, *plan.changed, *plan.touched]:
                item.image_id = by_path[item.entry.rel]

    def _make_executor(self) -> cf.Executor | None:
        if self.workers == 0:
            return None
        if self.executor_kind == "thread":
            return cf.ThreadPoolExecutor(self.workers, thread_name_prefix="regionsearch-prep")
        return cf.ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process_worker,
            initargs=(self.mask_source, self.max_side, self.max_pixels),
        )

    def _submit(self, pool: cf.Executor | None, item: PlanItem) -> cf.Future:
        e = item.entry
        if pool is None:
            fut: cf.Future = cf.Future()
            fut.set_result(self._prepare(item))
            return fut
        if isinstance(pool, cf.ProcessPoolExecutor):
            return pool.submit(_prepare_in_process, e.path, e.rel)
        return pool.submit(self._prepare, item)

    def _prepare(self, item: PlanItem) -> Prepared | Failed:
        e = item.entry
        return prepare_image(e.path, e.rel, self.mask_source, self.max_side, True, self.max_pixels)

    def _process(self, items: list[PlanItem], report: IndexReport) -> None:
        if not items:
            return
        if self.mapper is not None:
            outcomes = self.mapper.map(items, self.job, report)
        else:
            outcomes = self._map_locally(items, report)
        self._write(len(items), outcomes, report)

    def _map_locally(
        self, items: list[PlanItem], report: IndexReport
    ) -> Iterator[tuple[PlanItem, Embedded | Failed]]:
        """Prepare in the pool (a bounded window, in plan order), embed in this thread."""
        pool = self._make_executor()
        todo = iter(items)
        window: collections.deque[tuple[PlanItem, cf.Future]] = collections.deque()

        def refill() -> None:
            while len(window) < (self.queue_size if pool is not None else 1):
                item = next(todo, None)
                if item is None:
                    return
                window.append((item, self._submit(pool, item)))

        try:
            refill()
            while window:
                item, fut = window.popleft()
                waited = time.perf_counter()
                try:
                    result = fut.result()
                except Exception as exc:
                    result = Failed(item.entry.rel, f"worker: {type(exc).__name__}: {exc}")
                report.wait_seconds += time.perf_counter() - waited
                refill()
                if isinstance(result, Prepared):
                    yield item, embed_prepared(self.embedder, result, self.index.dimension)
                else:
                    yield item, result
        finally:
            for _, fut in window:
                fut.cancel()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _write(
        self,
        total: int,
        outcomes: Iterator[tuple[PlanItem, Embedded | Failed]],
        report: IndexReport,
    ) -> None:
        """The single writer: failures recorded, embedded images stored every batch_images."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            unit="img",
            desc="indexing",
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        batch: list[tuple[PlanItem, Prepared, np.ndarray]] = []
        embedded_regions = 0
        t0 = time.perf_counter()
        try:
            with contextlib.closing(outcomes):  # Ctrl-C: stop the workers first
                for item, outcome in outcomes:
                    if isinstance(outcome, Failed):
                        self._fail(item, outcome.reason, report, outcome.meta)
                    else:
                        report.prepare_seconds += outcome.prepared.seconds
                        report.embed_calls += 1
                        report.embed_seconds += outcome.seconds
                        report.image_seconds.append(outcome.seconds)
                        report.image_regions.append(len(outcome.vectors))
                        batch.append((item, outcome.prepared, outcome.vectors))
                        embedded_regions += len(outcome.vectors)
                    if len(batch) >= self.batch_images:
                        self._store(batch, report)
                        batch = []
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    # Embedded, not yet stored, regions count: the store writes every
                    # batch_images images, and a rate of stored regions read 0.0 for whole
                    # short runs.
                    bar.set_postfix_str(
                        f"{embedded_regions / elapsed:.1f} regions/s, "
                        f"{report.images_failed} failed",
                        refresh=False,
                    )
                    bar.update(1)
            if batch:
                self._store(batch, report)
                batch = []
        except KeyboardInterrupt:
            if batch:  # already embedded: keep the work
                self._store(batch, report)
            raise
        finally:
            bar.close()

    def _store(
        self, batch: list[tuple[PlanItem, Prepared, np.ndarray]], report: IndexReport
    ) -> None:
        idx = self.index
        metas = [{"path": item.entry.rel, **prep.meta} for item, prep, _ in batch]
        idx.upsert_images(metas)
        try:
            idx.add_images_regions(
                [(item.image_id, prep.regions, vecs) for item, prep, vecs in batch]
            )
            stored = batch
        except (ValueError, KeyError) as exc:
            if len(batch) == 1:
                item = batch[0][0]
                self._fail(item, f"store: {type(exc).__name__}: {exc}", report)
                return
            stored = []
            for entry in batch:  # find the culprit; store the others one by one
                try:
                    idx.add_images_regions([(entry[0].image_id, entry[1].regions, entry[2])])
                    stored.append(entry)
                except (ValueError, KeyError) as one:
                    self._fail(entry[0], f"store: {type(one).__name__}: {one}", report)
        for _, prep, _ in stored:
            report.images_indexed += 1
            report.regions_indexed += len(prep.regions)

    def _fail(
        self,
        item: PlanItem,
        reason: str,
        report: IndexReport,
        meta: dict[str, Any] | None = None,
    ) -> None:
        assert item.image_id is not None
        if meta:
            self.index.upsert_images([{"path": item.entry.rel, **meta}])
        self.index.mark_image_failed(item.image_id, reason)
        report.images_failed += 1
        report.failures.append((item.entry.rel, reason))
        log.info("failed: %s: %s", item.entry.rel, reason)


def index_folder(
    root: str | Path,
    index: RegionIndex,
    embedder: RegionEmbedder,
    mask_source: MaskSource,
    **options: Any,
) -> IndexReport:
    """One-call form: ``Indexer(index, embedder.backbone, embedder, mask_source, **options).run``."""
    return Indexer(index, embedder.backbone, embedder, mask_source, **options).run(root)
