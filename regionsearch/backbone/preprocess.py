"""Image and mask preprocessing for region work.

CLIP's stock transform centre-crops, which would cut masks out of the frame. Region embedders
need the image and its masks to stay aligned, so everything here resizes the whole image to a
square (aspect ratio is not kept) and resizes masks the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from regionsearch.errors import InvalidImageError, InvalidMaskError

ImageLike = Image.Image | np.ndarray | torch.Tensor


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Return an ``(H, W, 3) uint8`` array for a PIL image, a numpy array or a CHW/HWC tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = np.moveaxis(image, 0, -1)
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"expected a PIL image, numpy array or tensor, got {type(image)!r}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InvalidImageError(f"expected an image of shape (H, W, 3), got {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
            image = image * 255.0
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidImageError(f"image has no pixels: shape {image.shape}")
    return image


def image_to_tensor(
    image: ImageLike,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize the whole image (no crop) to ``size`` and normalise: returns ``(3, S, S)`` float32."""
    rgb = to_rgb_array(image)
    height, width = (size, size) if isinstance(size, int) else size
    resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def masks_to_tensor(
    masks: np.ndarray | torch.Tensor | Sequence, image_hw: tuple[int, int]
) -> torch.Tensor:
    """Validate masks against the image and return them as ``(M, H, W)`` float32 in [0, 1].

    Boolean and integer 0/1 masks become hard masks; float masks in [0, 1] stay soft. Anything
    else (wrong size, wrong rank, values outside [0, 1], no masks, all-empty masks) raises
    :class:`InvalidMaskError`, because an embedder fed such input would return a vector that
    silently describes the wrong thing.
    """
    if isinstance(masks, list | tuple):
        if len(masks) == 0:
            raise InvalidMaskError("no masks given: pass at least one (H, W) mask")
        masks = np.stack([np.asarray(m) for m in masks])
    if isinstance(masks, np.ndarray):
        if masks.dtype == object:
            raise InvalidMaskError("masks must be a numeric or boolean array, got dtype=object")
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if not isinstance(masks, torch.Tensor):
        raise InvalidMaskError(f"masks must be an array or tensor, got {type(masks)!r}")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise InvalidMaskError(f"masks must have shape (M, H, W), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise InvalidMaskError("no masks given: pass at least one (H, W) mask")
    if tuple(masks.shape[1:]) != tuple(image_hw):
        raise InvalidMaskError(
            f"mask size {tuple(masks.shape[1:])} differs from image size {tuple(image_hw)} (H, W): "
            "masks must cover the full image"
        )
    if masks.dtype == torch.bool:
        out = masks.float()
    elif masks.is_floating_point():
        out = masks.float()
        if not torch.isfinite(out).all():
            raise InvalidMaskError("masks contain NaN or infinite values")
        if out.min() < 0 or out.max() > 1:
            raise InvalidMaskError("float masks must lie in [0, 1]")
    else:
        if masks.min() < 0 or masks.max() > 1:
            raise InvalidMaskError(
                "integer masks must be 0/1; for a label image, split it into one mask per label"
            )
        out = masks.float()
    empty = (out.flatten(1).amax(dim=1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise InvalidMaskError(f"mask(s) {empty} are empty: every mask needs at least one pixel")
    return out


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize ``(M, H, W)`` masks to ``size`` with area averaging (soft result in [0, 1])."""
    height, width = (size, size) if isinstance(size, int) else size
    shrinking = height <= masks.shape[-2] and width <= masks.shape[-1]
    mode = "area" if shrinking else "bilinear"
    extra = {} if shrinking else {"align_corners": False}
    return F.interpolate(masks[:, None], size=(height, width), mode=mode, **extra)[:, 0].clamp_(
        0, 1
    )
