"""The searcher's switches over a real index, and the end-to-end search task of ``eval``."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from search_references import brute_force_repetition, brute_force_supersets, random_rectangles

from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import (
    ResultOptions,
    calibrate_query,
    degenerate,
    objectness_prior,
    open_set_penalty,
    repetition_penalty,
    suppress_duplicates,
)

# ---------------------------------------------------------------------- searcher


@pytest.fixture(scope="module")
def overlapping_index(tmp_path_factory: pytest.TempPathFactory):
    """An index whose images hold overlapping, tiny, huge and scored regions."""
    from test_search import DIM, tiny_backbone

    from regionsearch.store import NewRegion, RegionIndex

    backbone = tiny_backbone()
    rng = np.random.default_rng(5)
    directory = tmp_path_factory.mktemp("switches") / "index"
    index = RegionIndex.create(
        directory, model=backbone.name, embedder="masked-crop", dimension=DIM
    )
    try:
        records = index.upsert_images(
            [{"path": f"img{i}.png", "width": 32, "height": 32} for i in range(8)]
        )
        batch = []
        for rec in records:
            masks = random_rectangles(rng, 12, size=32)
            masks[0] = True
            masks[1] = False
            masks[1, :3, :3] = True  # under one cell
            masks[3] = masks[2]  # an exact duplicate
            masks[4] = masks[5] | masks[6]  # holds two regions
            regions = [
                NewRegion(
                    rle=rle_mod.encode(m),
                    bbox=tuple(rle_mod.bbox(rle_mod.encode(m))),
                    area=float(m.sum()),
                    source="proposal",
                    source_score=None if j % 5 == 0 else float(rng.uniform(0.001, 1)),
                )
                for j, m in enumerate(masks)
            ]
            vectors = rng.normal(size=(12, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            batch.append((rec.id, regions, vectors))
        ids = index.add_images_regions(batch)
        index.checkpoint()
    finally:
        index.close()
    return directory, backbone, np.concatenate(ids), np.concatenate([b[2] for b in batch])


def test_searcher_switches_equal_postprocessing_the_whole_ranking(overlapping_index) -> None:
    """Over-fetching is exact: top-k equals the switches applied to every region."""
    from regionsearch.search import RegionSearcher
    from regionsearch.search.postprocess import model_cell_fraction
    from regionsearch.store import RegionIndex

    directory, backbone, all_ids, vectors = overlapping_index
    index = RegionIndex.open(directory, read_only=True)
    try:
        records = {r.id: r for r in index.fetch_regions(all_ids)}
        cell = model_cell_fraction(backbone)
        rng = np.random.default_rng(9)
        dropped = demoted = 0
        for options, k, one in itertools.product(
            (
                ResultOptions(),
                ResultOptions(dedupe_iou=0.3, calibration=0.5, objectness=0.2),
                ResultOptions(open_set=1.0, open_set_tau=0.1, calibration=0.5),
                ResultOptions(superset_margin=0.3, superset_cover=0.6),
                ResultOptions(superset_margin=None),
                ResultOptions(repetition=1.0, repetition_floor=0.0, repetition_neighbours=2),
                ResultOptions(repetition=0.5, open_set=1.0, calibration=0.5, superset_margin=0.1),
            ),
            (1, 5, 40),
            (False, True),
        ):
            searcher = RegionSearcher(index, backbone, results=options)
            query = rng.normal(size=vectors.shape[1]).astype(np.float32)
            query /= np.linalg.norm(query)
            shifted = calibrate_query(query, searcher.calibration_direction(), options.calibration)
            recs = [records[int(i)] for i in all_ids]
            scores = vectors @ shifted + objectness_prior(
                [r.source_score for r in recs], options.objectness
            )
            if options.open_set:  # against the searcher's own bank, from every region's vector
                scores += open_set_penalty(
                    vectors @ query,
                    vectors @ searcher.calibration_bank().T,
                    options.open_set_tau,
                    options.open_set,
                )
            if options.repetition:  # against every region of the image, from the masks
                repetition = brute_force_repetition(
                    np.asarray([r.image_id for r in recs]),
                    vectors,
                    np.stack([rle_mod.decode(r.rle).astype(bool) for r in recs]),
                    options.repetition_neighbours,
                )
                term = repetition_penalty(repetition, options)
                demoted += int((term < 0).sum())
                scores += term
            area = [r.area / (32 * 32) for r in recs]
            order = [
                i
                for i in np.argsort(-scores, kind="stable")
                if not degenerate([area[i]], options, cell)[0]
            ]
            if options.superset_margin is not None:
                gone = brute_force_supersets(
                    [recs[i].image_id for i in order],
                    scores[order],
                    [rle_mod.decode(recs[i].rle).astype(bool) for i in order],
                    options.superset_margin,
                    options.superset_cover,
                )
                dropped += sum(gone)
                order = [i for i, g in zip(order, gone, strict=True) if not g]
            keep = suppress_duplicates(
                [recs[i].image_id for i in order], [recs[i].rle for i in order], options.dedupe_iou
            )
            order = [i for i, f in zip(order, keep, strict=True) if f]
            if one:
                best: dict[int, int] = {}
                for i in order:
                    best.setdefault(recs[i].image_id, i)
                order = list(best.values())
            hits = searcher.search_vector(query, k=k, one_per_image=one)
            assert [h.region_id for h in hits] == [int(all_ids[i]) for i in order[:k]]
            np.testing.assert_allclose(
                [h.score for h in hits], [scores[i] for i in order[:k]], rtol=1e-5, atol=1e-5
            )
            if k == 40:  # the searcher did drop degenerate regions and duplicates
                assert len(hits) < len(all_ids)
        assert dropped and demoted  # and supersets, and repeated regions lost score
    finally:
        index.close()


def test_searcher_reuses_repetition_scores_between_searches(overlapping_index) -> None:
    """The per-image mask cache changes nothing but the work: a second search (cache warm) and
    a fresh searcher (cache cold) return the same hits and scores."""
    from regionsearch.search import RegionSearcher
    from regionsearch.store import RegionIndex

    directory, backbone, _, vectors = overlapping_index
    options = ResultOptions(repetition=1.0, repetition_floor=0.0)
    query = vectors[7] / np.linalg.norm(vectors[7])
    index = RegionIndex.open(directory, read_only=True)
    try:
        searcher = RegionSearcher(index, backbone, results=options)
        first = searcher.search_vector(query, k=20)
        assert len(searcher.image_masks) > 0
        again = searcher.search_vector(query, k=20)
        cold = RegionSearcher(index, backbone, results=options).search_vector(query, k=20)
    finally:
        index.close()
    for hits in (again, cold):
        assert [(h.region_id, h.score) for h in hits] == [(h.region_id, h.score) for h in first]


# ---------------------------------------------------------------------- the eval task


def test_search_task_on_a_tiny_world(tmp_path: Path) -> None:
    """Ground-truth source with plain order: detection AP equals the retrieval task's AP (two
    independent implementations); proposals come from the indexer's own preparation."""
    from regionsearch.backbone import Backbone
    from regionsearch.embedders import get_embedder
    from regionsearch.eval.datasets import RegionDataset
    from regionsearch.eval.search_collection import collect, embed_regions
    from regionsearch.eval.search_task import query_texts, score_queries
    from regionsearch.eval.tasks import retrieval_hits
    from regionsearch.eval.world.generate import generate_dataset
    from regionsearch.indexer.pipeline import prepare_image
    from regionsearch.masks import AutomaticProposals

    generate_dataset(tmp_path / "w", n=3, seed=11, size=96, min_objects=2, max_objects=3)
    dataset = RegionDataset.from_world(tmp_path / "w")
    proposer = AutomaticProposals(max_regions=12)
    collection = collect(dataset, proposer)
    first = next(iter(dataset))
    prepared = prepare_image(
        dataset.images_dir / first.file_name, first.file_name, proposer, None, False
    )
    assert collection.sources["proposals"].rles[0] == [r.rle for r in prepared.regions]
    backbone = Backbone.load("reference")
    embedder = get_embedder("masked-crop", backbone)
    texts = query_texts(collection, backbone)
    gt_vectors = embed_regions(embedder, collection, "ground-truth masks")
    plain = score_queries(
        collection, "ground-truth masks", gt_vectors, texts, ResultOptions.plain(), 0
    )
    labels = np.concatenate(collection.labels)
    ap, _ = retrieval_hits(gt_vectors, texts, labels)
    assert plain["mAP"] == pytest.approx(float(ap.mean()))
    assert plain["queries"] == len(np.unique(labels))
    proposals = collection.sources["proposals"]
    assert proposals.size == sum(len(r) for r in proposals.rles) and proposals.covered(0.5) > 0
    vectors = embed_regions(embedder, collection, "proposals")
    result = score_queries(collection, "proposals", vectors, texts, ResultOptions(), 1 / 144)
    assert 0 <= result["mAP"] <= 1 and 0 <= result["P@10"] <= 1


