"""The training worlds ``--world`` names, and the world-v2 family each one renders.

Kept free of torch and the renderer so the ``regionsearch world`` help text and its usage errors
come from this one table without loading anything heavy.
"""

from __future__ import annotations

#: Training worlds after v1: the scene_v2 family each renders, and what sets it apart.
TRAINING_WORLDS: dict[str, tuple[str, str]] = {
    "v2": ("train", "the v2 'train' family"),
    "v2dr": ("train-dr", "the domain-randomised 'train-dr' family"),
    "v2dr2": ("train-dr2", "train-dr plus a lattice-of-marks fill"),
    "v2drp": ("train-drp", "train-dr2 with flat fills rare, for the underfit patterned objects"),
}


def world_family(world: str) -> str | None:
    """The scene_v2 family a training ``world`` renders (``None`` for v1), or a clear error."""
    if world == "v1":
        return None
    if world not in TRAINING_WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {['v1', *TRAINING_WORLDS]}")
    return TRAINING_WORLDS[world][0]


def worlds_help() -> str:
    """One sentence listing every ``--world`` choice, for the CLI's help."""
    rest = [f"{name} ({about})" for name, (_, about) in TRAINING_WORLDS.items()]
    return "v1 (the version-1 world), " + ", ".join(rest[:-1]) + " or " + rest[-1] + "."
