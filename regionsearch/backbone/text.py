"""Text encoding with prompt templates, the way zero-shot CLIP classifiers are built."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: The default template: CLIP's most useful single prompt.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

#: A small ensemble for class names (a subset of CLIP's ImageNet templates).
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "itap of a {}.",
)


def apply_templates(texts: Sequence[str], templates: Sequence[str] | None) -> list[list[str]]:
    """Expand each text with every template; ``None`` or ``()`` keeps the text as it is."""
    if not templates:
        return [[text] for text in texts]
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' placeholder")
    return [[template.format(text) for template in templates] for text in texts]


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    templates: Sequence[str] | None,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode ``texts`` into ``(T, d)`` L2-normalised vectors, averaging over templates."""
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    prompts = apply_templates(texts, templates)
    per_text = len(prompts[0])
    flat = [prompt for group in prompts for prompt in group]
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    features = torch.cat(chunks).reshape(len(texts), per_text, -1).mean(dim=1)
    return F.normalize(features, dim=-1)
