"""Segment Anything (SAM) and SAM 2 automatic masks as region proposals.

Both wrap their package's automatic mask generator (a grid of point prompts, decoded in
batches, filtered by predicted IoU and stability, de-duplicated by box NMS) and hand back the
same thing as every other source: the whole image first, then non-empty full-image masks by
falling predicted IoU (clipped to [0, 1]), ties broken by stability score, at most
``max_regions`` in all. The packages and their weights are optional, so they are imported
only when a generator is built.

One generator holds one model and one image state (``set_image``), so calls on one instance
are serialised with a lock: the indexer's worker threads may share it safely.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from regionsearch.masks.sources import ImageProposer, RegionProposal, as_rgb

__all__ = ["Sam2Proposals", "SamProposals", "generated_to_proposals", "sam2_config_names"]

SAM_INSTALL = "pip install 'regionsearch[sam]'"
SAM2_INSTALL = "pip install 'regionsearch[sam2]'"

# What sam2.build_sam.build_sam2 applies by default ("apply_postprocessing"): fall back to
# multi-mask output when the single mask is unstable.
_SAM2_POSTPROCESSING = {
    "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
}


def generated_to_proposals(
    found: Sequence[Mapping[str, Any]], hw: tuple[int, int], source: str, max_regions: int
) -> list[RegionProposal]:
    """A generator's records (``segmentation``, ``predicted_iou``, ``stability_score``) as
    proposals: whole image first, empty masks dropped, best predicted IoU next.

    The sort is stable, so equal scores keep the generator's own (deterministic) order.
    """
    scored = []
    for m in found:
        mask = np.asarray(m["segmentation"], dtype=bool)
        if mask.shape != hw:
            raise ValueError(f"generator returned a {mask.shape} mask for a {hw} image")
        if not mask.any():
            continue
        score = float(np.clip(m.get("predicted_iou", 0.0), 0.0, 1.0))
        scored.append((-score, -float(m.get("stability_score", 0.0)), mask, score))
    scored.sort(key=lambda t: (t[0], t[1]))
    out = [RegionProposal(np.ones(hw, dtype=bool), source="full-image", score=1.0)]
    out.extend(
        RegionProposal(mask, source=source, score=score)
        for _, _, mask, score in scored[: max_regions - 1]
    )
    return out


def _import_optional(module: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this mask source needs the {module} package: {install}") from exc


class _GeneratedMasks(ImageProposer):
    """Shared plumbing: decode if needed, run the generator under a lock, convert its output."""

    source: ClassVar[str]

    def __init__(
        self, generator: Any, max_regions: int, device: str, arguments: dict[str, Any]
    ) -> None:
        self._generator = generator
        self.max_regions = int(max_regions)
        self.device = str(device)
        self._lock = threading.Lock()
        self._arguments = arguments  # what rebuilds it in another process

    def propose(self, image: np.ndarray) -> list[RegionProposal]:
        """Proposals for an (H, W[, C]) image: the whole image first, then by predicted IoU."""
        rgb = as_rgb(image)
        if not rgb.flags.writeable:  # torch warns on read-only arrays (decoded photos are)
            rgb = rgb.copy()
        with self._lock, self._precision():
            found = self._generator.generate(rgb)
        return generated_to_proposals(found, rgb.shape[:2], self.source, self.max_regions)

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as its arguments: a process worker loads its own model from the checkpoint
        (the models hold TorchScript parts and a lock, which do not pickle)."""
        return _rebuild, (type(self), self._arguments)


def _rebuild(cls: type[_GeneratedMasks], arguments: dict[str, Any]) -> _GeneratedMasks:
    return cls(**arguments)


def _check_common(checkpoint: Path, what: str, where: str, max_regions: int) -> None:
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {checkpoint} ({where})")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1 (the whole image), got {max_regions}")


class SamProposals(_GeneratedMasks):
    """Segment Anything (``segment_anything``) automatic masks as proposals.

    ``model_type`` is a key of ``segment_anything.sam_model_registry`` (``vit_h``, ``vit_l``,
    ``vit_b``); ``generator_kwargs`` go to ``SamAutomaticMaskGenerator``.
    """

    source = "sam"

    def __init__(
        self,
        checkpoint: str | Path,
        model_type: str = "vit_h",
        device: str = "cpu",
        max_regions: int = 50,
        **generator_kwargs: Any,
    ) -> None:
        sam = _import_optional("segment_anything", SAM_INSTALL)
        path = Path(checkpoint)
        _check_common(
            path,
            "SAM",
            f"download the {model_type} weights from "
            "https://github.com/facebookresearch/segment-anything#model-checkpoints",
            max_regions,
        )
        if model_type not in sam.sam_model_registry:
            raise ValueError(
                f"unknown SAM model_type {model_type!r}; expected one of "
                f"{sorted(sam.sam_model_registry)}"
            )
        model = sam.sam_model_registry[model_type](checkpoint=str(path)).to(device)
        arguments = dict(checkpoint=path, model_type=model_type, device=device)
        super().__init__(
            sam.SamAutomaticMaskGenerator(model, **generator_kwargs),
            max_regions,
            device,
            dict(arguments, max_regions=max_regions, **generator_kwargs),
        )


