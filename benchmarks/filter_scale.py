"""Image filters at 10M regions: SQL spans on image rows -> merged id ranges -> FAISS selector.

Builds a SQLite index database directly with bulk SQL (recursive CTEs, no ORM, no vectors):
``--images`` images of ``--per-image`` regions, at schema revision 0002, then upgrades it to
the newest revision, timing the 0003 backfill of the per-image spans. Region rows are *small*
(``rle = '{}'``): the filter reads only the ``images`` table, so row size does not change what
is measured here; the old ``GROUP BY`` aggregate over ``regions`` is timed once for reference
(it reads the ``ix_regions_image_live`` index, also independent of row size).

The library looks like a real one: paths ``<year>/<folder of 1000>/img<n>.<jpg|png>``, the
first half of the images in ``2020/``, the second in ``2021/``, jpg and png alternating; 1 image
in 100 re-indexed (its first regions tombstoned, new ones appended at the end of the id space);
1 in 10,000 given one extra region later (its live ids are no longer contiguous).

Filters, each matching half the images: ``path_glob='*.png'`` (every other image: ranges do not
merge), ``folder='2020'`` (the first half: ranges merge), and the same two as explicit image ids.
For each: the median of ``--repeats`` runs of ``region_filter`` (the SQL read + numpy merge, what
``RegionIndex.region_filter`` calls on a pooled connection) and of building the FAISS selector
(``region_selector`` over every id of the index: the bitmap), checked against a brute-force
oracle (live region ids by a JOIN over ``regions``). Also timed: recomputing the spans of 200
images (what each ingest batch adds to its transaction).

Run under ``nice -n 10``: ``python benchmarks/filter_scale.py --images 200000``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe
from sqlalchemy import Engine, text

from regionsearch.store import ImageFilter, RegionFilter, open_database
from regionsearch.store.db import alembic_config, create_db_engine, migrations_dir
from regionsearch.store.faiss_filters import region_selector
from regionsearch.store.filter_ops import filter_bits
from regionsearch.store.filter_strategy import FilterPlan, plan_filter, post_filtered_search
from regionsearch.store.region_filters import region_filter
from regionsearch.store.regions import RegionRepository, refresh_spans

NOW = "2026-01-01 00:00:00.000000"
REINDEXED_EVERY = 100
SCATTERED_EVERY = 10_000

_CTE = "WITH RECURSIVE c(r) AS (SELECT 0 UNION ALL SELECT r + 1 FROM c WHERE r + 1 < {n}) "
_REGION_COLS = (
    "INSERT INTO regions (id, image_id, rle, bbox_x, bbox_y, bbox_w, bbox_h, area, source, "
    "embedder, vector_state, deleted, created_at) "
)
_REGION_VALS = "'{}', 0, 0, 1, 1, 1, 'proposal', 'e', 'committed', 0, '" + NOW + "'"


def upgrade_to(engine: Engine, revision: str) -> float:
    """Alembic ``upgrade revision`` on ``engine``; returns seconds."""
    from alembic import command

    t0 = time.perf_counter()
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return time.perf_counter() - t0


def build(path: Path, n_images: int, per_image: int) -> dict[str, float]:
    """The database at revision 0002 filled with bulk SQL, then upgraded (backfill timed)."""
    url = f"sqlite:///{path}"
    engine = create_db_engine(url)
    upgrade_to(engine, "0002")
    t0 = time.perf_counter()
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    n_regions = n_images * per_image
    half = n_images // 2
    with con:
        con.execute(
            "INSERT INTO images (id, path, status, created_at) "
            + _CTE.format(n=n_images)
            + "SELECT r + 1, printf('%d/%04d/img%07d.%s', CASE WHEN r < "
            + str(half)
            + " THEN 2020 ELSE 2021 END, r / 1000, r, CASE r % 2 WHEN 0 THEN 'jpg' ELSE 'png' END),"
            + f" 'indexed', '{NOW}' FROM c"
        )
        con.execute(
            _REGION_COLS
            + _CTE.format(n=n_regions)
            + f"SELECT r + 1, r / {per_image} + 1, {_REGION_VALS} FROM c"
        )
        # re-indexed images: old regions tombstoned, new ones appended after every other id
        n_re = n_images // REINDEXED_EVERY
        con.execute(f"UPDATE regions SET deleted = 1 WHERE image_id % {REINDEXED_EVERY} = 7")
        con.execute(
            _REGION_COLS
            + _CTE.format(n=n_re * per_image)
            + f"SELECT {n_regions} + r + 1, (r / {per_image}) * {REINDEXED_EVERY} + 7, "
            + f"{_REGION_VALS} FROM c"
        )
        # a few images given one more region later: live ids no longer contiguous
        base = n_regions + n_re * per_image
        con.execute(
            _REGION_COLS
            + _CTE.format(n=n_images // SCATTERED_EVERY)
            + f"SELECT {base} + r + 1, r * {SCATTERED_EVERY} + 3, {_REGION_VALS} FROM c"
        )
    con.close()
    built = time.perf_counter() - t0
    backfill = upgrade_to(engine, "head")
    engine.dispose()
    return {"build_s": round(built, 1), "migration_0003_backfill_s": round(backfill, 2)}


def _median_ms(fn: Any, repeats: int) -> tuple[dict[str, float], Any]:
    """Median wall and CPU milliseconds of ``repeats`` calls (and the last result).

    CPU (``process_time``: SQLite runs in this process) is the cost on a shared machine, where
    the wall clock also counts waiting for a core."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ms = {"wall": statistics.median(wall) * 1000, "cpu": statistics.median(cpu) * 1000}
    return {k: round(v, 2) for k, v in ms.items()}, out


