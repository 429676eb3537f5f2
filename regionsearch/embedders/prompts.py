"""Visual-prompt baselines: edit the image so that CLIP looks at the region, then embed it.

Each baseline turns ``(image, mask)`` into one ordinary RGB image (the *prompted image*) and
embeds it like any photo with :meth:`Backbone.preprocess` + :meth:`Backbone.encode_images`, through
the one helper :func:`encode_prompted`. None of them needs weights beyond the backbone's:

- ``global``: the whole image, ignoring the mask (the lower bound every region method must beat);
- ``crop``: the mask's bounding box plus a margin;
- ``masked-crop``: the same crop with pixels outside the mask set to the model's mean colour;
- ``red-circle``: a red ellipse drawn around the mask's box on the full image;
- ``blur``: everything outside the mask blurred (or greyed out) on the full image.

Soft masks: boxes and fills use the mask thresholded at 0.5 (``mask >= 0.5``). A soft mask that
never reaches 0.5 would then be empty, so for such a mask every pixel ``> 0`` counts instead: every
mask that passes validation yields a prompt (see :func:`binarize_masks`).

Square resizing: prompted images keep their own aspect ratio until ``Backbone.preprocess``
square-resizes them (no centre crop, so nothing of the region is cut off).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from regionsearch.backbone import Backbone, masks_to_tensor
from regionsearch.backbone.preprocess import ImageLike, to_rgb_array
from regionsearch.embedders.base import RegionEmbedder, check_positive, check_resolution

RED = (255, 0, 0)


# ---------------------------------------------------------------------- shared helpers
def encode_prompted(
    backbone: Backbone, images: Iterable[np.ndarray], resolution: int, batch_size: int = 32
) -> torch.Tensor:
    """Embed prompted images in batches: ``N`` images of any size → ``(N, d)`` float32, L2-normalised.

    ``images`` may be a generator, so that only ``batch_size`` prompted full-size images are alive
    at once (one per mask adds up for 100 masks on a 12-megapixel photo). Each image goes through
    ``Backbone.preprocess`` (square resize to ``resolution``, normalisation) and the batch through
    ``Backbone.encode_images``.
    """
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(backbone.preprocess(image, resolution))
        if len(batch) == batch_size:
            out.append(backbone.encode_images(torch.stack(batch)))
            batch = []
    if batch:
        out.append(backbone.encode_images(torch.stack(batch)))
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


def binarize_masks(masks: torch.Tensor) -> np.ndarray:
    """``(M, H, W)`` float masks in [0, 1] → ``(M, H, W)`` boolean masks for boxes and fills.

    Threshold at 0.5 (``>= 0.5``); a mask with no value ``>= 0.5`` falls back to ``> 0`` so that it
    is never empty (validated masks have at least one positive pixel).
    """
    hard = masks >= 0.5
    weak = ~hard.flatten(1).any(dim=1)
    if weak.any():
        hard[weak] = masks[weak] > 0
    return hard.cpu().numpy()


class Box(NamedTuple):
    """A pixel box, ``top``/``left`` inclusive and ``bottom``/``right`` exclusive (slice bounds)."""

    top: int
    left: int
    bottom: int
    right: int


def mask_box(mask: np.ndarray, margin: float = 0.0) -> Box:
    """Bounding box of the ``True`` pixels of an ``(H, W)`` mask, grown and clamped to the image.

    Each side moves out by ``margin`` times the box's extent along that axis (rounded half up), so
    a 10% margin on a 20 x 40 box adds 2 rows above and below and 4 columns left and right.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    pad_y = math.floor(margin * (bottom - top) + 0.5)
    pad_x = math.floor(margin * (right - left) + 0.5)
    height, width = mask.shape
    return Box(
        max(0, top - pad_y),
        max(0, left - pad_x),
        min(height, bottom + pad_y),
        min(width, right + pad_x),
    )


def mean_colour(backbone: Backbone) -> np.ndarray:
    """The model's normalisation mean as a ``(3,)`` uint8 colour: it preprocesses to ~0 input."""
    return np.array([round(c * 255) for c in backbone.mean], dtype=np.uint8)


