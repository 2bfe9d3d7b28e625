import filecmp, json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lagm_nb
import lagm_nb.factory as factory
from lagm_nb.annotator import FPNAnnotator, PixelMLPAnnotator
from lagm_nb.core import fingerprint, step_seed
from lagm_nb.downstream import dataset_batches, train_segmenter
from lagm_nb.factory import (GeneratorMismatch, SyntheticDataset, export_dataset, item_path, load_annotator,
                             load_segmenter, read_export_manifest, save_annotator, save_segmenter)
from lagm_nb.generators import HookedGenerator
from lagm_nb.segmenters import UNet
from lagm_nb.testing import tiny_generator

ROOT = Path(__file__).resolve().parents[1]
EXPORT = dict(seed=3, batch_size=4, shard_size=5, soft=True, preview=True, progress=False)


def _annotator(G, seed=0):
    torch.manual_seed(seed)
    return FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8).eval()


def _files(d: Path) -> list[Path]:
    return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")


def _assert_same_export(a: Path, b: Path):
    assert _files(a) == _files(b) and _files(a)
    for f in _files(a): assert filecmp.cmp(a / f, b / f, shallow=False), f"{f} differs"
    ma, mb = (read_export_manifest(d) for d in (a, b))
    for m in (ma, mb): del m["created"], m["updated"]
    assert ma == mb


def test_annotator_round_trip(tmp_path):
    G = tiny_generator()
    _, h = G.sample(3, seed=1)
    for A in (_annotator(G), PixelMLPAnnotator(G.feature_shapes, 3, G.image_size, n_members=2, seed=4).eval()):
        save_annotator(A, tmp_path / "a.pt", G, ["bg", "face", "hair"], info={"note": "x"})
        B = load_annotator(tmp_path / "a.pt")                     # no other input
        assert type(B) is type(A) and not B.training and B.init_kwargs == A.init_kwargs
        assert torch.equal(A(h), B(h)) and fingerprint(A) == fingerprint(B)
        assert B.class_names == ["bg", "face", "hair"] and B.info == {"note": "x"}
        assert B.trained_on["fingerprint"] == fingerprint(G) and B.trained_on["layers"] == G.layers
        assert torch.equal(load_annotator(tmp_path / "a.pt", G)(h), A(h))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        save_annotator(A, tmp_path / "b.pt", G, ["a", "b"])


def test_mismatched_generator_is_refused_naming_the_difference(tmp_path):
    G = tiny_generator()
    save_annotator(_annotator(G), tmp_path / "a.pt", G)
    with pytest.raises(GeneratorMismatch, match=r"other weights: .*weights: (\w+) \(recorded\) vs (?!\1)\w+ \(given\)"):
        load_annotator(tmp_path / "a.pt", tiny_generator(seed=1))
    with pytest.raises(GeneratorMismatch, match=r"does not fit this generator: .*feature_shapes: \[\[32, 4, 4\]"):
        load_annotator(tmp_path / "a.pt", tiny_generator(width=4))
    with pytest.raises(GeneratorMismatch, match=r"layers: \['relu1', 'relu2', 'relu3'\] \(recorded\) vs \['relu2'"):
        load_annotator(tmp_path / "a.pt", HookedGenerator(G.G, ["relu2", "relu3"], 16))
    with pytest.warns(UserWarning, match="other weights"):
        load_annotator(tmp_path / "a.pt", tiny_generator(seed=1), allow_other_weights=True)
    other_call = HookedGenerator(G.G, r"relu\d+", 16, forward=lambda net, z: net(z))   # same weights and layers
    with pytest.warns(UserWarning, match=r"other settings .*fingerprint"): load_annotator(tmp_path / "a.pt", other_call)
    with pytest.raises(GeneratorMismatch, match="features"): save_annotator(_annotator(G), tmp_path / "b.pt",
                                                                            tiny_generator(width=4))


