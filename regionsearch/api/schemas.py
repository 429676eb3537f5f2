"""Response models of the API (pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class RLEOut(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (column-major)")


class RegionOut(BaseModel):
    id: int
    image_id: int
    bbox: list[float] = Field(description="[x, y, w, h] in pixels")
    area: float
    source: str
    category: str | None = None
    rle: RLEOut
    overlay_url: str


class HitOut(RegionOut):
    score: float = Field(description="cosine similarity, higher is better")
    image_path: str
    image_url: str


class SearchOut(BaseModel):
    query: str
    templated: bool = Field(description="whether prompt templates were applied")
    k: int
    min_score: float | None
    count: int
    took_ms: float
    results: list[HitOut]


class ReferOut(BaseModel):
    expression: str
    image_id: int
    best: HitOut | None
    alternatives: list[HitOut]


class ImageOut(BaseModel):
    id: int
    path: str
    width: int | None
    height: int | None
    status: str
    thumbnail_url: str
    overlay_url: str
    regions: list[RegionOut]


class StatsOut(BaseModel):
    name: str
    model: str
    embedder: str
    dimension: int
    factory: str
    images: dict[str, int]
    regions: int
    vectors: int
    read_only: bool
    uploads_enabled: bool


class HealthOut(BaseModel):
    status: str
    index: str
    model: str
