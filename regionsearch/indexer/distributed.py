"""Embedding on a Ray cluster: images mapped over Ray Data actors, one writer in the driver.

``regionsearch index PHOTOS --ray [ADDRESS]`` keeps everything that makes a run safe in this
process: the plan, the image rows, the store and its crash protocol (an image is done only when
its SQL rows and vectors are committed). Only the per-image work moves out:

    driver:  plan → upsert image rows → Ray Data: from_items(paths) ──► writer (Indexer._write)
    CPU actors:  map_batches(_ImageWorker): decode → masks → embed ──(image, regions, vectors)┘
    GPU actors:  map_batches(_prepare) CPU tasks: decode → masks ──► map_batches(_EmbedWorker)

Each actor loads the backbone and embedder once (``num_gpus=1`` actors on a cluster with GPUs,
``num_cpus=1`` actors otherwise) and runs the functions of :mod:`regionsearch.indexer.work`,
the same as the single-process path, so a corrupt image comes back as a failure with its
reason and the run goes on. With GPU actors, decoding and mask proposals (CPU work, often
longer than the embedding: see ``benchmarks/ray_speedup.py``) run as CPU tasks on every free
core ahead of them, so that a GPU does not wait for one core's proposals; a mask source that
runs on a GPU itself (SAM on cuda) stays inside the GPU actor. Results stream back as they
finish (any order); images that never came back stay 'pending' and the next run does them.

Workers read the photos and the model by the driver's paths: on a multi-node cluster both must
be on shared storage mounted at the same place (the bundled ``reference`` model always is).
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from regionsearch.errors import RegionSearchError
from regionsearch.indexer.work import (
    Embedded,
    Failed,
    ImageJob,
    Prepared,
    embed_prepared,
    prepare_image,
    process_image,
)

if TYPE_CHECKING:
    from regionsearch.embedders import RegionEmbedder
    from regionsearch.indexer.report import IndexReport
    from regionsearch.indexer.scan import PlanItem

log = logging.getLogger(__name__)

#: Images per Ray Data block at most: a block's results come back when its actor finishes it,
#: so small blocks stream (progress, commits) and balance better; 32 bounds the block count
#: (driver memory) for plans of millions of images.
MAX_IMAGES_PER_BLOCK = 32
#: Seconds to wait for a TCP answer from a cluster address before calling it unreachable
#: (``ray.init`` itself retries an unreachable address for minutes).
CONNECT_TIMEOUT_S = 5.0


class RayClusterError(RegionSearchError):
    """The Ray cluster cannot be reached, or its workers cannot do the work."""


# ----------------------------------------------------------------------------- the cluster


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing listens at ``host:port``.

    ``auto`` (the cluster this machine belongs to) is left to Ray, which fails fast for it.
    """
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(
            f"Ray address {address!r}: expected HOST:PORT (the head's GCS, e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT (Ray Client) or auto"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayClusterError(
            f"cannot reach a Ray cluster at {address!r} ({reason}): is the head node running "
            "(`ray start --head`) and is the port open from here?"
        ) from None


@contextlib.contextmanager
def ray_cluster(address: str | None = None) -> Iterator[None]:
    """Ray for the length of a run: a local one (no address), or the cluster at ``address``.

    A Ray already initialised in this process (a notebook, a test) is used as it is and left
    running; one started here is shut down at the end.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address is not None:
        check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises bare Exception too (a raylet slow to start)
        where = f"at {address!r}" if address else "locally"
        raise RayClusterError(f"cannot start or join Ray {where}: {_first_line(exc)}") from None
    try:
        yield
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- the actors


@dataclass(frozen=True)
class EmbedderSpec:
    """How an actor rebuilds the driver's embedder (sent to every actor, so no weights).

    ``description`` is the driver's ``embedder.describe()``: an actor that builds something
    else (another model file at the same path on its node) refuses to start instead of mixing
    vectors made two ways into one index.
    """

    model: str
    embedder: str
    pretrained: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    description: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        embedder: RegionEmbedder,
        model: str,
        pretrained: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> EmbedderSpec:
        """The spec of an embedder built in the driver from ``model`` and ``options``."""
        describe = getattr(embedder, "describe", None)
        return cls(
            model=model,
            embedder=embedder.name,
            pretrained=pretrained,
            options=dict(options or {}),
            description=describe() if callable(describe) else None,
        )

    def build(self, device: str) -> RegionEmbedder:
        """Load the backbone on ``device`` and the embedder on it (once per actor)."""
        from regionsearch.backbone import load_backbone
        from regionsearch.embedders import get_embedder

        backbone = load_backbone(self.model, self.pretrained, device)
        embedder = get_embedder(self.embedder, backbone, **self.options)
        if self.description is not None and embedder.describe() != self.description:
            raise RayClusterError(
                f"a Ray worker built {embedder.describe()} from {self.model!r}, the driver "
                f"{self.description}: the model files differ between nodes"
            )
        return embedder


class _ImageWorker:
    """A Ray Data actor: one embedder, loaded once; each call does a batch of images."""

    def __init__(self, spec: EmbedderSpec, job: ImageJob, device: str) -> None:
        from regionsearch.image_io import configure_pillow

        configure_pillow(job.max_pixels)  # a fresh worker process starts with Pillow's defaults
        self.embedder = spec.build(device)
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = [
            pickle.dumps(process_image(Path(str(path)), str(rel), self.job, self.embedder))
            for path, rel in zip(batch["path"], batch["rel"], strict=True)
        ]
        return {"key": batch["key"], "outcome": np.array(outcomes, dtype=object)}


def _prepare(batch: dict[str, np.ndarray], job: ImageJob) -> dict[str, np.ndarray]:
    """The CPU stage ahead of GPU actors: decode + masks (masks travel as RLE)."""
    from regionsearch.image_io import configure_pillow

    configure_pillow(job.max_pixels)
    outcomes = [
        pickle.dumps(
            prepare_image(
                Path(str(path)), str(rel), job.mask_source, job.max_side, False, job.max_pixels
            )
        )
        for path, rel in zip(batch["path"], batch["rel"], strict=True)
    ]
    return {"key": batch["key"], "prepared": np.array(outcomes, dtype=object)}


class _EmbedWorker:
    """A GPU actor behind :func:`_prepare`: embeds what the CPU tasks prepared."""

    def __init__(self, spec: EmbedderSpec, job: ImageJob, device: str) -> None:
        self.embedder = spec.build(device)
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for raw in batch["prepared"]:
            prepared = pickle.loads(raw)
            if isinstance(prepared, Prepared):
                prepared = embed_prepared(self.embedder, prepared, self.job.dimension)
            outcomes.append(pickle.dumps(prepared))
        return {"key": batch["key"], "outcome": np.array(outcomes, dtype=object)}


# ----------------------------------------------------------------------------- the mapper


@dataclass
class RayMapper:
    """An :class:`~regionsearch.indexer.pipeline.ImageMapper` over a Ray Data actor pool.

    Args:
        spec: how actors build the embedder.
        actors: actor pool size (default: one per GPU of the cluster, else one per CPU).
        device: the actors' torch device (default: ``cuda`` when the cluster has GPUs, where
            each actor then holds one GPU; else ``cpu``, one CPU per actor).
        split: decode + masks as CPU tasks ahead of the embedding actors (default: with GPU
            actors, unless the mask source itself runs on a GPU).
    """

    spec: EmbedderSpec
    actors: int | None = None
    device: str | None = None
    split: bool | None = None

    def resources(self) -> tuple[str, int, dict[str, float]]:
        """(device, pool size, Ray resources per actor) on the running cluster."""
        import ray

        total = ray.cluster_resources()
        gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
        device = self.device or ("cuda" if gpus else "cpu")
        if device.startswith("cuda"):
            if not gpus:
                raise RayClusterError(f"device {device!r}: the Ray cluster has no GPU")
            actors = self.actors or gpus
            return device, actors, {"num_gpus": 1}
        actors = self.actors or max(cpus, 1)
        return device, actors, {"num_cpus": 1}

    def map(
        self, items: list[PlanItem], job: ImageJob, report: IndexReport
    ) -> Iterator[tuple[PlanItem, Embedded | Failed]]:
        """Yield ``(item, outcome)`` as actors finish images (see the module doc)."""
        import ray

        if not ray.is_initialized():
            raise RayClusterError("Ray is not running: use `with ray_cluster(address):`")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        device, actors, per_actor = self.resources()
        log.info("ray: %d actor(s) on %s, %s each", actors, device, per_actor)
        rows = [
            {"key": i, "path": str(item.entry.path), "rel": item.entry.rel}
            for i, item in enumerate(items)
        ]
        blocks = min(len(rows), max(actors * 4, math.ceil(len(rows) / MAX_IMAGES_PER_BLOCK)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds.context.enable_progress_bars = False  # the writer shows the run's own bar
        ds.context.print_on_execution_start = False
        split = self.split
        if split is None:
            on_gpu = str(getattr(job.mask_source, "device", "cpu")).startswith("cuda")
            split = "num_gpus" in per_actor and not on_gpu
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if split and "num_cpus" in per_actor and actors >= cpus:
            raise RayClusterError(
                f"{actors} CPU actors leave none of the cluster's {cpus} CPUs to the decode + "
                "mask tasks: use fewer actors, or split=False"
            )
        if split:
            ds = ds.map_batches(_prepare, fn_kwargs={"job": job}, batch_size=1, num_cpus=1)
        ds = ds.map_batches(
            _EmbedWorker if split else _ImageWorker,
            fn_constructor_kwargs={"spec": self.spec, "job": job, "device": device},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            **per_actor,
        )
        results = iter(ds.iter_rows())
        try:
            while True:
                waited = time.perf_counter()
                try:
                    row = next(results)
                except StopIteration:
                    return
                except Exception as exc:  # an actor died or could not start
                    raise RayClusterError(
                        "the Ray workers failed: "
                        f"{_first_line(exc)}; what was stored is kept: run again to resume"
                    ) from exc
                report.wait_seconds += time.perf_counter() - waited
                yield items[int(row["key"])], pickle.loads(row["outcome"])
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # stops the streaming execution (Ctrl-C, or the writer failed)


def _first_line(exc: BaseException) -> str:
    """The useful line of a Ray error (they carry whole remote tracebacks)."""
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
