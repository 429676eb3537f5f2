"""Fitted candidate rankings ("objectness") of :class:`~regionsearch.masks.AutomaticProposals`.

Each fit is a logistic regression over the same cheap cues of a candidate region
(:data:`SCORE_FEATURES`, raw units) predicting "IoU >= 0.5 with a ground-truth object": thirteen
numbers, not a model, so nothing is downloaded. Kept apart from the proposer so the tables can
grow without touching the segmentation code.
"""

from __future__ import annotations

import numpy as np

SCORE_FEATURES: tuple[str, ...] = (
    "log_area",  # log of the area fraction: objects are neither specks nor the whole frame...
    "log_area_sq",  # ...hence a quadratic in log-area
    "outer_contrast",  # mean Lab jump across the outline
    "inner_contrast",  # mean Lab jump across internal segment boundaries
    "has_inner",  # 1 if the region is a union (has internal boundaries)
    "compactness",  # 4 pi area / perimeter^2
    "fill",  # area / bounding-box area
    "border_fraction",  # share of the perimeter on the image border (background touches it)
    "log_segments",  # log number of base segments
    "support",  # number of merge strategies that produced exactly this union
    "stability",  # best IoU with a candidate of another scale
    "distinct",  # 1 - colour-histogram intersection with the surrounding segments
)
"""Names of the columns of ``proposals._score_features``, in order (printed by --fit-score)."""

# Logistic regressions over SCORE_FEATURES (raw units) predicting "IoU >= 0.5 with a
# ground-truth object"; thirteen numbers each, not a model: nothing is downloaded.
#: ``coco``: fitted on the candidates of coco-tiny train2017; reproduce with
#: ``python benchmarks/proposals_recall.py --split train2017 --fit-score``.
COCO_FIT: tuple[float, np.ndarray] = (
    -8.93984,
    np.array(
        [
            0.215412,  # log_area
            -0.0507551,  # log_area_sq
            0.0217805,  # outer_contrast
            0.00369089,  # inner_contrast
            0.14086,  # has_inner
            3.09835,  # compactness
            0.638973,  # fill
            -4.61802,  # border_fraction
            0.0579334,  # log_segments
            0.015485,  # support
            1.27264,  # stability
            6.55973,  # distinct
        ]
    ),
)
#: ``coco+world``: the same candidates plus those of world-v2 *train*-family scenes (31-90 of seed
#: 90417; never the held-out family) as 10% of the rows. Textured backgrounds that reuse object
#: colours make "an object plus the background around it" a common candidate there; the COCO
#: fit ranks such unions high, this one learns to demote them (a stronger border and fill cue).
#: Reproduce with ``--fit-score --fit-world DIR`` (``benchmarks/proposals_recall.py``); measured
#: in ``benchmarks/results/world_v2_search_diagnosis.md``.
MIXED_FIT: tuple[float, np.ndarray] = (
    -11.2654,
    np.array(
        [
            -0.0192257,  # log_area
            -0.0713009,  # log_area_sq
            -0.00348776,  # outer_contrast
            0.0332899,  # inner_contrast
            -0.309615,  # has_inner
            3.18071,  # compactness
            1.07744,  # fill
            -6.43145,  # border_fraction
            0.135154,  # log_segments
            0.0966555,  # support
            1.47547,  # stability
            8.97407,  # distinct
        ]
    ),
)

#: Name -> (bias, weights) of every fitted candidate ranking ``AutomaticProposals`` offers.
OBJECTNESS_FITS: dict[str, tuple[float, np.ndarray]] = {
    "coco": COCO_FIT,
    "coco+world": MIXED_FIT,
}
#: The fit ``AutomaticProposals`` ranks with unless told otherwise.
DEFAULT_OBJECTNESS = "coco"


__all__ = ["COCO_FIT", "DEFAULT_OBJECTNESS", "MIXED_FIT", "OBJECTNESS_FITS", "SCORE_FEATURES"]
