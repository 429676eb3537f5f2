"""Dependencies as ``Annotated`` aliases: routes read ``searcher: SearcherDep`` etc."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, HTTPException, Request, status

from regionsearch.api.origin import check_same_origin
from regionsearch.api.picture_cache import PictureCache
from regionsearch.api.settings import Settings
from regionsearch.search import RegionSearcher
from regionsearch.store import ImageRecord, ManifestInfo, RegionIndex, RegionRecord

T = TypeVar("T")
#: Ids are signed 64-bit in SQL and FAISS; larger ones name nothing (404, not an overflow).
ID_LIMIT = 2**63


@dataclass
class AppState:
    """What the lifespan loads once: settings, the index (opened read-only), the backbone, the
    searcher. Writes open the index writable for their duration only (:meth:`write`), so a
    running server never keeps ``regionsearch index`` from running."""

    settings: Settings
    index: RegionIndex
    backbone: Any
    searcher: RegionSearcher
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    embed_lock: threading.Lock = field(default_factory=threading.Lock)
    last_reload: float = field(default_factory=time.monotonic)
    pictures: PictureCache = field(default_factory=PictureCache)
    _embedders: dict[str, Any] = field(default_factory=dict)

    @property
    def uploads_enabled(self) -> bool:
        return not self.settings.read_only

    def latest_manifest(self) -> ManifestInfo:
        """The manifest as the last writer left it (its copy on disk): an upload or an ``index``
        run may have recorded the embedder's options since the served view opened."""
        return RegionIndex.read_manifest(self.index.directory) or self.index.manifest

    def embedder_for(self, manifest: ManifestInfo) -> Any:
        """The index's region embedder with the options its manifest records, on the server's
        backbone; built once per recorded description (uploads embed under ``embed_lock``)."""
        from regionsearch.search.examples import embedder_for_index
        from regionsearch.store.manifest import embedder_description

        key = json.dumps([manifest.embedder, embedder_description(manifest)], sort_keys=True)
        if key not in self._embedders:
            self._embedders = {key: embedder_for_index(manifest, self.backbone)}
        return self._embedders[key]

    def write(self, work: Callable[[RegionIndex], T]) -> T:
        """Run ``work`` on a writable open of the index: the writer lock is held only meanwhile
        (``IndexLockedError`` while ``regionsearch index`` runs); the served view then reloads."""
        with self.write_lock:
            writer = RegionIndex.open(
                self.settings.index_dir,
                db_url=self.settings.db_url,
                vectors_location=self.settings.vectors,
                checkpoint_every_s=None,
                checkpoint_every_vectors=None,
            )
            try:
                result = work(writer)
            finally:
                writer.close()
            self.index.reload_if_changed()
            self.last_reload = time.monotonic()
            return result

    def maybe_reload(self) -> None:
        """Pick up a writer's newer FAISS file now and then (``index`` runs, other servers)."""
        now = time.monotonic()
        if now - self.last_reload > self.settings.reload_every_s:
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


def get_pictures(state: StateDep) -> PictureCache:
    return state.pictures


def get_searcher(state: StateDep) -> RegionSearcher:
    state.maybe_reload()
    return state.searcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
IndexDep = Annotated[RegionIndex, Depends(get_index)]
SearcherDep = Annotated[RegionSearcher, Depends(get_searcher)]
PicturesDep = Annotated[PictureCache, Depends(get_pictures)]


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


def require_same_origin(request: Request, settings: SettingsDep) -> None:
    """Write routes: refuse requests sent by another site's web page (see ``api.origin``)."""
    check_same_origin(request, settings.cors_origins)


SameOriginDep = Annotated[None, Depends(require_same_origin)]


def get_region(region_id: int, index: IndexDep) -> RegionRecord:
    found = index.fetch_regions([region_id]) if 0 <= region_id < ID_LIMIT else []
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no region {region_id}")
    return found[0]


def get_image(image_id: int, index: IndexDep) -> ImageRecord:
    record = index.get_image_by_id(image_id) if 0 <= image_id < ID_LIMIT else None
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image {image_id}")
    return record


RegionDep = Annotated[RegionRecord, Depends(get_region)]
ImageDep = Annotated[ImageRecord, Depends(get_image)]