def test_export_then_read_back(tmp_path):
    G = tiny_generator()
    A = _annotator(G)
    out = export_dataset(G, A, tmp_path / "d", 7, class_names=["bg", "face", "hair"], **EXPORT)
    assert _files(out) == sorted(Path(part) / f"{i // 5:03d}" / f"{i:06d}.{ext}" for i in range(7)
                                 for part, ext in [("images", "png"), ("masks", "png"), ("soft", "npy"),
                                                   ("previews", "png")])
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_images"] == m["n_complete"] == 7 and m["seed"] == 3 and m["resolution"] == [32, 32]
    assert m["class_names"] == ["bg", "face", "hair"] and m["library_version"] == lagm_nb.__version__
    assert m["generator"]["fingerprint"] == fingerprint(G) and m["generator"]["layers"] == ["relu1", "relu2", "relu3"]
    assert m["annotator"]["fingerprint"] == fingerprint(A) and m["annotator"]["config"] == A.init_kwargs
    assert "step_seed(seed, i, 'export')" in m["latent_rule"] and m["created"] and m["truncation"] == 1.0
    with Image.open(item_path(out, "images", 6, 5)) as im: assert im.mode == "RGB" and im.size == (32, 32)
    with Image.open(item_path(out, "masks", 6, 5)) as im: assert im.mode == "L"
    # the items are the generator's and annotator's outputs at the latents the rule gives (images 4-7: one batch)
    z = torch.cat([G.latents(1, seed=step_seed(3, i, "export")) for i in range(4, 8)])
    images, feats = G.sample(z=z)
    logits = A(feats)
    hard, soft = SyntheticDataset(out), SyntheticDataset(out, soft=True)
    assert len(hard) == 7 and hard.class_names == ["bg", "face", "hair"]
    for k, i in enumerate(range(4, 7)):
        x, y = hard[i]
        assert x.shape == (3, 32, 32) and y.dtype == torch.long
        assert torch.equal(x, ((images[k] + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1)
        assert torch.equal(y, logits[k].argmax(0))
        assert torch.equal(soft[i][1], logits[k].softmax(0).half().float())
        preview = np.asarray(Image.open(item_path(out, "previews", i, 5)))
        assert preview.shape == (32, 64, 3) and np.array_equal(preview[:, :32], ((x + 1) * 127.5).round().byte()
                                                               .permute(1, 2, 0).numpy())
    assert torch.equal(hard.latents(G, [4, 5, 6]), z[:3]) and hard[-1][1].shape == (32, 32)
    with pytest.raises(IndexError): hard[7]
    out2 = export_dataset(G, A, tmp_path / "e", 2, seed=0, progress=False)
    with pytest.raises(ValueError, match="without soft labels"): SyntheticDataset(out2, soft=True)
    assert not (out2 / "soft").exists() and not (out2 / "previews").exists()


def test_an_image_does_not_depend_on_the_batch_it_was_drawn_in(tmp_path):
    G = tiny_generator()
    A = _annotator(G)
    a = export_dataset(G, A, tmp_path / "a", 6, seed=1, batch_size=2, progress=False)
    b = export_dataset(G, A, tmp_path / "b", 6, seed=1, batch_size=3, progress=False)
    for i in range(6):   # same latents whatever the batching; labels agree (up to float effects of batch size)
        assert (SyntheticDataset(a)[i][0] - SyntheticDataset(b)[i][0]).abs().max() <= 1 / 127.5 + 1e-6
        assert (SyntheticDataset(a)[i][1] == SyntheticDataset(b)[i][1]).float().mean() > 0.99


def test_failed_export_resumes_to_identical_files_and_counts_no_half_image(tmp_path, monkeypatch):
    G = tiny_generator()
    A = _annotator(G)
    export_dataset(G, A, tmp_path / "full", 11, **EXPORT)
    real, calls = factory.write_item, []
    def failing(out, index, *args):
        calls.append(index)
        if len(calls) == 7:    # image 6 is half written when the "crash" comes
            item_path(out, "images", index, 5).parent.mkdir(parents=True, exist_ok=True)
            (item_path(out, "images", index, 5).parent / ".000006.png.abcd.tmp").write_bytes(b"\x89PNG\r\n")
            raise OSError("disk full (simulated)")
        real(out, index, *args)
    monkeypatch.setattr(factory, "write_item", failing)
    with pytest.raises(OSError, match="simulated"): export_dataset(G, A, tmp_path / "part", 11, **EXPORT)
    part = tmp_path / "part"
    assert read_export_manifest(part)["n_complete"] == 4    # images 4 and 5 are on disk, but their batch is not
    assert item_path(part, "images", 5, 5).exists() and len(SyntheticDataset(part)) == 4
    assert list(part.rglob("*.tmp"))
    monkeypatch.setattr(factory, "write_item", real)
    export_dataset(G, A, part, 11, **EXPORT)
    assert not list(part.rglob("*.tmp"))
    _assert_same_export(tmp_path / "full", part)
    export_dataset(G, A, part, 14, **EXPORT)                  # growing an export = exporting more at once
    export_dataset(G, A, tmp_path / "more", 14, **EXPORT)
    _assert_same_export(tmp_path / "more", part)
    mtime = item_path(part, "masks", 13, 5).stat().st_mtime_ns
    export_dataset(G, A, part, 10, **EXPORT)                  # fewer than there are: nothing to do
    assert read_export_manifest(part)["n_complete"] == 14
    assert item_path(part, "masks", 13, 5).stat().st_mtime_ns == mtime


_SLOW_EXPORT = """
import sys, time, torch
import lagm_nb.factory as factory
from lagm_nb.testing import tiny_generator
real = factory.write_item
def slow(*args):
    real(*args); time.sleep(0.25)
factory.write_item = slow
G = tiny_generator()
A = factory.load_annotator(sys.argv[1], G)
factory.export_dataset(G, A, sys.argv[2], 12, seed=3, batch_size=4, shard_size=5, soft=True, preview=True,
                       progress=False)
"""


def test_export_killed_with_sigkill_resumes_to_identical_files(tmp_path):
    G = tiny_generator()
    A = _annotator(G)
    save_annotator(A, tmp_path / "a.pt", G)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, str(tmp_path / "a.pt"), str(out)], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("images/*/*.png"))) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    n_files = len(list(out.glob("images/*/*.png")))
    done = read_export_manifest(out)["n_complete"]
    assert 6 <= n_files < 12 and done % 4 == 0 and done <= n_files     # only whole batches are counted
    export_dataset(G, load_annotator(tmp_path / "a.pt", G), out, 12, **EXPORT)
    export_dataset(G, A, tmp_path / "straight", 12, **EXPORT)
    _assert_same_export(tmp_path / "straight", out)


