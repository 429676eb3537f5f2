"""Parsing of ``regionsearch eval``'s repeatable embedder options (``--option``, ``--variant``)."""

from __future__ import annotations

from typing import Any

from regionsearch.cli.errors import CliError
from regionsearch.cli.options import parse_key_values, parse_value


def parse_options(items: list[str] | None, known: list[str]) -> dict[str, dict[str, Any]]:
    """``["crop.margin=0.2", ...]`` → ``{"crop": {"margin": 0.2}}``."""
    from regionsearch.eval.datasets import EvalError

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        embedder, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise EvalError(f"--option {item!r}: expected EMBEDDER.KEY=VALUE, e.g. crop.margin=0.2")
        if embedder not in known:
            raise EvalError(
                f"--option {item!r}: unknown embedder {embedder!r} ({', '.join(known)})"
            )
        out.setdefault(embedder, {})[option.replace("-", "_")] = parse_value(raw.strip())
    return out


def parse_variants(items: list[str] | None, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``["maskinversion:lr=0.1,steps=5"]`` → ``[("maskinversion", {"lr": 0.1, "steps": 5})]``
    (each embedder must also be one of the evaluated ``names``)."""
    from regionsearch.eval.datasets import EvalError

    out = []
    for item in items or []:
        name, colon, rest = item.partition(":")
        pairs = [p for p in rest.split(",") if p.strip()]
        malformed = EvalError(
            f"--variant {item!r}: expected EMBEDDER:KEY=VALUE[,KEY=VALUE...], "
            "e.g. maskinversion:lr=0.1"
        )
        if not colon or not pairs:
            raise malformed
        try:
            options = parse_key_values(pairs, "--variant")
        except CliError:
            raise malformed from None
        if name not in names:
            raise EvalError(f"--variant {item!r}: {name!r} is not among the evaluated embedders")
        out.append((name, options))
    return out
