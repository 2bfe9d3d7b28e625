import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lagm_nb.datasets import LabelledImages, merge_classes, read_mask

COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _save(folder: Path, name: str, array, mode=None, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(folder / name, **kw)


def _blocky(rng, h=4, w=6):
    "A label map of 2x2 blocks, so that halving it by nearest neighbour is exact."
    return np.kron(rng.integers(0, 4, (h // 2, w // 2)), np.ones((2, 2), dtype=np.int64))


@pytest.fixture
def folders(tmp_path):
    "images/ (a PNG and a JPEG), idx/ (an L and a P index mask), rgb/ (the same masks in colour)."
    rng = np.random.default_rng(0)
    labels = {"a": _blocky(rng), "b": _blocky(rng)}
    pixels = rng.integers(0, 256, (4, 6, 3))
    pixels[0, 0] = [0, 0, 0]; pixels[0, 1] = [255, 255, 255]
    _save(tmp_path / "images", "a.png", pixels)
    _save(tmp_path / "images", "b.jpg", np.full((4, 6, 3), 128), quality=95)
    _save(tmp_path / "idx", "a.png", labels["a"], "L")
    p = Image.fromarray(labels["b"].astype(np.uint8)).convert("P")
    p.putpalette([200, 10, 10] * 256)     # the colour table does not matter for an index mask
    p.save(tmp_path / "idx" / "b.png")
    for stem, lab in labels.items(): _save(tmp_path / "rgb", f"{stem}.png", np.array(COLOURS)[lab])
    return tmp_path, labels, pixels


def test_index_masks_png_and_jpeg_images(folders):
    d, labels, pixels = folders
    data = LabelledImages.from_folder(d / "images", d / "idx", ["bg", "skin", "hair", "eyes"])
    assert data.names == ["a", "b"] and data.n_classes == 4 and data.class_names == ["bg", "skin", "hair", "eyes"]
    assert torch.equal(data.masks, torch.from_numpy(np.stack([labels["a"], labels["b"]])))
    assert torch.allclose(data.images[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
    assert data.images[0, :, 0, 0].tolist() == [-1, -1, -1] and data.images[0, :, 0, 1].tolist() == [1, 1, 1]
    assert (data.images[1] - (128 / 127.5 - 1)).abs().max() < 0.05     # the JPEG, up to compression


def test_colour_masks_with_a_palette_equal_the_index_masks(folders):
    d, _, _ = folders
    by_colour = LabelledImages.from_folder(d / "images", d / "rgb", 4, palette=COLOURS)
    assert torch.equal(by_colour.masks, LabelledImages.from_folder(d / "images", d / "idx", 4).masks)
    with pytest.raises(ValueError, match=r"a.png is a colour image \(mode RGB\); pass palette="):
        LabelledImages.from_folder(d / "images", d / "rgb", 4)


def test_unknown_colour_names_the_file_and_the_colour(folders):
    d, labels, _ = folders
    picture = np.array(COLOURS)[labels["a"]]
    picture[0, 0] = [7, 8, 9]
    _save(d / "rgb", "a.png", picture)
    with pytest.raises(ValueError, match=r"rgb/a.png has the colour \(7, 8, 9\) \(1 pixels\), which is not in"):
        LabelledImages.from_folder(d / "images", d / "rgb", 4, palette=COLOURS)
    with pytest.raises(ValueError, match="one RGB triple"):
        LabelledImages.from_folder(d / "images", d / "rgb", 4, palette=COLOURS[:3])


def test_merge_map_is_applied_before_the_class_check(folders):
    d, labels, _ = folders
    with pytest.raises(ValueError, match=r"idx/a.png has values \[3\] outside \[0, 3\).*merge="):
        LabelledImages.from_folder(d / "images", d / "idx", 3)
    merged = LabelledImages.from_folder(d / "images", d / "idx", 3, merge={3: 1, 2: 255})
    expected = torch.from_numpy(np.stack([labels["a"], labels["b"]]))
    expected = torch.where(expected == 3, 1, torch.where(expected == 2, 255, expected))
    assert torch.equal(merged.masks, expected)
    assert merge_classes(np.array([0, 5, 2]), {5: 1}).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="merge maps 1 -> 7"):
        LabelledImages.from_folder(d / "images", d / "idx", 3, merge={1: 7})


def test_resize_images_bilinear_and_masks_nearest(folders):
    d, labels, _ = folders
    half = LabelledImages.from_folder(d / "images", d / "idx", 4, size=(2, 3))
    assert half.images.shape == (2, 3, 2, 3) and half.images.abs().max() <= 1
    assert torch.equal(half.masks[0], torch.from_numpy(labels["a"][::2, ::2]))   # 2x2 blocks: nearest is exact
    assert LabelledImages.from_folder(d / "images", d / "idx", 4, size=8).masks.shape == (2, 8, 8)
    _save(d / "images", "c.png", np.zeros((5, 5, 3))); _save(d / "idx", "c.png", np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"images a and c have different sizes.*size=\(h, w\)"):
        LabelledImages.from_folder(d / "images", d / "idx", 4)
    assert LabelledImages.from_folder(d / "images", d / "idx", 4, size=4).images.shape == (3, 3, 4, 4)


def test_unpaired_files_are_an_error_or_a_warning(folders):
    d, _, _ = folders
    _save(d / "images", "lonely.png", np.zeros((4, 6, 3))); _save(d / "idx", "orphan.png", np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"2 file\(s\) have no partner.*lonely.png.*orphan.png.*strict=False"):
        LabelledImages.from_folder(d / "images", d / "idx", 4)
    with pytest.warns(UserWarning, match="lonely.png"):
        assert LabelledImages.from_folder(d / "images", d / "idx", 4, strict=False).names == ["a", "b"]


def test_bad_files_are_named(folders):
    d, _, _ = folders
    _save(d / "idx2", "a.png", np.zeros((3, 6))); _save(d / "idx2", "b.png", np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"mask .*idx2/a.png is 3x6 but its image .*a.png is 4x6"):
        LabelledImages.from_folder(d / "images", d / "idx2", 4)
    _save(d / "idx3", "a.jpg", np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"masks must be PNG.*idx3/a.jpg"):
        LabelledImages.from_folder(d / "images", d / "idx3", 4)
    (d / "idx4").mkdir(); (d / "idx4" / "a.png").write_bytes(b"not a png"); _save(d / "idx4", "b.png", np.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"cannot read .*idx4/a.png"):
        LabelledImages.from_folder(d / "images", d / "idx4", 4)
    with pytest.raises(FileNotFoundError, match="masks folder .*nowhere"):
        LabelledImages.from_folder(d / "images", d / "nowhere", 4)
    assert read_mask(d / "idx" / "a.png").dtype == np.int64


def _data():
    return torch.rand(3, 3, 8, 8) * 2 - 1, torch.randint(0, 4, (3, 8, 8))


def test_nan_and_inf_images_are_refused_naming_the_sample():
    x, y = _data()
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"sample 1 \(b\) has NaN or infinite"):
        LabelledImages(x, y, 4, names=list("abc"))
    x[1, 0, 2, 2] = 0; x[2, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"sample 2 has NaN or infinite.*indices \[2\]"): LabelledImages(x, y, 4)


def test_images_in_zero_one_warn_with_the_fix_unless_range_checked():
    x, y = _data()
    with pytest.warns(UserWarning, match=r"\[0, 1\].*images \* 2 - 1.*range_checked=True"):
        LabelledImages((x + 1) / 2, y, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LabelledImages((x + 1) / 2, y, 4, range_checked=True)
        LabelledImages((x[:1] + 1) / 2, y[:1], 4)                # a single image: no evidence either way
        mixed = (x + 1) / 2; mixed[0] = -0.5      # a [-1, 1] set whose images 1 and 2 happen to be non-negative
        LabelledImages(mixed, y, 4).subset([1, 2])


def test_channel_last_and_other_channel_counts_are_explained():
    x, y = _data()
    with pytest.raises(ValueError, match=r"channel-last \[N, H, W, 3\].*images.permute\(0, 3, 1, 2\)"):
        LabelledImages(x.permute(0, 2, 3, 1), y, 4)
    with pytest.raises(ValueError, match=r"images have 1 channels.*images.expand\(-1, 3, -1, -1\)"):
        LabelledImages(x[:, :1], y, 4)
    with pytest.raises(ValueError, match=r"images have 4 channels.*images\[:, :3\]"):
        LabelledImages(torch.cat([x, x[:, :1]], 1), y, 4)
    with pytest.raises(ValueError, match="2 class_names for n_classes=4"):
        LabelledImages(x, y, 4, class_names=["a", "b"])


def test_nan_and_inf_in_float_masks_are_refused_naming_the_sample():
    x, y = _data()
    masks = y.float()
    masks[2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"sample 2 \(c\) has NaN or infinite mask values \(1 such masks, indices "
                                         r"\[2\]\); masks hold class indices") as err:
        LabelledImages(x, masks, 4, names=list("abc"))
    assert "outside" not in str(err.value) and "-9223372036854775808" not in str(err.value)
    masks[2, 3, 3], masks[0, 0, 0] = 1, -float("inf")
    with pytest.raises(ValueError, match=r"sample 0 has NaN or infinite mask values"): LabelledImages(x, masks, 4)
    masks, expected = y.float(), y.clone()
    masks[0, 0, 0] = expected[0, 0, 0] = 255                       # whole-number float masks are read as indices
    assert torch.equal(LabelledImages(x, masks, 4).masks, expected)


def test_unlabelled_images_with_nan_are_refused_naming_the_image():
    from lagm_nb.datasets import check_images
    x, _ = _data()
    x[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"unlabelled: image 2 has NaN or infinite values \(1 such images\)"):
        check_images(x, "unlabelled")


def test_batch_source_classes_are_checked_on_the_first_batch():
    from lagm_nb.datasets import check_batch_source
    class Net(torch.nn.Module):
        def __init__(self, n): super().__init__(); self.n_classes = n
    x, y = _data()
    hard = lambda step: (x, y.clamp(max=2))                        # labels 0, 1, 2 (and 255 is ignored)
    assert check_batch_source(hard, annotator=Net(3), segmenter=Net(3)).startswith("first batch ")
    assert check_batch_source(hard, annotator=Net(4), segmenter=Net(4))      # hard labels: a lower bound only
    with pytest.raises(ValueError, match=r"first batch of the batch source has labels from 0 to 2 \(at least 3 "
                                         r"classes\), the annotator 2, the segmenter 2; build the networks"):
        check_batch_source(hard, annotator=Net(2), segmenter=Net(2))
    soft = lambda step: (x, torch.rand(3, 5, 8, 8).softmax(1))
    with pytest.raises(ValueError, match="soft labels of 5 channels, the annotator 3, the segmenter 3"):
        check_batch_source(soft, annotator=Net(3), segmenter=Net(3))
