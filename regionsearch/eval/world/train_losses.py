"""Losses of the reference CLIP's training: contrastive, class-prompt and dense patch terms.

The first two only ever say *what* a whole image contains, so a model trained on them alone
may classify a scene without any patch knowing which object it belongs to, and then every
LeGrad map and every region embedder built on it is blind to shape. The dense term supervises
*where*: every patch an object covers must score its own class prompt highest, which puts
shape into the patch tokens the region embedders read (the renderer knows the masks exactly,
so this costs no annotation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from regionsearch.backbone.vit import ViTRunner

#: Label of a patch that an object covers only partly (ignored by the dense loss).
IGNORE_PATCH = -1
#: Label of a patch no object touches: it must not favour any class prompt.
BACKGROUND_PATCH = -2


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution per row."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def patch_classes(
    masks: torch.Tensor, classes: torch.Tensor, patch: int, min_cover: float = 0.5
) -> torch.Tensor:
    """``(B, gh*gw)`` class of the object covering each patch, or a background/ignore label.

    ``masks`` is ``(B, K, H, W)`` (object ``k`` of scene ``b`` has class ``classes[b, k]``, -1 for
    an empty slot). A patch is labelled with the object covering most of it, when that object
    covers at least ``min_cover`` of it; a patch no object touches is :data:`BACKGROUND_PATCH`;
    boundary patches are :data:`IGNORE_PATCH`.
    """
    cover = F.avg_pool2d(masks.float(), patch)  # (B, K, gh, gw)
    best_cover, best = cover.max(dim=1)
    best_cover = best_cover.flatten(1)
    labels = classes.gather(1, best.flatten(1))
    keep = (best_cover >= min_cover) & (labels >= 0)
    empty = torch.where(best_cover > 0, IGNORE_PATCH, BACKGROUND_PATCH)
    return torch.where(keep, labels, empty.to(labels.dtype))


def training_loss(
    model: nn.Module,
    images: torch.Tensor,
    pos_feat: torch.Tensor,
    neg_feat: torch.Tensor,
    bank_feat: torch.Tensor,
    entry: torch.Tensor,
    class_target: torch.Tensor,
    patch_target: torch.Tensor | None = None,
    dense_weight: float = 0.0,
    background_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive loss with hard negatives, the 64-way class-prompt loss and the dense term.

    ``pos_feat`` (B, 384) are cached pooled text features of each image's caption, ``neg_feat``
    (K, 384) extra hard-negative captions, ``bank_feat`` (64, 384) the class prompts. Images
    whose captions describe the same class list are all positives of each other. With
    ``dense_weight > 0`` every labelled patch of ``patch_target`` (from :func:`patch_classes`)
    is classified against the class prompts through the same ``ln_post`` and projection as the
    class token; with ``background_weight > 0`` every background patch is also pushed towards a
    uniform distribution over them (object-coloured texture must not look like an object to a
    LeGrad map or a region embedder; reported as its excess over ``log 64``, 0 when the patch
    favours no class).
    """
    proj = model.text.proj
    runner = ViTRunner(model.visual)
    tokens = runner.run_blocks(runner.embed(images))
    use_dense = dense_weight > 0 and patch_target is not None
    embedded = runner.head(tokens if use_dense else tokens[:, 0])
    img = F.normalize(embedded[:, 0] if use_dense else embedded, dim=-1)
    pos = F.normalize(proj(pos_feat), dim=-1)
    bank = F.normalize(proj(bank_feat), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100.0)
    same = (entry[:, None] == entry[None, :]).float()
    same = same / same.sum(dim=1, keepdim=True)
    columns = (
        pos if neg_feat.numel() == 0 else torch.cat([pos, F.normalize(proj(neg_feat), dim=-1)])
    )
    logits_i2t = scale * img @ columns.T
    target_i2t = torch.cat([same, same.new_zeros(len(img), len(columns) - len(pos))], dim=1)
    loss_i2t = soft_cross_entropy(logits_i2t, target_i2t)
    loss_t2i = soft_cross_entropy(scale * pos @ img.T, same)
    loss_bank = soft_cross_entropy(scale * img @ bank.T, class_target)
    loss = 0.5 * (loss_i2t + loss_t2i) + loss_bank
    parts = {
        "clip": float(0.5 * (loss_i2t + loss_t2i).detach()),
        "bank": float(loss_bank.detach()),
        "scale": float(scale.detach()),
    }
    if use_dense:
        assert patch_target is not None
        patches = F.normalize(embedded[:, 1:], dim=-1)
        labelled = patch_target >= 0
        if labelled.any():
            logits = scale * patches[labelled] @ bank.T
            loss_dense = F.cross_entropy(logits, patch_target[labelled])
            loss = loss + dense_weight * loss_dense
            parts["dense"] = float(loss_dense.detach())
        background = patch_target == BACKGROUND_PATCH
        if background_weight > 0 and background.any():
            log_probs = F.log_softmax(scale * patches[background] @ bank.T, dim=-1)
            loss_background = -log_probs.mean(dim=-1).mean() - math.log(len(bank))
            loss = loss + background_weight * loss_background
            parts["background"] = float(loss_background.detach())
    return loss, parts
