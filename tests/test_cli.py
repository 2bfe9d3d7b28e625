import csv, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lagm_nb.cli import load_generator, main
from lagm_nb.core import fingerprint
from lagm_nb.datasets import LabelledImages
from lagm_nb.factory import SyntheticDataset, load_annotator, load_segmenter, read_export_manifest
from lagm_nb.metrics import evaluate_segmenter, scores
from lagm_nb.testing import TeacherLabeller, tiny_generator

ROOT = Path(__file__).resolve().parents[1]
TINY = "lagm_nb.testing:tiny_generator"


@pytest.fixture
def labelled(tmp_path):
    "Six generated images of the tiny generator with the teacher's exact labels, as image and mask folders."
    G = tiny_generator()
    z = G.latents(6, seed=1)
    images, masks = G.sample(z=z)[0], TeacherLabeller(G, 3)(z)
    (tmp_path / "img").mkdir(); (tmp_path / "msk").mkdir()
    for i in range(6):
        rgb = ((images[i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        Image.fromarray(rgb).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(masks[i].byte().numpy()).save(tmp_path / "msk" / f"{i}.png")
    return tmp_path, ["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk")]


def _run(*argv) -> int:
    return main([str(a) for a in argv] + ["--quiet"])


def _learn(d, folder, out="a.pt", *extra):
    return _run("learn", "--generator", TINY, *folder, "--classes", "bg,a,b", "--recipe", "cpu", "--steps", 3,
                "--pretrain-steps", 3, "--warm-start-images", 8, "--warm-start-steps", 3, "--annotator-width", 8,
                "--segmenter-width", 4, "--out", d / out, *extra)


def test_the_whole_chain(labelled, capsys):
    d, folder = labelled
    G = tiny_generator()
    assert _learn(d, folder) == 0
    A = load_annotator(d / "a.pt", G)
    assert A.class_names == ["bg", "a", "b"] and A.info["generator"] == TINY and A.info["config"]["steps"] == 3
    assert A.info["config"]["pretrain_steps"] == 3 and A.info["labelled"]["names"] == [str(i) for i in range(6)]
    assert _run("export", "--annotator", d / "a.pt", "--out", d / "data", "--n-images", 6, "--batch-size", 4,
                "--seed", 2) == 0                                  # the generator as the checkpoint names it
    m = read_export_manifest(d / "data")
    assert m["n_complete"] == 6 and m["seed"] == 2 and m["class_names"] == ["bg", "a", "b"]
    assert m["annotator"]["fingerprint"] == fingerprint(A) and m["generator"]["fingerprint"] == fingerprint(G)
    assert _run("train", "--data", d / "data", "--steps", 3, "--width", 4, "--out", d / "s.pt") == 0
    S = load_segmenter(d / "s.pt")
    assert S.class_names == ["bg", "a", "b"] and S.info["resolution"] == [32, 32] and S.info["steps"] == 3
    capsys.readouterr()
    assert _run("evaluate", "--segmenter", d / "s.pt", *folder, "--csv", d / "scores.csv") == 0
    printed = capsys.readouterr().out
    data = LabelledImages.from_folder(d / "img", d / "msk", 3)
    expected = scores(evaluate_segmenter(S, data.images, data.masks, 3), ["bg", "a", "b"])
    rows = {r["metric"]: float(r["value"]) for r in csv.DictReader(open(d / "scores.csv"))}
    assert list(rows) == ["miou", "fg_miou", "pixel_acc", "iou_bg", "iou_a", "iou_b"]
    assert all(abs(rows[k] - expected[k]) < 0.006 for k in rows)
    assert "miou" in printed and f"{expected['miou']:6.2f}" in printed and "iou_b" in printed


def test_pseudo_label_recipe_learns_without_matching(labelled):
    d, folder = labelled
    assert _run("learn", "--generator", TINY, *folder, "--classes", "3", "--recipe", "pseudo_label",
                "--pretrain-steps", 2, "--warm-start-images", 4, "--warm-start-steps", 2, "--annotator-width", 8,
                "--segmenter-width", 4, "--out", d / "p.pt") == 0
    A = load_annotator(d / "p.pt", tiny_generator())
    assert A.info["recipe"] == "pseudo_label" and A.info["config"]["steps"] == 0 and A.class_names == ["0", "1", "2"]


def test_resumed_export_from_the_command_line_equals_a_straight_one(labelled):
    d, folder = labelled
    assert _learn(d, folder) == 0
    args = ["export", "--annotator", d / "a.pt", "--generator", TINY, "--batch-size", 2, "--soft"]
    assert _run(*args, "--out", d / "grown", "--n-images", 3) == 0
    assert _run(*args, "--out", d / "grown", "--n-images", 5) == 0
    assert _run(*args, "--out", d / "straight", "--n-images", 5) == 0
    a, b = SyntheticDataset(d / "grown", soft=True), SyntheticDataset(d / "straight", soft=True)
    assert len(a) == len(b) == 5 and all(torch.equal(a[i][1], b[i][1]) and torch.equal(a[i][0], b[i][0])
                                         for i in range(5))


def test_user_errors_are_one_line_with_exit_code_2(labelled, capsys):
    d, folder = labelled
    assert _learn(d, folder) == 0
    capsys.readouterr()
    cases = [
        (["export", "--annotator", d / "missing.pt", "--out", d / "x", "--n-images", 2], "missing.pt does not exist"),
        (["export", "--annotator", d / "a.pt", "--out", d / "x", "--n-images", 0], "--n-images: 0 is below 1"),
        (["export", "--annotator", d / "a.pt", "--generator", "lagm_nb.testing:no_such", "--out", d / "x",
          "--n-images", 2], "has no function 'no_such'"),
        (["export", "--annotator", d / "a.pt", "--generator", "celeba", "--out", d / "x", "--n-images", 2],
         "does not fit this generator"),
        (["learn", "--generator", TINY, *folder, "--classes", "bg,a,b", "--out", d / "a.pt"], "a.pt exists"),
        (["learn", "--generator", TINY, *folder, "--classes", "bg,a", "--out", d / "b.pt"], "outside [0, 2)"),
        (["learn", "--generator", TINY, *folder, "--classes", "3", "--recipe", "best", "--out", d / "b.pt"],
         "invalid choice: 'best'"),
        (["train", "--data", d / "img", "--steps", 2, "--out", d / "s.pt"], "not an exported dataset"),
        (["evaluate", "--segmenter", d / "a.pt", *folder], "holds a 'annotator', not a 'segmenter'"),
        (["frobnicate"], "invalid choice"),
    ]
    for argv, message in cases:
        assert _run(*argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], (argv, err)
    assert main(["export", "--help"]) == 0 and "--n-images" in capsys.readouterr().out


def test_generators_by_name():
    assert fingerprint(load_generator(TINY, "cpu")) == fingerprint(tiny_generator())
    from lagm_nb.zoo import face_generator
    assert fingerprint(load_generator("celeba", "cpu")) == fingerprint(face_generator("celeba", "cpu"))
    from lagm_nb.bench.gantrain import hooked_snapshot, read_manifest
    from lagm_nb.bench.toyfaces import toyface_gan_dir
    toy = load_generator("toyfaces", "cpu")
    newest = max(read_manifest(toyface_gan_dir()), key=lambda s: s["step"])["snapshot"]
    assert fingerprint(toy) == fingerprint(hooked_snapshot(toyface_gan_dir() / newest, device="cpu"))
    assert toy.image_size == (64, 64) and toy.has_mapping


def test_python_dash_m_runs_the_command_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for argv, words in [(["--help"], ["learn", "export", "train", "evaluate"]),
                        (["learn", "--help"], ["--recipe", "cpu", "paper", "pseudo_label", "--warm-start-steps"])]:
        res = subprocess.run([sys.executable, "-m", "lagm_nb.cli", *argv], capture_output=True, text=True, env=env,
                             cwd=ROOT)
        assert res.returncode == 0 and all(w in res.stdout for w in words), res.stderr
    res = subprocess.run([sys.executable, "-m", "lagm_nb.cli", "export"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "required" in res.stderr


def test_paper_config_selects_the_papers_recipe(labelled, capsys):
    from lagm_nb.cli import build_parser, learn_recipe
    from lagm_nb.loaders import paper_config
    from lagm_nb.recipe import RecipeConfig
    d, folder = labelled
    assert _run("learn", "--generator", TINY, *folder, "--classes", "bg,a,b", "--paper-config", "pascal-horse",
                "--steps", 2, "--annotator-width", 8, "--segmenter-width", 4, "--out", d / "p.pt") == 0
    A = load_annotator(d / "p.pt", tiny_generator())
    # the command line's matching segmenter is a U-Net: the configuration's U-Net recipe (all parameters matched)
    assert A.info["config"] == paper_config("pascal-horse", "unet").recipe.replace(steps=2).to_dict()
    assert A.info["config"]["match"] == "all" and A.info["config"]["annotator_momentum"] == 0.9
    assert A.info["paper_config"] == "pascal-horse" and A.info["recipe"] == "paper"
    base = ["learn", "--generator", TINY, *folder, "--classes", "3", "--out", str(d / "q.pt")]
    name, recipe = learn_recipe(build_parser().parse_args(base))
    assert name == "cpu" and recipe == RecipeConfig.preset("cpu")                        # the default is unchanged
    capsys.readouterr()
    assert _run(*base, "--recipe", "cpu", "--paper-config", "car-20") == 2
    assert "give --recipe or --paper-config, not both" in capsys.readouterr().err
    assert _run(*base, "--paper-config", "ffhq") == 2
    assert "invalid choice: 'ffhq'" in capsys.readouterr().err
    assert main(["learn", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert all(w in shown for w in ("--paper-config", "celebamask-hq", "cgpart-car")), shown


def test_learn_under_torchrun_runs_data_parallel_and_rank_0_writes(labelled):
    d, folder = labelled
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LAGM_DEVICE": "cpu"}
    argv = ["learn", "--generator", TINY, *folder, "--classes", "bg,a,b", "--steps", 3, "--pretrain-steps", 2,
            "--warm-start-images", 4, "--warm-start-steps", 2, "--annotator-width", 8, "--segmenter-width", 4,
            "--out", d / "ddp.pt", "--quiet"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lagm_nb.cli", *map(str, argv)], capture_output=True, text=True, env=env, cwd=d,
                         timeout=300)
    assert res.returncode == 0 and "terminate called" not in res.stderr, res.stderr[-3000:]   # see main
    assert res.stdout.count("written to") == 1 and "rank 1: done" in res.stdout, res.stdout
    A = load_annotator(d / "ddp.pt", tiny_generator())
    assert A.info["config"]["steps"] == 3 and all(torch.isfinite(p).all() for p in A.state_dict().values())


def test_export_under_torchrun_shares_the_images_and_equals_one_process(labelled):
    d, folder = labelled
    assert _learn(d, folder) == 0
    assert _run("export", "--annotator", d / "a.pt", "--out", d / "one", "--n-images", 10, "--batch-size", 4,
                "--soft") == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LAGM_DEVICE": "cpu"}
    argv = ["export", "--annotator", d / "a.pt", "--out", d / "two", "--n-images", 10, "--batch-size", 4, "--soft",
            "--quiet"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lagm_nb.cli", *map(str, argv)], capture_output=True, text=True, env=env, cwd=d,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "10 labelled images in" in res.stdout and "rank 1: done" in res.stdout, res.stdout
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*")
                                if p.is_file() and p.name != "manifest.json")
    assert files(d / "one") == files(d / "two") and len(files(d / "one")) == 30   # images, masks, soft
    assert all((d / "one" / f).read_bytes() == (d / "two" / f).read_bytes() for f in files(d / "one"))
    old, new = read_export_manifest(d / "one"), read_export_manifest(d / "two")
    assert {k: v for k, v in old.items() if k not in ("created", "updated")} == \
        {k: v for k, v in new.items() if k not in ("created", "updated")}


def test_refusing_to_overwrite_an_output_changes_nothing(labelled, capsys, unchanged):
    d, folder = labelled
    assert _learn(d, folder) == 0
    assert _run("export", "--annotator", d / "a.pt", "--out", d / "data", "--n-images", 4, "--batch-size", 4) == 0
    assert _run("train", "--data", d / "data", "--steps", 2, "--width", 4, "--out", d / "s.pt") == 0
    capsys.readouterr()
    for argv, out in [(["learn", "--generator", TINY, *folder, "--classes", "bg,a,b", "--out", d / "a.pt"], "a.pt"),
                      (["train", "--data", d / "data", "--steps", 2, "--out", d / "s.pt"], "s.pt")]:
        with unchanged(d):
            assert _run(*argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out} exists; pass --overwrite to replace it, or another --out" in err[0], err


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "mps", "gpu", ""])
def test_a_device_that_is_not_here_is_one_line_with_exit_code_2(labelled, capsys, monkeypatch, device):
    if device == "cuda" and torch.cuda.is_available(): pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available(): pytest.skip("this machine has MPS")
    d, folder = labelled
    monkeypatch.setenv("LAGM_DEVICE", device)
    assert _learn(d, folder) == 2                                  # a RuntimeError (or ValueError), not a traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lagm learn: error: LAGM_DEVICE") and not (d / "a.pt").exists(), err


def test_a_run_that_goes_nan_is_one_line_with_exit_code_2(labelled, capsys):
    d, folder = labelled
    assert _learn(d, folder) == 0
    assert _run("export", "--annotator", d / "a.pt", "--out", d / "data", "--n-images", 4, "--batch-size", 4) == 0
    capsys.readouterr()
    assert _run("train", "--data", d / "data", "--steps", 3, "--width", 4, "--lr", "1e30", "--out", d / "s.pt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lagm train: error: segmenter: a loss became NaN or infinite" in err[0], err
    assert not (d / "s.pt").exists()


@pytest.mark.parametrize("command, words", [("train", ["--data", "--steps", "--work-dir", "--soft", "--out"]),
                                            ("evaluate", ["--segmenter", "--images", "--masks", "--csv", "--size"])])
def test_help_of_train_and_evaluate(command, words, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lagm {command}") and all(w in out for w in words), out
