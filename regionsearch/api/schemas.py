"""Response models of the API (pydantic). Every field has a description and an example, so the
OpenAPI schema (``/openapi.json``, ``/docs``) is enough to write a client; field names are
stable (new fields may be added, none renamed)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

RLE_EXAMPLE = {
    "size": [48, 64],
    "counts": "Zb0d0l000000000000000000000000000000000000000000000000000000fS1",
}
BOX_EXAMPLE = [12.0, 10.0, 28.0, 20.0]


class RLEOut(BaseModel):
    size: list[int] = Field(description="[height, width] of the photo", examples=[[48, 64]])
    counts: str = Field(
        description="COCO compressed RLE (column-major), decodable with pycocotools",
        examples=[RLE_EXAMPLE["counts"]],
    )


class RegionOut(BaseModel):
    id: int = Field(description="region id (stable while the region exists)", examples=[42])
    image_id: int = Field(description="id of the photo holding the region", examples=[7])
    bbox: list[float] = Field(description="[x, y, w, h] in pixels", examples=[BOX_EXAMPLE])
    area: float = Field(description="mask area in pixels", examples=[560.0])
    source: str = Field(
        description="where the mask came from: proposal, coco, png, sam, sam2, full-image",
        examples=["proposal"],
    )
    category: str | None = Field(
        default=None, description="class label of annotated masks, else null", examples=["dog"]
    )
    rle: RLEOut = Field(description="the region's full-image mask", examples=[RLE_EXAMPLE])
    overlay_url: str = Field(
        description="JPEG of the photo with this region spotlit (overlay.png: lossless)",
        examples=["/api/regions/42/overlay.jpg"],
    )


class HitOut(RegionOut):
    score: float = Field(
        description="cosine similarity (after the result switches), higher is better",
        examples=[0.31],
    )
    image_path: str = Field(
        description="the photo's path relative to the indexed folder", examples=["park/dog.jpg"]
    )
    image_url: str = Field(description="the photo's metadata", examples=["/api/images/7"])


class SearchOut(BaseModel):
    query: str = Field(description="the text searched for", examples=["a red umbrella"])
    templated: bool = Field(description="whether prompt templates were applied", examples=[True])
    k: int = Field(description="results asked for", examples=[10])
    min_score: float | None = Field(description="threshold applied, or null", examples=[None])
    count: int = Field(description="results returned (at most k)", examples=[10])
    took_ms: float = Field(description="server time in milliseconds", examples=[12.5])
    results: list[HitOut] = Field(description="regions, best first")


class ReferOut(BaseModel):
    expression: str = Field(
        description="the referring expression", examples=["the dog on the left"]
    )
    image_id: int = Field(description="the indexed photo searched", examples=[7])
    best: HitOut | None = Field(description="the best region, or null if the photo has none")
    alternatives: list[HitOut] = Field(description="the next best regions, best first")


class SimilarOut(BaseModel):
    region_id: int = Field(description="the region whose vector is the query", examples=[42])
    k: int = Field(description="results asked for", examples=[10])
    min_score: float | None = Field(description="threshold applied, or null", examples=[0.5])
    count: int = Field(description="results returned (at most k)", examples=[10])
    took_ms: float = Field(description="server time in milliseconds", examples=[4.2])
    results: list[HitOut] = Field(description="regions most like it, best first; never itself")


class QueryRegionOut(BaseModel):
    width: int = Field(
        description="width of the sent photo as decoded (EXIF applied)", examples=[64]
    )
    height: int = Field(description="height of the sent photo as decoded", examples=[48])
    bbox: list[float] = Field(description="[x, y, w, h] of the query mask", examples=[BOX_EXAMPLE])
    area: float = Field(description="query mask area in pixels", examples=[560.0])
    rle: RLEOut = Field(description="the query mask (the whole photo when none was sent)")
    mask_from: str = Field(
        description="what the mask was made from: mask, rle, box or image", examples=["box"]
    )


class ByImageOut(BaseModel):
    query: QueryRegionOut = Field(description="the region that was embedded as the query")
    k: int = Field(description="results asked for", examples=[10])
    min_score: float | None = Field(description="threshold applied, or null", examples=[None])
    count: int = Field(description="results returned (at most k)", examples=[10])
    took_ms: float = Field(
        description="server time in milliseconds (embedding included)", examples=[180.0]
    )
    results: list[HitOut] = Field(description="indexed regions most like the query, best first")


class ReferredRegionOut(BaseModel):
    candidate: int = Field(
        description="position in the candidate list: the sent masks in order (PNG files, then "
        "RLEs, then boxes), or the automatic proposals",
        examples=[0],
    )
    bbox: list[float] = Field(description="[x, y, w, h] in pixels", examples=[BOX_EXAMPLE])
    area: float = Field(description="mask area in pixels", examples=[560.0])
    score: float = Field(
        description="cosine similarity to the expression, higher is better", examples=[0.27]
    )
    source: str = Field(
        description="given, or the proposal's kind (proposal, full-image, sam)",
        examples=["proposal"],
    )
    rle: RLEOut = Field(description="the region's full-image mask")
    mask_png: str | None = Field(
        default=None,
        description="the mask as a PNG data URL (white on black), when asked with mask_png=true",
        examples=["data:image/png;base64,iVBORw0KGgo..."],
    )


class ReferImageOut(BaseModel):
    expression: str = Field(
        description="the referring expression", examples=["the dog on the left"]
    )
    width: int = Field(
        description="width of the sent photo as decoded (EXIF applied)", examples=[64]
    )
    height: int = Field(description="height of the sent photo as decoded", examples=[48])
    candidates: int = Field(description="regions compared", examples=[12])
    candidates_from: str = Field(
        description="given (masks sent with the request) or proposals (automatic)",
        examples=["proposal"],
    )
    best: ReferredRegionOut | None = Field(description="the best region")
    alternatives: list[ReferredRegionOut] = Field(description="the next best regions, best first")
    took_ms: float = Field(description="server time in milliseconds", examples=[250.0])


class ImageOut(BaseModel):
    id: int = Field(description="image id", examples=[7])
    path: str = Field(
        description="path relative to the indexed folder (uploads: uploads/<name>)",
        examples=["park/dog.jpg"],
    )
    width: int | None = Field(description="width in pixels", examples=[640])
    height: int | None = Field(description="height in pixels", examples=[480])
    status: str = Field(description="indexed, pending or failed", examples=["indexed"])
    thumbnail_url: str = Field(
        description="JPEG thumbnail", examples=["/api/images/7/thumbnail.jpg"]
    )
    overlay_url: str = Field(
        description="JPEG with all regions outlined (overlay.png: lossless)",
        examples=["/api/images/7/overlay.jpg"],
    )
    regions: list[RegionOut] = Field(description="the image's live regions")


class StatsOut(BaseModel):
    name: str = Field(description="index name", examples=["default"])
    model: str = Field(description="model the index was built with", examples=["reference"])
    embedder: str = Field(description="region embedder of the index", examples=["maskinversion"])
    dimension: int = Field(description="vector dimension", examples=[256])
    factory: str = Field(description="FAISS index factory", examples=["IDMap2,Flat"])
    embedder_options: dict[str, Any] | None = Field(
        description="settings the index's vectors were made with (null: not recorded, for "
        "indexes made before they were); uploads are embedded with the same",
        examples=[{"steps": 5, "lr": 0.4, "resolution": 224, "alpha": 0.0}],
    )
    images: dict[str, int] = Field(
        description="images by status", examples=[{"indexed": 120, "failed": 1}]
    )
    regions: int = Field(description="live regions", examples=[3400])
    vectors: int = Field(description="vectors in FAISS", examples=[3400])
    read_only: bool = Field(description="whether the server never writes", examples=[False])
    uploads_enabled: bool = Field(description="whether POST /api/images works", examples=[True])
    open_set: float = Field(
        description="default weight of /api/search's open_set term for this index (0 = off)",
        examples=[0.0],
    )
    repetition: float = Field(
        description="default weight of /api/search's repetition term for this index (0 = off)",
        examples=[0.5],
    )


class HealthOut(BaseModel):
    status: str = Field(
        description="ok when the index is open and the model loaded", examples=["ok"]
    )
    index: str = Field(description="index name", examples=["default"])
    model: str = Field(description="model loaded", examples=["reference"])
