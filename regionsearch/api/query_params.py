"""Query parameters shared by the search routes (search, similar, by-image, stateless refer),
each documented with an example in the OpenAPI schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query

from regionsearch.api.deps import SettingsDep
from regionsearch.search import SearchFilters

K = Annotated[
    int,
    Query(ge=1, le=2048, description="results wanted (at most the server's max_k)", examples=[10]),
]
MinScore = Annotated[
    float | None,
    Query(ge=-1.0, le=1.0, description="drop results scoring below this", examples=[0.5]),
]
PathGlob = Annotated[
    str | None,
    Query(max_length=500, description="glob on stored image paths", examples=["holidays/*"]),
]
OnePerImage = Annotated[
    bool, Query(description="only the best region of each photo", examples=[False])
]
Expression = Annotated[
    str,
    Query(
        min_length=1,
        max_length=500,
        description="the referring expression, embedded as typed",
        examples=["the dog on the left"],
    ),
]
ReferK = Annotated[
    int,
    Query(
        ge=1, le=100, description="regions returned: the best and k - 1 alternatives", examples=[5]
    ),
]
MaskPng = Annotated[
    bool, Query(description="add each region's mask as a PNG data URL", examples=[False])
]


def check_k(k: int, max_k: int) -> None:
    """422 when ``k`` is over the server's limit (``serve --max-k``)."""
    if k > max_k:
        raise HTTPException(422, f"k must be <= {max_k}")


@dataclass(frozen=True)
class HitOptions:
    """Which hits a search route returns: ``k`` (within the server's ``max_k``), ``min_score``,
    the path glob and ``one_per_image``, as the searcher's keyword arguments."""

    k: int
    min_score: float | None
    filters: SearchFilters
    one_per_image: bool

    def kwargs(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "min_score": self.min_score,
            "filters": self.filters,
            "one_per_image": self.one_per_image,
        }


def hit_options(
    settings: SettingsDep,
    k: K = 10,
    min_score: MinScore = None,
    path: PathGlob = None,
    one_per_image: OnePerImage = False,
) -> HitOptions:
    check_k(k, settings.max_k)
    return HitOptions(k, min_score, SearchFilters(path_glob=path or None), one_per_image)


HitOptionsDep = Annotated[HitOptions, Depends(hit_options)]
