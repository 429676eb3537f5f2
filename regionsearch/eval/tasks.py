"""Benchmark metrics: pure functions from embeddings (and ground truth) to hit arrays.

Each function takes L2-normalised embeddings, so cosine similarity is a dot product, and returns
a boolean array with one entry per scored item. Keeping hits (not averages) lets the runner pool
items over images exactly — the accuracy of a dataset is ``hits.mean()`` over all its items, not
a mean of per-image means — and lets tests check each item by hand.

Ties are broken towards the lower index (``argmax``/stable sort), so results are deterministic.

Tasks and the names they get in result rows:

* ``classes`` — localized classification (MaskInversion paper, Table 1): every ground-truth mask
  ranks all class texts; ``acc@1``/``acc@5`` = the true class is within the top 1 / top 5.
* ``expressions`` — the paper's referring-expression protocol: every mask that has expressions
  ranks *all sentences of all annotations of its image*; a hit when the top sentence belongs to
  the mask's own annotation (``acc@1``).
* ``grounding`` — the other direction, what a search engine does with a query: every sentence
  picks one mask among its image's ground-truth masks (all of them, also those without
  expressions); a hit when it picks its own annotation's mask (``acc@1``).
* ``retrieval`` — text-to-region search over the whole collection (computed with ``classes``):
  every class text that labels at least one mask ranks *all* masks of *all* images; ``mAP`` =
  mean average precision over those queries, ``acc@1`` = the top-ranked mask has that class.
  Unlike ``classes``, a region must outscore every other region of the collection for the
  query, so embedders whose similarities are not comparable across regions lose here.
* ``classes (same colour)`` — ``classes acc@1`` restricted to colour-ambiguous masks: another
  mask of the same image has a class of the same colour (datasets whose categories carry a
  ``colour``, such as the world), so colour alone cannot tell the mask's class.
* ``pointing`` — a property of the *model*, not of an embedder: the LeGrad map of each mask's
  own class text is densest (highest mean inside the mask) on that mask, among the masks of
  its image; masks whose class occurs twice in the image have no right answer and are skipped.
  ``pointing (same colour)`` restricts it to colour-ambiguous masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Names of the task groups the runner can compute, and the rows each one produces.
TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "classes": (
        ("classes", "acc@1"),
        ("classes", "acc@5"),
        ("retrieval", "mAP"),
        ("retrieval", "acc@1"),
    ),
    "expressions": (("expressions", "acc@1"), ("grounding", "acc@1")),
    "pointing": (("pointing", "acc"), ("pointing (same colour)", "acc")),
}

ArrayLike = np.ndarray | torch.Tensor


def _as_array(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def similarity(queries: ArrayLike, keys: ArrayLike) -> np.ndarray:
    """``(Q, d) x (K, d) -> (Q, K)`` dot products (cosine for L2-normalised rows)."""
    q, k = _as_array(queries), _as_array(keys)
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"need (Q, d) and (K, d) embeddings, got {q.shape} and {k.shape}")
    return q @ k.T


def topk_hits(scores: np.ndarray, targets: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Whether ``targets[i]`` is among the ``k`` highest ``scores[i]`` (ties: lower index first).

    ``k`` larger than the number of candidates counts every item as a hit, the usual reading of
    Acc@k for small label sets.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(
            f"scores (N, C) and targets (N,) expected, got {scores.shape}, {targets.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if scores.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    # Rank of the target = number of candidates that beat it (strictly higher, or equal with a
    # lower index), which is exactly its position under a stable descending sort.
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    columns = np.arange(scores.shape[1])[None, :]
    better = (scores > target_scores) | ((scores == target_scores) & (columns < targets[:, None]))
    return better.sum(axis=1) < k


def classification_hits(
    region_embeddings: ArrayLike,
    class_embeddings: ArrayLike,
    labels: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[int, np.ndarray]:
    """Localized classification: for each region, is its label within the top ``k`` classes?

    Args:
        region_embeddings: ``(N, d)`` one row per ground-truth mask.
        class_embeddings: ``(C, d)`` one row per class text (prompt template applied).
        labels: ``N`` class indices.
        ks: the cut-offs to report.

    Returns:
        ``{k: (N,) bool}``.
    """
    scores = similarity(region_embeddings, class_embeddings)
    return {k: topk_hits(scores, labels, k) for k in ks}


def retrieval_hits(
    region_embeddings: ArrayLike, class_embeddings: ArrayLike, labels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Text-to-region search: every class that labels a region ranks all ``N`` regions.

    Args:
        region_embeddings: ``(N, d)`` every ground-truth mask of the collection.
        class_embeddings: ``(C, d)`` one row per class text.
        labels: ``N`` class indices.

    Returns:
        ``(average_precision, top1_hit)``, one entry per class present in ``labels`` (in class
        order): AP of the ranking (ties: lower region index first) and whether its top region
        has that class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    if present.size == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    scores = similarity(class_embeddings, region_embeddings)[present]  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = labels[order] == present[:, None]  # (Q, N), in rank order
    precision = np.cumsum(relevant, axis=1) / np.arange(1, labels.size + 1)
    average_precision = (precision * relevant).sum(axis=1) / relevant.sum(axis=1)
    return average_precision, relevant[:, 0]


def _check_owners(
    owners: Sequence[int] | np.ndarray, num_masks: int, num_sentences: int
) -> np.ndarray:
    owners = np.asarray(owners, dtype=np.int64)
    if owners.shape != (num_sentences,):
        raise ValueError(f"need one owner per sentence: {owners.shape} vs {num_sentences}")
    if owners.size and (owners.min() < 0 or owners.max() >= num_masks):
        raise ValueError(f"sentence owners must index the {num_masks} masks, got {owners}")
    return owners


def mask_to_expression_hits(
    mask_embeddings: ArrayLike, sentence_embeddings: ArrayLike, owners: Sequence[int] | np.ndarray
) -> np.ndarray:
    """The paper's expression protocol on one image: each mask ranks the image's sentences.

    Args:
        mask_embeddings: ``(M, d)`` the image's ground-truth masks.
        sentence_embeddings: ``(S, d)`` every sentence of every annotation of the image.
        owners: ``S`` mask index each sentence describes.

    Returns:
        One bool per mask that owns at least one sentence (in mask order): whether its
        best-scoring sentence is one of its own. Masks without sentences have no right answer
        and are not scored.
    """
    masks = _as_array(mask_embeddings)
    owners = _check_owners(owners, masks.shape[0], _as_array(sentence_embeddings).shape[0])
    scored = np.unique(owners)
    if scored.size == 0:
        return np.zeros(0, dtype=bool)
    scores = similarity(masks[scored], sentence_embeddings)  # (m, S)
    return owners[scores.argmax(axis=1)] == scored


def expression_to_mask_hits(
    mask_embeddings: ArrayLike, sentence_embeddings: ArrayLike, owners: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Grounding on one image: each sentence picks the best-scoring of the image's masks.

    Same arguments as :func:`mask_to_expression_hits`; returns one bool per sentence.
    """
    sentences = _as_array(sentence_embeddings)
    owners = _check_owners(owners, _as_array(mask_embeddings).shape[0], sentences.shape[0])
    if owners.size == 0:
        return np.zeros(0, dtype=bool)
    return similarity(sentences, mask_embeddings).argmax(axis=1) == owners


