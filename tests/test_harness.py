"""lagm_nb.bench.harness: rows through the result store, on a toy benchmark of the tiny generator."""
import dataclasses

import pytest
import torch

from lagm_nb.bench.harness import (SMOKE, Benchmark, ResultStore, RowSettings, draw_labelled, grid_rows, row_segmenter,
                                   run_row, save_results, segmenter_scores)
from lagm_nb.datasets import LabelledImages
from lagm_nb.testing import TeacherLabeller, tiny_generator

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    G = tiny_generator()
    z = G.latents(40, seed=5)
    data = LabelledImages(G.sample(z=z)[0], TeacherLabeller(G, 3)(z), 3)
    pool, val, test = data.subset(range(16)), data.subset(range(16, 28)), data.subset(range(28, 40))
    return Benchmark("toy", ["a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 0, 255)], {"gen": pool}, {"gen": val}, test,
                     generators=lambda name: G, generator_names=["tiny"], sources={"": "gen"},
                     pool_latents={"gen": z[:16]}, annotator_val=(z[16:28], val.masks))


SETTINGS = RowSettings(**{k: v for k, v in SMOKE.items() if k not in ("n_val", "n_test")})


def test_a_changed_setting_recomputes_exactly_what_depends_on_it(toy, tmp_path):
    store = ResultStore(tmp_path)
    first = [run_row(store, toy, SETTINGS, m, 4, 0) for m in ("supervised", "gm")]
    again = ResultStore(tmp_path)
    assert [run_row(again, toy, SETTINGS, m, 4, 0) for m in ("supervised", "gm")] == first and not again.computed
    longer = ResultStore(tmp_path)
    run_row(longer, toy, dataclasses.replace(SETTINGS, segmenter_steps=4), "gm", 4, 0)   # downstream budget only
    assert [c.split(" ")[0] for c in longer.computed] == ["downstream", "test"]          # the annotator is reused


def test_same_draw_for_every_method(toy):
    assert torch.equal(draw_labelled(toy.pools["gen"], 4, 1).images, draw_labelled(toy.pools["gen"], 4, 1).images)
    assert not torch.equal(draw_labelled(toy.pools["gen"], 4, 1).images, draw_labelled(toy.pools["gen"], 4, 2).images)


def test_deeplab_rows(toy, tmp_path):
    cfg = dataclasses.replace(SETTINGS, segmenter="deeplabv3_resnet50", matching_segmenter="deeplabv3_resnet50")
    row = run_row(ResultStore(tmp_path), toy, cfg, "gm", 4, 0)
    assert 0 <= row["miou"] <= 100
    with pytest.raises(ValueError, match="unknown segmenter"):
        run_row(ResultStore(tmp_path), toy, dataclasses.replace(SETTINGS, segmenter="segformer"), "supervised", 4, 0)


def test_grid_rows_label_rows_and_row_segmenter_finds_their_segmenters(toy, tmp_path):
    cells = [("toy", "gm", 4, 0, {"panel": "P"}), ("toy", "supervised", 4, 1)]
    rows = grid_rows(ResultStore(tmp_path), [toy], SETTINGS, cells, progress=False)
    assert rows[0]["panel"] == "P" and "panel" not in rows[1] and [r["kind"] for r in rows] == ["gm", "supervised"]
    plain = [run_row(ResultStore(tmp_path), toy, SETTINGS, m, 4, s) for _, m, _, s, *_ in cells]
    assert [{k: v for k, v in r.items() if k not in ("panel", "benchmark", "kind", "source")} for r in rows] == plain
    again = ResultStore(tmp_path)
    seg = row_segmenter(again, toy, SETTINGS, "gm", 4, 0)
    assert not again.computed and segmenter_scores(again, toy, seg)["miou"] == rows[0]["miou"]


def test_save_results_writes_runs_and_means(tmp_path):
    runs = [{"kind": "gm", "n_labels": 2, "seed": s, "miou": m} for s, m in [(0, 40.0), (1, 44.0)]]
    df, summary = save_results(runs, tmp_path, "t", "T", "cmd", "", ["kind"], ["miou", "fg_miou"])
    assert df.fg_miou.isna().all() and summary.to_dict("records") == [
        {"kind": "gm", "seeds": 2, "miou": "42.0 ± 2.0", "fg_miou": ""}]
    assert "| gm | 2 | 42.0 ± 2.0 |  |" in (tmp_path / "t.md").read_text()
