"""The one interface every region embedder implements: ``embed(image, masks) -> (M, d)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone import Backbone, masks_to_tensor
from regionsearch.backbone.preprocess import ImageLike, to_rgb_array


def check_resolution(backbone: Backbone, resolution: int | None) -> int:
    """The input size to run the ViT at: ``resolution`` or the model's native size.

    Raises ``ValueError`` when it is not a positive multiple of the patch size, at construction
    time rather than on the first image.
    """
    size = backbone.image_size if resolution is None else int(resolution)
    patch = backbone.patch_size
    if size <= 0 or size % patch:
        raise ValueError(
            f"resolution must be a positive multiple of the patch size {patch}, got {size}"
        )
    return size


def check_positive(name: str, value: int) -> int:
    """Validate a count option such as ``batch_size``."""
    if int(value) < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


class RegionEmbedder(ABC):
    """Maps an image and M masks to M L2-normalised vectors in the backbone's joint space.

    Subclasses implement :meth:`_embed` on validated input; this class owns validation, so every
    embedder rejects the same bad input the same way (see :func:`masks_to_tensor`).
    """

    #: Registry name, e.g. ``"maskinversion"``.
    name: ClassVar[str]

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def embed(self, image: ImageLike, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embed each mask of ``image``.

        Args:
            image: PIL image, ``(H, W, 3)`` uint8 array, or tensor.
            masks: ``(M, H, W)`` (or one ``(H, W)``) boolean, 0/1 integer or float-in-[0, 1]
                masks at the image's size.

        Returns:
            ``(M, d)`` float32 CPU tensor, each row L2-normalised.
        """
        rgb = to_rgb_array(image)
        mask_tensor = masks_to_tensor(masks, rgb.shape[:2])
        vectors = self._embed(rgb, mask_tensor)
        return F.normalize(vectors.detach().float(), dim=-1).cpu()

    @abstractmethod
    def _embed(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        """``image`` ``(H, W, 3)`` uint8, ``masks`` ``(M, H, W)`` float in [0, 1] → ``(M, d)``."""

    def describe(self) -> dict[str, object]:
        """Name and settings, recorded in index manifests and eval outputs."""
        return {"embedder": self.name, "model": self.backbone.name}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({settings})"
