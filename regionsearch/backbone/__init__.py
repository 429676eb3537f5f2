"""Model loading, preprocessing, text encoding and the functional ViT runner."""

from regionsearch.backbone.loading import list_bundled_models, load_model, parse_model_spec
from regionsearch.backbone.model import Backbone, default_device, load_backbone
from regionsearch.backbone.preprocess import image_to_tensor, masks_to_tensor, resize_masks
from regionsearch.backbone.text import DEFAULT_TEMPLATES, ENSEMBLE_TEMPLATES
from regionsearch.backbone.vit import BlockTrace, ViTRunner

__all__ = [
    "DEFAULT_TEMPLATES",
    "ENSEMBLE_TEMPLATES",
    "Backbone",
    "BlockTrace",
    "ViTRunner",
    "default_device",
    "image_to_tensor",
    "list_bundled_models",
    "load_backbone",
    "load_model",
    "masks_to_tensor",
    "parse_model_spec",
    "resize_masks",
]
