"""The ``Backbone``: one frozen CLIP model with its preprocessing, text encoder and ViT runner."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F

from regionsearch import DEFAULT_MODEL
from regionsearch.backbone.loading import LoadedModel, load_model, recorded_embedder_defaults
from regionsearch.backbone.preprocess import ImageLike, image_to_tensor
from regionsearch.backbone.text import (
    DEFAULT_TEMPLATES,
    TextBatcher,
    TextEmbeddingCache,
    encode_texts,
    encode_texts_cached,
)
from regionsearch.backbone.vit import ViTRunner


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    device: torch.device | str | None = None,
    allow_random: bool = False,
) -> Backbone:
    """:meth:`Backbone.load`, refusing random weights (meaningless results) unless the caller
    only measures speed (``allow_random``). What the CLI and the server load models with."""
    from regionsearch.errors import BackboneLoadError

    backbone = Backbone.load(model, pretrained, device)
    if backbone.random_init and not allow_random:
        raise BackboneLoadError(
            f"{model} has no weights (random init would give meaningless results): pass "
            f"--pretrained TAG_OR_FILE, or use --model {DEFAULT_MODEL}"
        )
    return backbone


class Backbone:
    """A frozen CLIP model shared by all region embedders.

    Holds the model (eval mode, no gradients), the preprocessing constants, a tokenizer and a
    :class:`ViTRunner` over the image tower. Embedders build on this instead of re-implementing
    loading, preprocessing or the ViT forward.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device | str | None = None,
        text_cache_size: int = 4096,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = loaded.model.to(self.device)
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.mean = tuple(loaded.mean)
        self.std = tuple(loaded.std)
        self.image_size = loaded.image_size
        self.extra = loaded.extra
        self.random_init = bool(loaded.extra.get("random_init", False))
        self.text_cache = TextEmbeddingCache(text_cache_size)
        self.text_batcher = TextBatcher(self._encode_uncached)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = None,
        device: torch.device | str | None = None,
        quick_gelu: bool | None = None,
    ) -> Backbone:
        """Load a backbone by spec (see :mod:`regionsearch.backbone.loading`).

        ``quick_gelu`` overrides the automatic choice of activation (see :func:`load_model`).
        """
        device = torch.device(device) if device is not None else default_device()
        return cls(load_model(model, pretrained, device, quick_gelu=quick_gelu), device)

    @cached_property
    def vit(self) -> ViTRunner:
        """The functional runner over the image tower (raises if the tower is unsupported)."""
        return ViTRunner(self.model.visual)

    @cached_property
    def vit_float32(self) -> ViTRunner:
        """A runner in float32 or wider, for methods that differentiate through the model.

        The model's own runner when its tower is float32/float64; for a half-precision tower, a
        runner over a float32 copy (the authors cast their MaskInversion model to float32; the
        user's model is not touched).
        """
        if self.model.visual.conv1.weight.dtype in (torch.float32, torch.float64):
            return self.vit
        return ViTRunner(copy.deepcopy(self.model.visual).float())

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text space."""
        return int(self.model.visual.proj.shape[1])

    @property
    def region_resolution(self) -> int:
        """Input size region embedders that optimise on the map (MaskInversion) default to.

        Twice the native size (448 px for a 224 px ViT-B/16, the paper's setting) unless the
        model's own config says otherwise: a small ViT trained from scratch does not tolerate
        stretched positional embeddings the way CLIP does, so its config can pin it.
        """
        config = self.extra.get("config", {})
        return int(config.get("region_resolution", 2 * self.image_size))

    def embedder_defaults(self, embedder: str) -> dict[str, object]:
        """Settings this model's config measured best for ``embedder`` (``{}`` when none).

        A region embedder's class defaults serve real CLIP weights; a model trained here can
        record others it was measured with (``"embedder_defaults": {"maskinversion": {...}}`` in
        its JSON), so that its users get them without touching what real weights run.
        """
        recorded = recorded_embedder_defaults(self.extra.get("config", {}), self.name)
        return recorded.get(embedder, {})

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_size[0])

    def preprocess(self, image: ImageLike, size: int | None = None) -> torch.Tensor:
        """Square-resize (no crop) and normalise one image: ``(3, S, S)`` on the device."""
        return image_to_tensor(image, size or self.image_size, self.mean, self.std).to(self.device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` preprocessed pixels → ``(B, d)`` L2-normalised embeddings, any S."""
        return F.normalize(self.vit.encode(pixels.to(self.device)).float(), dim=-1)

    def encode_text(
        self, texts: Sequence[str] | str, templates: Sequence[str] | None = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """Texts → ``(T, d)`` L2-normalised embeddings, averaged over prompt ``templates``.

        Pass ``templates=None`` for free-form sentences such as referring expressions. Vectors
        come from :attr:`text_cache` when known; the rest go through :attr:`text_batcher`,
        which merges concurrent callers' texts into shared forwards (padding trimmed where
        exact, see :mod:`regionsearch.backbone.text`).
        """
        if isinstance(texts, str):
            texts = [texts]
        return encode_texts_cached(
            self.text_cache, self.text_batcher.encode, list(texts), templates
        ).to(self.device)

    def _encode_uncached(self, texts: list[str], templates: Sequence[str] | None) -> torch.Tensor:
        return encode_texts(self.model, self.tokenizer, texts, templates, self.device)

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, dim={self.embed_dim}, device={self.device})"
