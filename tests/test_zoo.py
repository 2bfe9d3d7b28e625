"""The pretrained face generators (fetched by `make fetch`) and the committed faces64 labels."""
import csv, re, subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lagm_nb import zoo
from lagm_nb.zoo import ZooError, face_generator, fetch_weights
from lagm_nb.generators import latents_for_seeds
from lagm_nb.bench.faces64 import FACES64_CLASSES, FACES64_SPLITS, faces64_dir, faces64_index, load_faces64, read_mask

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gens():
    return {name: face_generator(name, "cpu") for name in zoo.ZOO}


def test_hash_mismatch_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGM_NB_CACHE", str(tmp_path))
    bad = tmp_path / "digiface" / "weights.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(ZooError, match=f"Delete {re.escape(str(bad))}"):
        fetch_weights("digiface")


def test_failed_download_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGM_NB_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(ZooError) as e:
        fetch_weights("celeba")
    msg = str(e.value)
    assert "python -m pip download --no-deps --only-binary=:all: generateme==0.1.2 -d DIR" in msg
    assert str(tmp_path / "wheels") in msg and "no network" in msg


def test_unknown_generator():
    with pytest.raises(ValueError, match="choose one of"):
        fetch_weights("ffhq")


@pytest.mark.parametrize("name", ["celeba", "digiface"])
def test_generators_load_and_sample(gens, name):
    G = gens[name]
    assert G.z_shape == (100,) and not G.G.training
    x, h = G.sample(3, seed=0)
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert [tuple(f.shape) for f in h] == [(3, 512, 4, 4), (3, 256, 8, 8), (3, 128, 16, 16), (3, 64, 32, 32)]
    assert torch.equal(latents_for_seeds(G, [4, 9])[1], G.latents(1, seed=9)[0])


def test_faces64_splits_sizes_and_disjoint_seeds():
    for g, splits in FACES64_SPLITS.items():
        seeds = {s: [r["seed"] for r in faces64_index(g, s)] for s in splits}
        assert {s: len(v) for s, v in seeds.items()} == splits
        assert all(len(set(v)) == len(v) for v in seeds.values())
        flat = [x for v in seeds.values() for x in v]
        assert len(set(flat)) == len(flat), f"{g}: a seed is in two splits"
    with open(faces64_dir() / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["name"] for r in rows}) == len(rows) == 1100
    by_gen = {g: {int(r["seed"]) for r in rows if r["generator"] == g} for g in FACES64_SPLITS}
    assert not (by_gen["celeba"] & by_gen["digiface"])


def test_faces64_masks_in_range():
    counts = np.zeros(len(FACES64_CLASSES), int)
    for path in sorted((faces64_dir() / "masks").glob("*.png")):
        m = read_mask(path)
        assert m.shape == (64, 64) and m.dtype == np.uint8 and m.max() < len(FACES64_CLASSES), path.name
        counts += np.bincount(m.ravel(), minlength=len(FACES64_CLASSES))
    assert (counts > 0).all() and counts[0] == counts.max()


def test_load_faces64(gens):
    data, z = load_faces64("digiface", "pool", gens["digiface"])
    assert len(data) == 100 and data.n_classes == 6 and z.shape == (100, 100)
    assert data.images.shape == (100, 3, 64, 64) and data.names[0].startswith("digiface_")
    assert torch.allclose(data.images[:2], gens["digiface"].sample(z=z[:2])[0], atol=1e-5)


def test_load_faces64_errors(tmp_path, gens):
    with pytest.raises(ValueError, match="no split 'train'"):
        load_faces64("celeba", "train")
    with pytest.raises(ValueError, match="no generator 'ffhq'"):
        load_faces64("ffhq", "pool")
    (tmp_path / "masks").mkdir()
    (tmp_path / "index.csv").write_text((faces64_dir() / "index.csv").read_text())
    with pytest.raises(FileNotFoundError, match=r"celeba_000000\.png is missing"):
        load_faces64("celeba", "pool", gens["celeba"], root=tmp_path)
    with pytest.raises(FileNotFoundError, match="index.csv is missing"):
        load_faces64("celeba", "pool", gens["celeba"], root=tmp_path / "masks")
