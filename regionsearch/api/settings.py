"""Server settings: a validated pydantic model, built explicitly (no import-time globals)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

ENV_PREFIX = "REGIONSEARCH_"


class Settings(BaseModel):
    """Everything ``create_app`` needs. Build it in code or with :meth:`from_env`."""

    index_dir: Path
    db_url: str | None = None
    vectors: str | None = None  # vector location (Milvus URL, ...); default: the manifest's
    model: str | None = None  # default: the model recorded in the index manifest
    device: str | None = None
    api_key: str | None = None  # when set, uploads need header X-API-Key
    # web origins trusted to call the API from a browser (CORS), uploads included (api.origin)
    cors_origins: list[str] = Field(default_factory=list)
    read_only: bool = False  # never write (uploads disabled)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_k: int = Field(default=200, ge=1, le=2048)
    upload_dir_name: str = "uploads"
    reload_every_s: float = 5.0  # read-only servers pick up a writer's checkpoints
    # threads of one request's FAISS search / torch forward (requests run in parallel already)
    threads: int = Field(default=1, ge=1)

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_web_origins(cls, values: list[str]) -> list[str]:
        """A trusted origin is what a browser sends in ``Origin``: scheme, host and port only.
        Anything else would never match, leaving the user to believe CORS is on."""
        for value in values:
            parts = urlsplit(value.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{value!r} is not a web origin such as https://app.example")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(
                    f"{value!r} has a path: an origin is scheme, host and port only "
                    f"({parts.scheme}://{parts.netloc})"
                )
        return [value.strip().rstrip("/") for value in values]

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``REGIONSEARCH_*`` environment variables (``CORS_ORIGINS`` comma-split)."""
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw:
                values[name] = raw.split(",") if name == "cors_origins" else raw
        values.update(overrides)
        return cls.model_validate(values)