def _oracle(engine: Engine, where_images: str, span: int) -> np.ndarray:
    """Boolean mask over ``[0, span)`` of the live region ids of the images ``where_images``
    selects (a JOIN over ``regions``, written here in plain SQL: independent of the store)."""
    sql = (
        "SELECT r.id FROM regions r JOIN images i ON i.id = r.image_id "
        f"WHERE r.deleted = 0 AND {where_images}"
    )
    with engine.connect() as conn:
        ids = np.fromiter((r[0] for r in conn.exec_driver_sql(sql)), dtype=np.int64)
    mask = np.zeros(span, dtype=bool)
    mask[ids] = True
    return mask


def _old_aggregate_ms(engine: Engine, where_images: str) -> dict[str, float]:
    """One run of the filter SQL before spans lived on image rows (GROUP BY over regions)."""
    sql = (
        "SELECT image_id, min(id), max(id), count(*) FROM regions WHERE deleted = 0 AND "
        f"image_id IN (SELECT i.id FROM images i WHERE {where_images}) GROUP BY image_id"
    )
    with engine.connect() as conn:
        ms, _ = _median_ms(lambda: conn.exec_driver_sql(sql).fetchall(), 1)
    return ms


def _backfill_ms(engine: Engine) -> dict[str, float]:
    """The 0003 backfill statement run again over the whole database, then rolled back."""
    file = migrations_dir() / "versions" / "0003_image_region_spans.py"
    spec = importlib.util.spec_from_file_location("migration_0003", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with engine.connect() as conn:
        ms, _ = _median_ms(lambda: conn.exec_driver_sql(module.BACKFILL), 1)
        conn.rollback()
    return ms


def measure(path: Path, n_images: int, repeats: int) -> dict[str, Any]:
    engine = create_db_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        max_id = int(conn.execute(text("SELECT max(id) FROM regions")).scalar_one())
    span = max_id + 1
    every_other = list(range(2, n_images + 1, 2))  # the png images
    first_half = list(range(1, n_images // 2 + 1))
    # name: (filter, the same images in plain SQL over ``images i``, and whether the old
    # GROUP BY aggregate is timed for it)
    filters = {
        "glob_every_other_image": (ImageFilter(path_glob="*.png"), "i.path GLOB '*.png'", True),
        "folder_half_the_photos": (ImageFilter(folder="2020"), "i.path LIKE '2020/%'", True),
        "image_ids_every_other": (ImageFilter(image_ids=every_other), "i.id % 2 = 0", False),
        "image_ids_first_half": (
            ImageFilter(image_ids=first_half),
            f"i.id <= {n_images // 2}",
            False,
        ),
    }
    out: dict[str, Any] = {}
    for name, (f, where, old) in filters.items():
        with engine.connect() as conn:
            region_filter(conn, f, "sqlite")  # warm the page cache and statement cache
            sql_ms, filt = _median_ms(lambda: region_filter(conn, f, "sqlite"), repeats)  # noqa: B023
            sel_ms, sel = _median_ms(lambda: region_selector(filt, max_id=max_id), repeats)  # noqa: B023

            def both() -> Any:
                return region_selector(region_filter(conn, f, "sqlite"), max_id=max_id)  # noqa: B023

            total_ms, _ = _median_ms(both, repeats)
        oracle = _oracle(engine, where, span)
        correct = bool(
            np.array_equal(filter_bits(filt, span), np.packbits(oracle, bitorder="little"))
        )
        out[name] = {
            "images_matched": len(filt.image_ids),
            "regions_allowed": int(oracle.sum()),
            "merged_ranges": len(filt.id_ranges),
            "scattered_ids": 0 if filt.ids is None else len(filt.ids),
            "selector": type(sel.selector).__name__,
            "region_filter_ms": sql_ms,
            "selector_ms": sel_ms,
            "total_ms": total_ms,
            "correct_vs_oracle": correct,
        }
        if old:
            out[name]["old_group_by_ms_one_run"] = _old_aggregate_ms(engine, where)
        print(name, out[name], flush=True)
    rng = np.random.default_rng(0)
    batch = rng.choice(np.arange(1, n_images + 1), size=200, replace=False).tolist()

    def refresh() -> None:
        with engine.begin() as conn:
            from sqlalchemy.orm import Session

            with Session(bind=conn) as s:
                refresh_spans(s, batch)

    out["refresh_spans_200_images_ms"], _ = _median_ms(refresh, repeats)
    out["migration_0003_backfill_rerun_ms"] = _backfill_ms(engine)
    engine.dispose()
    return out


#: End-to-end filters (the library of :func:`build`): half the images (no merging / merging
#: ranges), a tenth, and one folder of 1000 images (0.5%).
E2E_FILTERS = {
    "glob_half_every_other": ImageFilter(path_glob="*.png"),
    "folder_half": ImageFilter(folder="2020"),
    "glob_tenth": ImageFilter(path_glob="2020/00[01]?/*"),
    "folder_0.5pct": ImageFilter(folder="2020/0001"),
}


def _flat_index(engine: Engine, dim: int) -> tuple[Any, int]:
    """An exact FAISS index (``IDMap,Flat``, inner product) holding a random unit vector under
    every live region id, as the real backend would (tombstoned ids absent); and the largest
    id."""
    import faiss

    with engine.connect() as conn:
        sql = "SELECT id FROM regions WHERE deleted = 0"
        ids = np.fromiter((r[0] for r in conn.exec_driver_sql(sql)), dtype=np.int64)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    rng = np.random.default_rng(1)
    for start in range(0, ids.size, 1_000_000):
        part = ids[start : start + 1_000_000]
        vecs = rng.standard_normal((part.size, dim), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        index.add_with_ids(vecs, part)
    return index, int(ids.max())


def end_to_end(path: Path, dim: int, n_queries: int, k: int) -> dict[str, Any]:
    """Filter + exact vector search + the SQL fetch of the k hits, per query: the pre-filter
    (``region_filter`` -> selector inside FAISS) against the post-filter of
    :mod:`regionsearch.store.filter_strategy` (estimate, unfiltered top-k', candidate check),
    both exactly as :class:`~regionsearch.store.index_reads.IndexReader` runs them."""
    import faiss

    db = open_database(f"sqlite:///{path}", migrate=False)
    repo = RegionRepository(db)
    index, max_id = _flat_index(db.engine, dim)
    queries = np.random.default_rng(2).standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def search(q: np.ndarray, kk: int, sel: RegionFilter | None) -> tuple[np.ndarray, np.ndarray]:
        if sel is None:
            return index.search(q, kk)
        fs = region_selector(sel, max_id=max_id)
        return index.search(q, kk, params=faiss.SearchParameters(sel=fs.selector))

    def pre(q: np.ndarray, f: ImageFilter) -> np.ndarray:
        with db.engine.connect() as conn:
            _, ids = search(q, k, region_filter(conn, f, "sqlite"))
        repo.fetch(ids[0])
        return ids

    def post(q: np.ndarray, f: ImageFilter, share: float | None = None) -> np.ndarray:
        with db.engine.connect() as conn:  # share given: post-filter whatever the plan says
            plan = plan_filter(conn, f, "sqlite") if share is None else FilterPlan(f, share)
            if plan.candidates(k) is None:
                _, ids = search(q, k, plan.selector(conn, "sqlite"))
            else:
                _, ids = post_filtered_search(conn, "sqlite", plan, q, k, search)
        repo.fetch(ids[0])
        return ids

    out: dict[str, Any] = {"dim": dim, "k": k, "queries": n_queries, "vectors": index.ntotal}
    search(queries[:1], k, None)  # warm
    out["vector_search_only_ms"], _ = _per_query_ms(lambda q: search(q, k, None), queries)
    with db.engine.connect() as conn:
        out["estimate_ms"] = {}
        for name, f in E2E_FILTERS.items():
            ms, plan = _median_ms(lambda f=f: plan_filter(conn, f, "sqlite"), 20)
            out["estimate_ms"][name] = {**ms, "share": round(plan.share, 4)}
        rows = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
        out["sample_order_by_random_ms"], _ = _median_ms(
            lambda: conn.execute(text("SELECT id FROM images ORDER BY random() LIMIT 512")).all(),
            3,
        )
        out["images"] = rows
    for name, f in E2E_FILTERS.items():
        with db.engine.connect() as conn:
            plan = plan_filter(conn, f, "sqlite")
            true_share = allowed_share(conn, f)
        row: dict[str, Any] = {"estimated_share": round(plan.share, 4), "share": true_share}
        row["auto_strategy"] = "pre" if plan.candidates(k) is None else "post"
        row["k_prime"] = plan.candidates(k)
        pre(queries[:1], f)  # warm caches
        row["pre_ms"], pre_ids = _per_query_ms(lambda q, f=f: pre(q, f), queries)
        forced = max(plan.share or 0.0, 1e-3)
        row["post_ms"], post_ids = _per_query_ms(lambda q, f=f, s=forced: post(q, f, s), queries)
        row["auto_ms"], auto_ids = _per_query_ms(lambda q, f=f: post(q, f), queries)
        row["post_equals_pre"] = bool(np.array_equal(pre_ids, post_ids))
        row["auto_equals_pre"] = bool(np.array_equal(pre_ids, auto_ids))
        out[name] = row
        print(name, row, flush=True)
    db.dispose()
    return out


def allowed_share(conn: Any, f: ImageFilter) -> float:
    """Exact share of the live regions ``f`` allows (the full pre-filter, once)."""
    from regionsearch.store.filter_ops import allowed_upper_bound

    total = conn.execute(text("SELECT sum(live_regions) FROM images")).scalar_one()
    return round(allowed_upper_bound(region_filter(conn, f, "sqlite")) / int(total), 4)


def _per_query_ms(fn: Any, queries: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Median wall and CPU ms of ``fn`` over the queries (one at a time), and the ids found."""
    wall, cpu, found = [], [], []
    for q in queries:
        t0, c0 = time.perf_counter(), time.process_time()
        found.append(np.asarray(fn(q[None]))[0])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ms = {"wall": statistics.median(wall) * 1000, "cpu": statistics.median(cpu) * 1000}
    return {key: round(v, 2) for key, v in ms.items()}, np.stack(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--per-image", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--keep-dir", type=Path, default=None, help="build databases here, keep and reuse them"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "filter_scale.json"
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="only time filtered searches pre vs post (needs --keep-dir databases); "
        "adds 'end_to_end' to --out",
    )
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--queries", type=int, default=25)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if args.end_to_end:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results["end_to_end"] = {
            "machine": describe() + " (shared with other jobs: contended)",
            "sizes": [],
        }
        for n_images in args.images:
            path = args.keep_dir / f"filters_{n_images}x{args.per_image}.db"
            print(f"end to end: {path}", flush=True)
            row = end_to_end(path, args.dim, args.queries, args.k)
            results["end_to_end"]["sizes"].append({"regions": n_images * args.per_image, **row})
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    results: dict[str, Any] = {
        "machine": describe() + " (shared with other jobs: contended)",
        "per_image": args.per_image,
        "repeats": args.repeats,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n_images in args.images:
            path = (args.keep_dir or Path(tmp)) / f"filters_{n_images}x{args.per_image}.db"
            built = path.with_suffix(".json")
            print(f"{n_images} images x {args.per_image} regions", flush=True)
            row: dict[str, Any] = {"images": n_images, "regions": n_images * args.per_image}
            if not built.exists():
                path.unlink(missing_ok=True)
                built.write_text(json.dumps(build(path, n_images, args.per_image)))
            row.update(json.loads(built.read_text()))
            print(row, flush=True)
            row["db_mb"] = round(path.stat().st_size / 2**20)
            row["filters"] = measure(path, n_images, args.repeats)
            results["sizes"].append(row)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