def colour_ambiguous(
    labels: Sequence[int] | np.ndarray, class_colours: Sequence[str | None]
) -> np.ndarray:
    """Per mask of one image: does another mask have a class of the same (known) colour?"""
    colours = [class_colours[int(c)] for c in np.asarray(labels, dtype=np.int64)]
    return np.asarray(
        [c is not None and sum(other == c for other in colours) >= 2 for c in colours],
        dtype=bool,
    )


def pointing_hits(
    maps: ArrayLike, masks: np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pointing game on one image: is mask ``i``'s own class map densest on mask ``i``?

    Args:
        maps: ``(M, H, W)`` one explainability map per mask, of that mask's class text.
        masks: ``(M, H, W)`` bool ground-truth masks.
        labels: ``M`` class indices.

    Returns:
        ``(hits, scored)``: ``hits`` one bool per scored mask, ``scored`` the ``(M,)`` bool of
        masks that have a right answer (their class is unique in the image).
    """
    heat = _as_array(maps)
    masks = np.asarray(masks, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    if heat.shape != masks.shape or labels.shape != (masks.shape[0],):
        raise ValueError(
            f"need (M, H, W) maps and masks and M labels, got {heat.shape}, "
            f"{masks.shape}, {labels.shape}"
        )
    scored = np.asarray([int((labels == c).sum()) == 1 for c in labels], dtype=bool)
    if not scored.any():
        return np.zeros(0, dtype=bool), scored
    flat = masks.reshape(len(masks), -1).astype(np.float64)
    area = np.maximum(flat.sum(axis=1), 1.0)
    density = heat.reshape(len(heat), -1) @ flat.T / area[None, :]  # (maps, masks)
    index = np.nonzero(scored)[0]
    return density[index].argmax(axis=1) == index, scored


def accuracy(hits: Sequence[np.ndarray] | np.ndarray) -> tuple[float, int]:
    """Pooled mean over items (hits, or per-item scores such as AP) and the item count;
    ``(nan, 0)`` when there is none."""
    if isinstance(hits, np.ndarray):
        flat = hits.ravel()
    else:
        flat = (
            np.concatenate([np.asarray(h, dtype=bool).ravel() for h in hits])
            if hits
            else np.zeros(0)
        )
    if flat.size == 0:
        return float("nan"), 0
    return float(flat.mean()), int(flat.size)


__all__ = [
    "TASKS",
    "accuracy",
    "classification_hits",
    "colour_ambiguous",
    "expression_to_mask_hits",
    "mask_to_expression_hits",
    "pointing_hits",
    "retrieval_hits",
    "similarity",
    "topk_hits",
]
