"""Text encoding with prompt templates, the way zero-shot CLIP classifiers are built.

Two things make a query cheap without changing its vector:

- **Padding trim.** Tokenizers pad every text to the context length (64 or 77 tokens) while a
  query is a handful of tokens. :func:`encode_tokens` drops the padding only where the result
  is exact: Hugging Face towers mask padding out of attention and pooling (so trailing pad
  columns change nothing), and open_clip's CLIP tower with its causal mask and end-of-text
  pooling never lets a token see what comes after it. Other towers run untrimmed.
- **A cache.** :class:`TextEmbeddingCache` keeps the last vectors per (text, templates), so a
  repeated query costs a dictionary look-up. The backbone is frozen, so a vector never goes
  stale; callers get copies, so nobody can alter a cached vector.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
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

CacheKey = tuple[str, tuple[str, ...] | None]


def apply_templates(texts: Sequence[str], templates: Sequence[str] | None) -> list[list[str]]:
    """Expand each text with every template; ``None`` or ``()`` keeps the text as it is."""
    if not templates:
        return [[text] for text in texts]
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' placeholder")
    return [[template.format(text) for template in templates] for text in texts]


# ---------------------------------------------------------------------- exact padding trim
def trim_trailing(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``tokens`` without the trailing columns that are padding in every row (one column kept)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return tokens[:, :length]


def _hf_pad_id(model: torch.nn.Module) -> int | None:
    """The pad id of an open_clip Hugging Face text tower (which masks padding), else None."""
    text = getattr(model, "text", None)
    if type(text).__name__ != "HFTextEncoder" or not hasattr(text, "config"):
        return None
    pad = getattr(text.config, "pad_token_id", None)
    return int(pad) if pad is not None else None


def _causal_clip_pool(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Per-row pooled position for open_clip's own CLIP text tower when trimming after it is
    exact (a causal mask and end-of-text pooling); None for any other tower."""
    import open_clip

    if type(model) is not open_clip.CLIP:
        return None
    mask = getattr(model, "attn_mask", None)
    if mask is None or mask.dim() != 2:
        return None
    n = mask.shape[0]
    causal = torch.full((n, n), float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    if not torch.equal(mask, causal):
        return None
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if model.text_pool_type == "eos" and model.text_eos_id is not None:
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return None


def _encode_clip_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text`` on the first L columns: the positional embedding and the causal
    mask cut to L, everything else as open_clip computes it."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, with trailing padding dropped where that is exact."""
    pad_id = _hf_pad_id(model)
    if pad_id is not None:
        return model.encode_text(trim_trailing(tokens, pad_id))
    pooled = _causal_clip_pool(model, tokens)
    if pooled is not None:
        return _encode_clip_prefix(model, tokens[:, : int(pooled.max()) + 1])
    return model.encode_text(tokens)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    templates: Sequence[str] | None,
    device: torch.device,
    batch_size: int = 256,
    trim: bool = True,
) -> torch.Tensor:
    """Encode ``texts`` into ``(T, d)`` L2-normalised vectors, averaging over templates.

    ``trim=False`` runs the tower on the full padded length (the reference for tests).
    """
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
        features = encode_tokens(model, tokens) if trim else model.encode_text(tokens)
        chunks.append(F.normalize(features.float(), dim=-1))
    features = torch.cat(chunks).reshape(len(texts), per_text, -1).mean(dim=1)
    return F.normalize(features, dim=-1)