class Sam2Proposals(_GeneratedMasks):
    """SAM 2 (the ``sam2`` package) automatic masks as proposals.

    ``config`` is one of the package's model configs (``configs/sam2.1/sam2.1_hiera_l.yaml``,
    or just ``sam2.1_hiera_l``; see :func:`sam2_config_names`) or a path to a YAML file of the
    same form; when omitted it is read off an official checkpoint name
    (``sam2.1_hiera_large.pt`` -> ``configs/sam2.1/sam2.1_hiera_l.yaml``). The checkpoint
    must match the config exactly (missing or extra weights are an error, as in
    ``sam2.build_sam``).

    On CUDA the model runs under bfloat16 autocast where the GPU supports it (as SAM 2's own
    examples do); ``points_per_batch`` prompts are decoded per forward pass, so raise it on a
    large GPU. ``generator_kwargs`` go to ``SAM2AutomaticMaskGenerator`` unchanged.
    """

    source = "sam2"

    def __init__(
        self,
        checkpoint: str | Path,
        config: str | Path | None = None,
        device: str = "cpu",
        max_regions: int = 50,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        **generator_kwargs: Any,
    ) -> None:
        _import_optional("sam2", SAM2_INSTALL)
        path = Path(checkpoint)
        _check_common(
            path,
            "SAM 2",
            "download one from https://github.com/facebookresearch/sam2#download-checkpoints",
            max_regions,
        )
        for name, value in (
            ("points_per_side", points_per_side),
            ("points_per_batch", points_per_batch),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
        ):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        config_file = _sam2_config_file(config, path)
        model = _build_sam2(config_file, path, device)
        options = dict(
            points_per_side=int(points_per_side),
            points_per_batch=int(points_per_batch),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            **generator_kwargs,
        )
        generator = importlib.import_module("sam2.automatic_mask_generator")
        arguments = dict(checkpoint=path, config=config_file, device=device)
        super().__init__(
            generator.SAM2AutomaticMaskGenerator(model, **options),
            max_regions,
            device,
            dict(arguments, max_regions=max_regions, **options),
        )
        self.config = config_file

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        return _cuda_bfloat16(self.device)


@contextlib.contextmanager
def _cuda_bfloat16(device: str) -> Iterator[None]:
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _sam2_package_dir() -> Path:
    return Path(_import_optional("sam2", SAM2_INSTALL).__path__[0])


def sam2_config_names() -> list[str]:
    """Model configs shipped with the installed ``sam2`` package (training configs excluded)."""
    configs = _sam2_package_dir() / "configs"
    return sorted(
        p.relative_to(configs.parent).as_posix()
        for p in configs.rglob("*.yaml")
        if "training" not in p.parent.name
    )


def _sam2_config_file(config: str | Path | None, checkpoint: Path) -> Path:
    """The YAML file of ``config`` (a file, a packaged name or stem), or of the checkpoint."""
    if config is None:
        config = _config_for_checkpoint(checkpoint.name)
        if config is None:
            raise ValueError(
                f"cannot tell the SAM 2 config of {checkpoint.name}: pass one "
                "(--sam2-config), e.g. configs/sam2.1/sam2.1_hiera_l.yaml for sam2.1_hiera_large.pt"
            )
    as_file = Path(config).expanduser()
    if as_file.suffix in (".yaml", ".yml") and as_file.is_file():
        return as_file
    names = sam2_config_names()
    wanted = str(config).removesuffix(".yaml")
    for name in names:
        if wanted in (name.removesuffix(".yaml"), Path(name).stem):
            return _sam2_package_dir() / name
    raise ValueError(f"unknown SAM 2 config {str(config)!r}: not a YAML file, nor one of {names}")


def _config_for_checkpoint(file_name: str) -> str | None:
    """The packaged config of an official checkpoint file name, from sam2's own table."""
    build_sam = importlib.import_module("sam2.build_sam")
    table = getattr(build_sam, "HF_MODEL_ID_TO_FILENAMES", {})
    for config_name, checkpoint_name in table.values():
        if checkpoint_name == file_name:
            return str(config_name)
    return None


def _build_sam2(config_file: Path, checkpoint: Path, device: str) -> Any:
    """``sam2.build_sam.build_sam2`` for a YAML file, with a clear error for a wrong checkpoint."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_file)
    if "model" not in cfg:
        raise ValueError(f"{config_file} is not a SAM 2 model config (no 'model' section)")
    for key, value in _SAM2_POSTPROCESSING.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise ValueError(f"{checkpoint} is not a PyTorch checkpoint: {exc}") from exc
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} holds no state dict (expected {{'model': state_dict}})")
    mismatch = f"{checkpoint.name} does not match the SAM 2 config {config_file.name}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        first = str(exc).strip().splitlines()[-1].strip()
        raise ValueError(f"{mismatch} ({first}); pass the config of this checkpoint") from exc
    if missing or unexpected:
        raise ValueError(
            f"{mismatch}: {len(missing)} weights missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass the config of this "
            "checkpoint"
        )
    return model.to(device).eval()