def test_eval_cli_search_task(tmp_path: Path) -> None:
    """``regionsearch eval --tasks search`` writes search rows; switches change the ranking;
    a bad switch value is a one-line error."""
    import json

    import typer
    from typer.testing import CliRunner

    from regionsearch.eval.cli import eval_command
    from regionsearch.eval.world.generate import generate_dataset

    generate_dataset(tmp_path / "w", n=2, seed=12, size=96, min_objects=2, max_objects=3)
    app = typer.Typer()
    app.command()(eval_command)
    base = ["--world", str(tmp_path / "w"), "--tasks", "search", "--embedders", "masked-crop"]
    base += ["--no-progress", "--max-regions", "10"]
    values = {}
    for flag in ("--plain-search", "--max-area=0.001"):  # the latter drops every region
        out = tmp_path / f"{flag}.json"
        report = tmp_path / f"{flag}.md"
        result = CliRunner().invoke(
            app, [*base, flag, "--json", str(out), "--markdown", str(report)]
        )
        assert result.exit_code == 0, result.output
        rows = json.loads(out.read_text())
        values[flag] = {(r["task"], r["metric"]): r["value"] for r in rows}
        assert set(values[flag]) == {
            ("search", "mAP"),
            ("search", "P@10"),
            ("search", "top-1"),
            ("search-gt", "mAP"),
        }
        assert "search result switches" in report.read_text()
    assert values["--plain-search"][("search", "mAP")] > 0
    assert values["--max-area=0.001"][("search", "mAP")] == 0
    assert values["--max-area=0.001"][("search-gt", "mAP")] > 0  # the ceiling keeps its masks
    result = CliRunner().invoke(app, [*base, "--max-area", "0"])
    assert result.exit_code == 2 and "search option: max_area" in result.output
    for margin, shown in (("-1", "superset_margin=None"), ("0.05", "superset_margin=0.05")):
        report = tmp_path / f"superset{margin}.md"
        result = CliRunner().invoke(
            app, [*base, "--superset-margin", margin, "--markdown", str(report)]
        )
        assert result.exit_code == 0, result.output
        assert shown in report.read_text()
    result = CliRunner().invoke(app, [*base, "--superset-cover", "1.5"])
    assert result.exit_code == 2 and "search option: superset_cover" in result.output
    # the repeated-stuff term: on by default for masked crop, off with --repetition 0
    for weight, shown in (("", "repetition=0.5"), ("0", "repetition=0.0")):
        report = tmp_path / f"repetition{weight}.md"
        flags = ["--repetition", weight] if weight else []
        result = CliRunner().invoke(app, [*base, *flags, "--markdown", str(report)])
        assert result.exit_code == 0, result.output
        assert shown in report.read_text()
    result = CliRunner().invoke(app, [*base, "--repetition-floor", "2"])
    assert result.exit_code == 2 and "search option: repetition_floor" in result.output
