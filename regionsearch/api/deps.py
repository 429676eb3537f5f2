"""Dependencies as ``Annotated`` aliases: routes read ``searcher: SearcherDep`` etc."""

from __future__ import annotations

import functools
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request, status

from regionsearch.api.settings import Settings
from regionsearch.search import RegionSearcher
from regionsearch.store import ImageRecord, RegionIndex, RegionRecord


@dataclass
class AppState:
    """What the lifespan loads once: settings, the open index, the backbone, the searcher."""

    settings: Settings
    index: RegionIndex
    backbone: Any
    searcher: RegionSearcher
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    last_reload: float = field(default_factory=time.monotonic)

    @property
    def uploads_enabled(self) -> bool:
        return not self.index.read_only

    @functools.cached_property
    def embedder(self) -> Any:
        """The index's region embedder on the server's backbone, built at the first upload
        (uploads run under ``write_lock``, so it is built once)."""
        from regionsearch.embedders import get_embedder

        return get_embedder(self.index.embedder, self.backbone)

    def maybe_reload(self) -> None:
        """Read-only servers: pick up the writer's newer FAISS file now and then."""
        now = time.monotonic()
        if self.index.read_only and now - self.last_reload > self.settings.reload_every_s:
            self.last_reload = now
            self.index.reload_if_changed()


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "regionsearch", None)
    if state is None:  # pragma: no cover - only without lifespan
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "index not loaded")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_index(state: StateDep) -> RegionIndex:
    return state.index


def get_searcher(state: StateDep) -> RegionSearcher:
    state.maybe_reload()
    return state.searcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
IndexDep = Annotated[RegionIndex, Depends(get_index)]
SearcherDep = Annotated[RegionSearcher, Depends(get_searcher)]


def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="required when configured")] = None,
) -> None:
    """Uploads need ``X-API-Key`` when the server has a key configured."""
    if settings.api_key is None:
        return
    if x_api_key is None or not secrets.compare_digest(x_api_key, settings.api_key):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong X-API-Key")


ApiKeyDep = Annotated[None, Depends(require_api_key)]


def get_region(region_id: int, index: IndexDep) -> RegionRecord:
    found = index.fetch_regions([region_id]) if region_id >= 0 else []
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no region {region_id}")
    return found[0]


def get_image(image_id: int, index: IndexDep) -> ImageRecord:
    record = index.get_image_by_id(image_id) if 0 <= image_id < 2**62 else None
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image {image_id}")
    return record


RegionDep = Annotated[RegionRecord, Depends(get_region)]
ImageDep = Annotated[ImageRecord, Depends(get_image)]