def test_appending_to_another_export_is_refused(tmp_path, unchanged):
    G = tiny_generator()
    A = _annotator(G)
    out = export_dataset(G, A, tmp_path / "d", 3, **EXPORT)
    with unchanged(out), pytest.raises(ValueError, match=r"another generator \(weights: \w+ \(recorded\) vs \w+ "
                                                         r"\(given\)"):
        export_dataset(tiny_generator(seed=1), A, out, 6, **EXPORT)
    with unchanged(out), pytest.raises(ValueError, match=r"another annotator \(FPNAnnotator (\w+) \(recorded\) vs "
                                                         r"FPNAnnotator (?!\1)\w+ \(given\)\)"):
        export_dataset(G, _annotator(G, seed=1), out, 6, **EXPORT)
    with unchanged(out), pytest.raises(ValueError, match=r"seed \(3 \(recorded\) vs 4 \(given\)\)"):
        export_dataset(G, A, out, 6, **{**EXPORT, "seed": 4})
    with unchanged(out), pytest.raises(ValueError, match=r"batch_size \(4 \(recorded\) vs 8"):
        export_dataset(G, A, out, 6, **{**EXPORT, "batch_size": 8})
    (tmp_path / "other").mkdir(); (tmp_path / "other" / "notes.txt").write_text("mine")
    with unchanged(tmp_path / "other"), pytest.raises(FileExistsError, match="holds no manifest.json"):
        export_dataset(G, A, tmp_path / "other", 2)
    assert read_export_manifest(out)["n_complete"] == 3


def test_bad_export_arguments():
    G = tiny_generator()
    A = _annotator(G)
    with pytest.raises(ValueError, match="n_images must be a positive integer"): export_dataset(G, A, "/nonexistent", 0)
    with pytest.raises(ValueError, match="truncation=0.7 needs a generator with a mapping network"):
        export_dataset(G, A, "/nonexistent", 2, truncation=0.7)
    with pytest.raises(FileNotFoundError, match="not an exported dataset"): SyntheticDataset("/nonexistent")


def test_segmenter_trains_on_an_export_and_round_trips(tmp_path):
    G = tiny_generator()
    out = export_dataset(G, _annotator(G), tmp_path / "d", 6, **EXPORT)
    source = dataset_batches(SyntheticDataset(out), batch_size=3, seed=2)
    x, y = source(1)
    assert x.shape == (3, 3, 32, 32) and y.shape == (3, 32, 32) and torch.equal(source(1)[1], y)
    torch.manual_seed(0)
    run = train_segmenter(UNet(3, width=4), source, 2, progress=False)
    save_segmenter(run.segmenter, tmp_path / "s.pt", "unet", {"width": 4}, info={"dataset": str(out)})
    S = load_segmenter(tmp_path / "s.pt")
    assert torch.equal(S(x), run.segmenter(x)) and S.info["dataset"] == str(out) and S.class_names == ["0", "1", "2"]