# ---------------------------------------------------------------------- base class
class PromptEmbedder(RegionEmbedder):
    """A baseline that embeds one prompted image per mask.

    Subclasses implement :meth:`prompt`; :meth:`prompted_images` exposes the images for
    inspection (the tests check them pixel by pixel).

    Options:
        resolution: square input size of the ViT (default: the model's native size).
        batch_size: prompted images per forward pass.
    """

    def __init__(
        self, backbone: Backbone, *, resolution: int | None = None, batch_size: int = 32
    ) -> None:
        super().__init__(backbone)
        self.resolution = check_resolution(backbone, resolution)
        self.batch_size = check_positive("batch_size", batch_size)

    @abstractmethod
    def prompt(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 image and ``(H, W)`` boolean mask → prompted ``(h, w, 3)`` uint8."""

    def _prompts(self, image: np.ndarray, masks: torch.Tensor) -> Iterator[np.ndarray]:
        for mask in binarize_masks(masks):
            yield self.prompt(image, mask)

    def prompted_images(
        self, image: ImageLike, masks: np.ndarray | torch.Tensor
    ) -> list[np.ndarray]:
        """The prompted images :meth:`embed` would encode, validated the same way."""
        rgb = to_rgb_array(image)
        return list(self._prompts(rgb, masks_to_tensor(masks, rgb.shape[:2])))

    def _embed(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        return encode_prompted(
            self.backbone, self._prompts(image, masks), self.resolution, self.batch_size
        )

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "resolution": self.resolution, "batch_size": self.batch_size}


# ---------------------------------------------------------------------- baselines
class GlobalEmbedder(PromptEmbedder):
    """The whole image's CLIP embedding for every mask (computed once per image)."""

    name = "global"

    def prompt(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return image

    def _embed(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        vector = encode_prompted(self.backbone, [image], self.resolution)  # (1, d)
        return vector.expand(masks.shape[0], -1)


class CropEmbedder(PromptEmbedder):
    """Crop to the mask's bounding box grown by ``margin`` (relative, default 10%), clamped.

    The crop is square-resized by the backbone, so elongated regions get stretched rather than
    padded: the same treatment the whole image gets everywhere else in regionsearch.
    """

    name = "crop"

    def __init__(
        self,
        backbone: Backbone,
        *,
        margin: float = 0.1,
        resolution: int | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(backbone, resolution=resolution, batch_size=batch_size)
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0 (a fraction of the box size), got {margin}")
        self.margin = float(margin)

    def prompt(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        box = mask_box(mask, self.margin)
        return image[box.top : box.bottom, box.left : box.right]

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "margin": self.margin}


class MaskedCropEmbedder(CropEmbedder):
    """The crop of :class:`CropEmbedder` with pixels outside the mask set to the mean colour.

    The mean colour (from ``backbone.mean``) normalises to ~0, i.e. "no signal" for the ViT, which
    is what the MaskInversion paper's masked-crop baseline uses.
    """

    name = "masked-crop"

    def prompt(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        box = mask_box(mask, self.margin)
        window = (slice(box.top, box.bottom), slice(box.left, box.right))
        out = image[window].copy()
        out[~mask[window]] = mean_colour(self.backbone)
        return out


class RedCircleEmbedder(PromptEmbedder):
    """Draw a red ellipse around the mask's bounding box on the full image (Shtedritski et al.).

    The ellipse is the smallest axis-aligned one through the box's corners (semi-axes sqrt(2)
    times the box's half-extents), so its inner edge touches the box only at the corners and the
    region itself stays unpainted; the line, ``thickness`` times the image's longer side thick
    (at least 1 px), lies outside it. Parts of the ellipse beyond the image are clipped.
    """

    name = "red-circle"

    def __init__(
        self,
        backbone: Backbone,
        *,
        thickness: float = 0.01,
        resolution: int | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(backbone, resolution=resolution, batch_size=batch_size)
        if not thickness > 0:
            raise ValueError(
                f"thickness must be > 0 (a fraction of the image size), got {thickness}"
            )
        self.thickness = float(thickness)

    def line_width(self, height: int, width: int) -> int:
        """Outline width in pixels for an image of ``height x width``."""
        return max(1, round(self.thickness * max(height, width)))

    def prompt(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        box = mask_box(mask)
        line = self.line_width(*image.shape[:2])
        # Pixel-centre coordinates, as PIL's ellipse takes inclusive pixel bounds.
        cy, cx = (box.top + box.bottom - 1) / 2, (box.left + box.right - 1) / 2
        ry = (box.bottom - box.top) / 2 * math.sqrt(2) + line
        rx = (box.right - box.left) / 2 * math.sqrt(2) + line
        canvas = Image.fromarray(image)
        ImageDraw.Draw(canvas).ellipse(
            [round(cx - rx), round(cy - ry), round(cx + rx), round(cy + ry)],
            outline=RED,
            width=line,
        )
        return np.asarray(canvas)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "thickness": self.thickness}


class BlurEmbedder(PromptEmbedder):
    """Keep the mask's pixels, blur (or grey out) everything else, on the full image.

    Options:
        outside: ``"blur"`` (Gaussian blur, standard deviation ``sigma`` times the image's longer
            side, at least 1 px) or ``"grey"`` (outside pixels set to the model's mean colour).
        sigma: relative blur strength.
    """

    name = "blur"
    MODES = ("blur", "grey")

    def __init__(
        self,
        backbone: Backbone,
        *,
        outside: str = "blur",
        sigma: float = 0.02,
        resolution: int | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(backbone, resolution=resolution, batch_size=batch_size)
        if outside not in self.MODES:
            raise ValueError(f"outside must be one of {self.MODES}, got {outside!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (a fraction of the image size), got {sigma}")
        self.outside = outside
        self.sigma = float(sigma)

    def background(self, image: np.ndarray) -> np.ndarray:
        """What replaces the pixels outside the mask: ``(H, W, 3)`` uint8 (same for every mask)."""
        if self.outside == "grey":
            return np.broadcast_to(mean_colour(self.backbone), image.shape)
        radius = max(1.0, self.sigma * max(image.shape[:2]))
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))

    def _prompts(self, image: np.ndarray, masks: torch.Tensor) -> Iterator[np.ndarray]:
        background = self.background(image)  # blur once per image, not once per mask
        for mask in binarize_masks(masks):
            yield np.where(mask[:, :, None], image, background)

    def prompt(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask[:, :, None], image, self.background(image))

    def describe(self) -> dict[str, object]:
        options = {**super().describe(), "outside": self.outside}
        if self.outside == "blur":
            options["sigma"] = self.sigma
        return options


__all__ = [
    "BlurEmbedder",
    "Box",
    "CropEmbedder",
    "GlobalEmbedder",
    "MaskedCropEmbedder",
    "PromptEmbedder",
    "RedCircleEmbedder",
    "binarize_masks",
    "encode_prompted",
    "mask_box",
    "mean_colour",
]