# ---------------------------------------------------------------------- cache
class TextEmbeddingCache:
    """A thread-safe LRU of text vectors keyed by ``(text, templates)``.

    Holds CPU copies; :meth:`get` hands out clones, so a caller writing into its result cannot
    change what the next caller receives.
    """

    def __init__(self, maxsize: int = 4096) -> None:
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(text: str, templates: Sequence[str] | None) -> CacheKey:
        return (text, tuple(templates) if templates else None)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: CacheKey) -> torch.Tensor | None:
        with self._lock:
            vector = self._items.get(key)
            if vector is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return vector.clone()

    def put(self, key: CacheKey, vector: torch.Tensor) -> None:
        if self.maxsize == 0:
            return
        with self._lock:
            self._items[key] = vector.detach().to("cpu", copy=True)
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def encode_texts_cached(
    cache: TextEmbeddingCache,
    encode: Callable[[list[str], Sequence[str] | None], torch.Tensor],
    texts: Sequence[str],
    templates: Sequence[str] | None,
) -> torch.Tensor:
    """``encode(texts, templates)`` with each text's vector taken from ``cache`` when there; the
    misses are encoded together in one call (each text once) and stored."""
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    keys = [cache.key(text, templates) for text in texts]
    found = {key: cache.get(key) for key in dict.fromkeys(keys)}
    missing = [key for key, vector in found.items() if vector is None]
    if missing:
        fresh = encode([text for text, _ in missing], templates).cpu()
        for key, vector in zip(missing, fresh, strict=True):
            cache.put(key, vector)
            found[key] = vector.clone()
    return torch.stack([found[key] for key in keys])


# ---------------------------------------------------------------------- micro-batching
def forward_slots(cores: int | None = None, threads: int | None = None) -> int:
    """How many forwards may run at once without oversubscribing the CPU: cores divided by
    the threads each forward uses (at least one)."""
    cores = cores or os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    return max(1, cores // max(1, threads))


class _Pending:
    """One caller's texts waiting for a forward."""

    def __init__(self, texts: list[str], templates: Sequence[str] | None) -> None:
        self.texts = texts
        self.templates = templates
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None


class TextBatcher:
    """Merges concurrent callers' texts into shared forwards, at most ``slots`` at a time.

    No background thread: a caller queues its texts, waits for a forward slot, then encodes
    everything queued by then (its own texts, unless another caller already took them) in one
    batch per template set, and hands each caller its rows. Under load a forward serves many
    queries; alone, a caller pays one lock. ``slots`` defaults to :func:`forward_slots`.
    """

    def __init__(
        self,
        encode: Callable[[list[str], Sequence[str] | None], torch.Tensor],
        slots: int | None = None,
        max_texts: int = 64,
    ) -> None:
        self._encode = encode
        self.slots = slots or forward_slots()
        self.max_texts = max_texts
        self._free = threading.BoundedSemaphore(self.slots)
        self._queue: list[_Pending] = []
        self._lock = threading.Lock()
        self.forwards = 0

    def encode(self, texts: list[str], templates: Sequence[str] | None) -> torch.Tensor:
        """``encode(texts, templates)``, possibly computed together with other callers' texts."""
        mine = _Pending(list(texts), templates)
        with self._lock:
            self._queue.append(mine)
        while not mine.done.is_set():
            with self._free:
                batch = self._take()
                if batch:
                    self._run(batch)
                    continue
            mine.done.wait()  # not queued any more: another caller is encoding it
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _take(self) -> list[_Pending]:
        """The queued requests, oldest first, up to ``max_texts`` texts (at least one request)."""
        with self._lock:
            taken, count = [], 0
            while self._queue and (
                not taken or count + len(self._queue[0].texts) <= self.max_texts
            ):
                count += len(self._queue[0].texts)
                taken.append(self._queue.pop(0))
            return taken

    def _run(self, batch: list[_Pending]) -> None:
        groups: dict[tuple[str, ...] | None, list[_Pending]] = {}
        for item in batch:
            templates = tuple(item.templates) if item.templates else None
            groups.setdefault(templates, []).append(item)
        for templates, items in groups.items():
            try:
                vectors = self._encode([t for item in items for t in item.texts], templates)
                self.forwards += 1
                start = 0
                for item in items:
                    item.result = vectors[start : start + len(item.texts)]
                    start += len(item.texts)
            except BaseException as exc:  # every waiter must wake up, with the cause
                for item in items:
                    item.error = exc
            finally:
                for item in items:
                    item.done.set()
