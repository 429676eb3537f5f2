"""``/api/stats`` and ``/api/health``."""

from __future__ import annotations

from fastapi import APIRouter

from regionsearch.api.deps import StateDep
from regionsearch.api.schemas import HealthOut, StatsOut

router = APIRouter(prefix="/api", tags=["system"])


@router.get("/stats", response_model=StatsOut)
def stats(state: StateDep) -> StatsOut:
    """Images by status, regions and vectors of the served index, the embedder settings its
    vectors were made with, and the default weights of the per-query result switches (what a
    search without ``open_set``/``repetition`` uses)."""
    s = state.index.stats()
    defaults = state.searcher.results
    return StatsOut(
        name=s.name,
        model=s.model,
        embedder=s.embedder,
        dimension=s.dimension,
        factory=s.factory,
        embedder_options=state.latest_manifest().embedder_options,
        images=s.images,
        regions=s.regions,
        vectors=s.vectors,
        read_only=state.settings.read_only,
        uploads_enabled=state.uploads_enabled,
        open_set=defaults.open_set,
        repetition=defaults.repetition,
    )


@router.get("/health", response_model=HealthOut)
def health(state: StateDep) -> HealthOut:
    """Liveness: the index is open and the model loaded."""
    return HealthOut(status="ok", index=state.index.name, model=state.backbone.name)
