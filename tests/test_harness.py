"""lagm_nb.bench.harness: rows through the result store, on a toy benchmark of the tiny generator."""
import dataclasses
import shutil

import pytest
import torch

from lagm_nb.bench.harness import (SMOKE, Benchmark, ExperimentConfig, ResultStore, RowSettings, annotator_labels,
                                   draw_labelled, draw_latents, frame_scores, grid_rows, label_frames, learned_annotator,
                                   load_annotator, row_segmenter, run_row, save_results, segmenter_scores,
                                   with_generated_source)
from lagm_nb.datasets import LabelledImages
from lagm_nb.recipe import RecipeConfig
from lagm_nb.segmenters import UNet
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


def test_label_frames_are_the_stored_run_and_watching_changes_nothing(toy, tmp_path):
    cfg, z = dataclasses.replace(SETTINGS, gm_steps=6), draw_latents(toy, "gen", 4, 0)
    store = ResultStore(tmp_path)
    frames = label_frames(store, toy, cfg, "cpu", "gen", 4, 0, z)
    labels = frames.tensors()["labels"]
    stored = load_annotator(learned_annotator(store, toy, cfg, "cpu", "gen", 4, 0), toy)
    assert frames.result["steps"] == [0, 3, 6] and torch.equal(labels[-1], annotator_labels(stored, toy.generator(), z))
    assert frames.result["warm_start_reused"]
    scores = frame_scores(frames, draw_labelled(toy.pools["gen"], 4, 0).masks, toy)
    assert [s["step"] for s in scores] == [0, 3, 6] and all(0 <= s["miou"] <= 100 for s in scores)
    shutil.rmtree(frames.path)                                   # without the stage cache: stages 1-2 are rerun too
    shutil.rmtree(tmp_path / "stages")
    again = label_frames(ResultStore(tmp_path), toy, cfg, "cpu", "gen", 4, 0, z)
    assert again.computed and not again.result["warm_start_reused"] and torch.equal(again.tensors()["labels"], labels)
    other = label_frames(store, toy, cfg, RecipeConfig.preset("cpu", segmenter_every=2), "gen", 4, 0, z)
    assert other.key != frames.key and torch.equal(other.tensors()["labels"][0], labels[0])   # same warm start


def test_a_generated_source_holds_the_labellers_predictions(toy, tmp_path):
    labeller = UNet(3, width=4).eval()
    bench = with_generated_source(toy, labeller, n_pool=10, n_val=4, seed=1)
    pool, z = bench.pools["generated"], bench.pool_latents["generated"]
    with torch.no_grad():
        assert torch.equal(pool.masks, labeller(toy.generator().sample(z=z)[0]).argmax(1))
    assert len(bench.vals["generated"]) == 4 and "generated" not in toy.pools          # the original is unchanged
    assert 0 <= run_row(ResultStore(tmp_path), bench, SETTINGS, "datasetgan_generated", 4, 0)["miou"] <= 100
    with pytest.raises(ValueError, match="already has a source"): with_generated_source(bench, labeller, 2, 2, 0)
    with pytest.raises(ValueError, match="has no latents"): draw_latents(toy, "photo", 2, 0)


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
    cfg = ExperimentConfig.preset("default")
    df, summary = save_results(runs, cfg, tmp_path, "t", "T", "", ["kind"], ["miou", "fg_miou"])
    assert df.fg_miou.isna().all() and summary.to_dict("records") == [
        {"kind": "gm", "seeds": 2, "miou": "42.0 ± 2.0", "fg_miou": ""}]
    md = (tmp_path / "t.md").read_text()
    assert "| gm | 2 | 42.0 ± 2.0 |  |" in md and "Produced by `make reproduce`." in md
