"""Benchmark outputs from result rows: a markdown table, a JSON file and a grouped bar chart.

Everything here takes the flat rows of :mod:`regionsearch.eval.runner` (``{dataset, model,
embedder, task, metric, value, n}`` plus optional timing keys), so results saved as JSON can be
re-rendered later without re-running anything. The chart uses Matplotlib's object API on an Agg
canvas (no ``pyplot``, no global backend switch), so it works headless and inside other apps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from regionsearch.eval.runner import ROW_KEYS, TIMING_KEYS

Row = Mapping[str, Any]

#: Timing columns of the table: (row key, header, scale factor, format).
_TIMING_COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("seconds_per_image", "s/image", 1.0, "{:.3f}"),
    ("seconds_per_mask", "ms/mask", 1000.0, "{:.1f}"),
)


#: One-line definitions printed under the table for the tasks it shows.
TASK_LEGEND: dict[str, str] = {
    "classes": "classes: every ground-truth mask ranks all class names (prompt template "
    "applied); acc@k = the true class is in the top k",
    "expressions": "expressions (MaskInversion paper protocol): every mask with expressions "
    "ranks all sentences of its image; hit = the top sentence describes that mask",
    "grounding": "grounding: every sentence picks one of its image's ground-truth masks; "
    "hit = its own mask",
    "retrieval": "retrieval: every class name ranks all masks of the collection (text-to-region "
    "search); mAP over the classes present, acc@1 = the top mask has that class",
    "classes (same colour)": "classes (same colour): classes acc@1 on colour-ambiguous masks only "
    "(another mask of the image has a class of the same colour)",
    "pointing": "pointing: a property of the model, not an embedder: the LeGrad map (last block, "
    "region resolution) of a mask's own class text has its highest mean inside that mask, "
    "among the masks of the image (masks with a duplicated class skipped); 'same colour' = on "
    "colour-ambiguous masks",
}


def column_name(row: Row) -> str:
    """The table column of a row: ``"task metric"``, e.g. ``"classes acc@1"``."""
    return f"{row['task']} {row['metric']}"


def pivot(rows: Iterable[Row]) -> tuple[list[str], list[str], dict[tuple[str, str], Row]]:
    """Embedders and columns in first-appearance order, and the row of each (embedder, column)."""
    embedders: dict[str, None] = {}
    columns: dict[str, None] = {}
    cells: dict[tuple[str, str], Row] = {}
    for row in rows:
        embedders.setdefault(row["embedder"], None)
        columns.setdefault(column_name(row), None)
        cells[(row["embedder"], column_name(row))] = row
    return list(embedders), list(columns), cells


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _best(values: Sequence[float | None], lower_is_better: bool = False) -> float | None:
    finite = [v for v in values if v is not None and _finite(v)]
    if not finite:
        return None
    return min(finite) if lower_is_better else max(finite)


def _bold_if(text: str, value: float | None, best: float | None) -> str:
    if value is None or best is None or not math.isclose(value, best, rel_tol=1e-9, abs_tol=1e-12):
        return text
    return f"**{text}**"


def markdown_table(rows: Sequence[Row], timing: bool = True) -> str:
    """Rows = embedders, columns = task/metric in percent, best per column in bold.

    With ``timing`` and timing keys present, ``s/image`` and ``ms/mask`` columns follow (the
    fastest in bold). Cells an embedder did not run are shown as ``–``.
    """
    embedders, columns, cells = pivot(rows)
    timing_cols = [c for c in _TIMING_COLUMNS if timing and any(_finite(r.get(c[0])) for r in rows)]
    header = ["embedder", *[f"{c} (%)" for c in columns], *[c[1] for c in timing_cols]]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]

    best = {
        c: _best([cells[(e, c)]["value"] for e in embedders if (e, c) in cells]) for c in columns
    }

    def timing_of(embedder: str, key: str) -> float | None:
        values = [cells[(embedder, c)].get(key) for c in columns if (embedder, c) in cells]
        values = [v for v in values if _finite(v)]
        return values[0] if values else None

    best_time = {
        key: _best([timing_of(e, key) for e in embedders], lower_is_better=True)
        for key, *_ in timing_cols
    }
    for embedder in embedders:
        out = [embedder]
        for column in columns:
            row = cells.get((embedder, column))
            if row is None or not _finite(row["value"]):
                out.append("–")
                continue
            out.append(_bold_if(f"{100 * row['value']:.1f}", row["value"], best[column]))
        for key, _, scale, fmt in timing_cols:
            value = timing_of(embedder, key)
            out.append(
                "–" if value is None else _bold_if(fmt.format(value * scale), value, best_time[key])
            )
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def counts_line(rows: Sequence[Row]) -> str:
    """``n`` per column (items scored), e.g. ``classes acc@1: 2250``; differing counts between
    embedders of one column are listed separately (they should not happen)."""
    _, columns, cells = pivot(rows)
    parts = []
    for column in columns:
        ns = sorted({int(r["n"]) for (_, c), r in cells.items() if c == column})
        parts.append(f"{column}: {'/'.join(str(n) for n in ns)}")
    return "; ".join(parts)


def markdown_report(
    rows: Sequence[Row], title: str | None = None, notes: Sequence[str] = ()
) -> str:
    """A self-contained markdown section: title, table, item counts and free-form notes."""
    if not rows:
        raise ValueError("no result rows to report")
    datasets = sorted({str(r["dataset"]) for r in rows})
    models = sorted({str(r["model"]) for r in rows})
    title = title or f"Region benchmark: {', '.join(datasets)} ({', '.join(models)})"
    parts = [
        f"# {title}",
        "",
        f"Dataset: {', '.join(datasets)}. Model: {', '.join(models)}. "
        "Values are accuracies in percent, best per column in **bold**; timings are embedding "
        "time only (lowest in bold).",
        "",
        markdown_table(rows),
        "",
        f"Items scored (n): {counts_line(rows)}.",
        "",
        *[
            f"- {TASK_LEGEND[t]}"
            for t in dict.fromkeys(r["task"] for r in rows)
            if t in TASK_LEGEND
        ],
    ]
    if notes:
        parts += [*[f"- {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def write_json(rows: Sequence[Row], path: str | Path) -> Path:
    """Write rows as a JSON list: the keys of :data:`ROW_KEYS` in that order, then any timing
    keys present. Other keys are dropped, so the file's schema is fixed."""
    path = Path(path)
    out = []
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row lacks {missing}: {dict(row)!r:.200}")
        record = {k: row[k] for k in ROW_KEYS}
        record["value"] = None if not _finite(record["value"]) else float(record["value"])
        record.update({k: float(row[k]) for k in TIMING_KEYS if _finite(row.get(k))})
        out.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def read_json(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by :func:`write_json` (``None`` values back to NaN)."""
    rows = json.loads(Path(path).read_text())
    for row in rows:
        if row["value"] is None:
            row["value"] = float("nan")
    return rows


def bar_chart(rows: Sequence[Row], path: str | Path, title: str | None = None) -> Path:
    """Grouped bars: one group per task/metric, one bar per embedder, values in percent.

    Each bar carries its value; embedders share one colour across groups and are named in a
    legend below the plot, so long labels such as ``maskinversion (alpha=5)`` stay readable.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no result rows to plot")
    embedders, columns, cells = pivot(rows)
    n_emb = len(embedders)
    width = 0.8 / n_emb
    fig = Figure(figsize=(max(6.0, 1.0 + len(columns) * (0.45 * n_emb + 0.6)), 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    ]  # fmt: skip
    for i, embedder in enumerate(embedders):
        xs, ys = [], []
        for j, column in enumerate(columns):
            row = cells.get((embedder, column))
            if row is not None and _finite(row["value"]):
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(100 * row["value"])
        bars = ax.bar(xs, ys, width * 0.92, label=embedder, color=palette[i % len(palette)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(columns)), columns, fontsize=10)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    datasets = sorted({str(r["dataset"]) for r in rows})
    models = sorted({str(r["model"]) for r in rows})
    ax.set_title(title or f"{', '.join(datasets)} — {', '.join(models)}", fontsize=11)
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=min(n_emb, 4),
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = [
    "bar_chart",
    "column_name",
    "counts_line",
    "markdown_report",
    "markdown_table",
    "pivot",
    "read_json",
    "write_json",
]
