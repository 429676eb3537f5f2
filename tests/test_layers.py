"""The package's layers import downward only (cli/api -> search -> store; indexer -> embedders
-> backbone; every layer may read photos through ``image_io``): checked on the source, so a
shortcut import fails here rather than in a review."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "regionsearch"

#: Sub-packages (or top-level modules) each layer may import, besides itself and the root.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "image_io": {"errors"},
    "store": {"errors"},
    "backbone": {"errors"},
    "masks": {"errors", "image_io"},
    "embedders": {"errors", "backbone"},
    "indexer": {"errors", "image_io", "backbone", "embedders", "masks", "store"},
    "search": {"errors", "image_io", "backbone", "embedders", "masks", "store", "visualize"},
    "api": {"errors", "image_io", "backbone", "embedders", "masks", "store", "search", "indexer"},
}


def imported_layers() -> dict[str, set[str]]:
    """Layer -> the other layers its modules import (``from regionsearch.X ... import``)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "regionsearch" and len(parts) > 1 and parts[1] != layer:
                    edges[layer].add(parts[1])
    return edges


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_is_below_it(layer):
    extra = imported_layers().get(layer, set()) - ALLOWED[layer]
    assert not extra, f"regionsearch.{layer} imports {sorted(extra)}, above or beside it"


def test_the_check_sees_imports():
    """Guards the guard: the parser finds the layers' real imports."""
    edges = imported_layers()
    assert {"backbone", "embedders", "store"} <= edges["indexer"]
    assert "image_io" in edges["search"] and "image_io" in edges["masks"]
