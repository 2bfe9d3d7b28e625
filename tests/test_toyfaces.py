import pytest
import torch

from lagm_nb.bench.toyfaces import (TOYFACE_CLASSES, TOYFACE_SPLITS, ToyFaceDataset, render_toyfaces, toyface_labelled,
                             toyface_masks, toyface_split)
from lagm_nb.datasets import LabelledImages


@pytest.mark.parametrize("style", ["photo", "render"])
def test_a_seed_is_the_same_sample_in_any_batch_and_order(style):
    x, m = render_toyfaces(range(10, 22), 32, style, "cpu")
    order = [21, 10, 15, 13]
    x2, m2 = render_toyfaces(torch.tensor(order), 32, style, "cpu", batch_size=3)
    idx = [s - 10 for s in order]
    assert torch.equal(m2, m[idx]) and torch.allclose(x2, x[idx], atol=1e-6)
    x3, m3 = render_toyfaces([15], 32, style, "cpu")
    assert torch.equal(m3[0], m[5]) and torch.allclose(x3[0], x[5], atol=1e-6)


def test_different_seeds_differ_and_repeats_agree():
    x, m = render_toyfaces([4, 5, 4], 32, device="cpu")
    assert not torch.equal(m[0], m[1]) and not torch.allclose(x[0], x[1], atol=0.05)
    assert torch.equal(m[0], m[2]) and torch.equal(x[0], x[2])


@pytest.mark.parametrize("style,size", [("photo", 40), ("render", 24)])
def test_shapes_dtypes_and_ranges(style, size):
    x, m = render_toyfaces([0, 1, 2], size, style, "cpu")
    assert x.shape == (3, 3, size, size) and x.dtype == torch.float32
    assert m.shape == (3, size, size) and m.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert m.min() >= 0 and m.max() < len(TOYFACE_CLASSES)


def test_photo_and_render_share_the_mask():
    seeds = [7, 8, 9, 10]
    xp, mp = render_toyfaces(seeds, 48, "photo", "cpu")
    xr, mr = render_toyfaces(seeds, 48, "render", "cpu")
    assert torch.equal(mp, mr) and torch.equal(toyface_masks(seeds, 48, "cpu"), mp)
    assert (xp - xr).abs().mean() > 0.1   # same geometry, different pictures


def test_render_background_is_plain_and_photo_background_is_not():
    xp, m = render_toyfaces([3], 64, "photo", "cpu")
    xr, _ = render_toyfaces([3], 64, "render", "cpu")
    bg = (m[0] == 0)
    # interior background pixels (away from antialiased edges) of the render all have one colour
    inner = bg & torch.nn.functional.max_pool2d((~bg)[None, None].float(), 3, 1, 1)[0, 0].eq(0)
    assert xr[0][:, inner].std(1).max() < 1e-6 and xp[0][:, inner].std(1).min() > 0.02


def test_every_class_appears_in_a_batch_of_64():
    m = toyface_masks(range(64), 64, "cpu")
    assert set(m.unique().tolist()) == set(range(len(TOYFACE_CLASSES)))
    counts = torch.bincount(m.flatten(), minlength=len(TOYFACE_CLASSES)).float()
    assert (counts / counts.sum() > 0.005).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(style="cartoon"), "unknown style 'cartoon'"),
    (dict(size=0), "size must be a positive integer"),
    (dict(size=-8), "size must be a positive integer"),
    (dict(size=32.5), "size must be a positive integer"),
    (dict(supersample=0), "supersample must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_toyfaces([1], device="cpu", **kwargs)


@pytest.mark.parametrize("seeds,message", [
    ([], "no seeds"), ([-1], "2\\*\\*32"), ([2**32], "2\\*\\*32"), (torch.tensor([0.5]), "integers"),
    (torch.zeros(2, 3, dtype=torch.long), "1-D"),
])
def test_bad_seeds_raise(seeds, message):
    with pytest.raises(ValueError, match=message):
        render_toyfaces(seeds, 16, device="cpu")


def test_splits_are_disjoint_and_prefix_stable():
    sets = {name: set(toyface_split(name, 500).tolist()) for name in TOYFACE_SPLITS}
    names = list(sets)
    assert all(not (sets[a] & sets[b]) for i, a in enumerate(names) for b in names[i + 1:])
    assert torch.equal(toyface_split("test", 3), toyface_split("test", 30)[:3])
    with pytest.raises(ValueError, match="unknown split 'train'"):
        toyface_split("train", 3)
    with pytest.raises(ValueError, match="n must be an integer"):
        toyface_split("pool", 0)


def test_labelled_set_and_dataset():
    data = toyface_labelled("pool", 3, "render", 32, "cpu")
    assert isinstance(data, LabelledImages) and data.n_classes == len(TOYFACE_CLASSES)
    assert data.names == ["toyface_render_1000000", "toyface_render_1000001", "toyface_render_1000002"]
    ds = ToyFaceDataset("pool", 5, "photo", 32)
    xb, mb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 3, 32, 32) and torch.equal(mb, data.masks)
    assert len(ds) == 5 and torch.equal(ds[-1][1], ds[4][1])
    with pytest.raises(IndexError):
        ds[5]
