"""The dataset loaders on fixtures written in each dataset's own on-disk format: merges (a pixel of every source class
lands in its target class), splits, resizing, errors naming the missing file and the layout, DatasetGAN's folds, and
the paper's configurations."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lagm_nb.datasets import LabelledImages
from lagm_nb.loaders import (CAR20_CLASSES, CELEBA8_CLASSES, CELEBA8_MERGE, CELEBAMASK_PARTS, CGPART_CAR_CLASSES,
                             CGPART_CAR_MERGE, CGPART_CAR_PARTS, DATASETGAN, LOADERS, PAPER_CONFIGS, PASCAL_MERGES,
                             box_iou, celebamask_hq, celebamask_ids, cgpart_car, datasetgan,
                             datasetgan_cross_validation, kept_objects, paper_config, pascal_part, target_of)
from lagm_nb.metrics import cross_validation_miou
from lagm_nb.stylegan2 import Generator

# the fixtures hold a few Pascal-Part patches, not Appendix A's counts: that warning is checked in its own test
pytestmark = pytest.mark.filterwarnings("ignore::lagm_nb.loaders.SplitSizeWarning")

RNG = np.random.default_rng(0)


def _photo(path, h, w=None, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (h, w or h, 3), dtype=np.uint8) if value is None else np.full((h, w or h, 3), value,
                                                                                                 np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


# ---------------------------------------------------------------------------------------------------- CelebAMask-HQ
def _celebamask(root, ids, photo=16, mask=8, paint=None):
    """CelebA-HQ-img/{id}.jpg and CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png; `paint(part)` gives the
    part's mask (default: the part's own pixel). Even parts are grey PNGs (0/255), odd ones RGB (white), the nose
    (7, 0, 0): a part is where the first channel is not 0."""
    paint = paint or (lambda k: np.isin(np.arange(mask * mask), [k]).reshape(mask, mask))
    for i in ids:
        _photo(root / "CelebA-HQ-img" / f"{i}.jpg", photo)
        folder = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(CELEBAMASK_PARTS):
            on = paint(k)
            if on is None: continue                                    # the face lacks the part: no file
            pixels = on.astype(np.uint8) * (7 if part == "nose" else 255)
            rgb = np.stack([pixels] + [pixels * (part != "nose")] * 2, -1)
            Image.fromarray(pixels if k % 2 == 0 else rgb).save(folder / f"{i:05d}_{part}.png")


def test_celebamask_merges_every_part_into_table_a1(tmp_path):
    _celebamask(tmp_path, [29_999])
    data = celebamask_hq(tmp_path, "test", size=8, ids=[29_999])
    hand = {"skin": "skin", "nose": "nose", "eye_g": "skin", "l_eye": "eye", "r_eye": "eye", "l_brow": "eyebrow",
            "r_brow": "eyebrow", "l_ear": "ear", "r_ear": "ear", "mouth": "mouth", "u_lip": "mouth", "l_lip": "mouth",
            "hair": "hair", "hat": "background", "ear_r": "background", "neck_l": "background", "neck": "background",
            "cloth": "background"}
    got = data.masks[0].flatten()
    assert [CELEBA8_CLASSES[got[k]] for k in range(18)] == [hand[p] for p in CELEBAMASK_PARTS]
    assert (got[18:] == 0).all()
    assert data.class_names == ["background", "ear", "eye", "eyebrow", "skin", "hair", "mouth", "nose"]
    assert data.names == ["29999"] and data.images.min() >= -1 and data.images.max() <= 1


def test_celebamask_paints_later_parts_over_earlier_ones(tmp_path):
    # skin everywhere, hair over the left half, a hat over the top row, eyeglasses over one skin pixel
    def paint(k):
        m = np.zeros((8, 8), bool)
        part = CELEBAMASK_PARTS[k]
        if part == "skin": m[:] = True
        elif part == "hair": m[:, :4] = True
        elif part == "hat": m[0] = True
        elif part == "eye_g": m[5, 6] = True
        else: return None
        return m
    _celebamask(tmp_path, [28_000], paint=paint)
    mask = celebamask_hq(tmp_path, "train", size=8, n_images=1).masks[0]
    hair, skin = CELEBA8_CLASSES.index("hair"), CELEBA8_CLASSES.index("skin")
    assert (mask[0] == 0).all() and (mask[1:, :4] == hair).all() and (mask[1:, 4:] == skin).all()


def test_celebamask_splits_follow_table_a1(tmp_path):
    assert celebamask_ids("unlabelled") == list(range(28_000))
    assert celebamask_ids("val") == list(range(27_500, 28_000))
    assert celebamask_ids("train") == list(range(28_000, 29_500))
    assert celebamask_ids("test") == list(range(29_500, 30_000))
    assert celebamask_ids("train", 30) == list(range(28_000, 28_030))     # "Training set (30)": ids 28,001-28,030
    _celebamask(tmp_path, [0, 27_999, 28_000, 28_001, 29_499, 29_500])
    assert celebamask_hq(tmp_path, "train", size=4, n_images=2).names == ["28000", "28001"]
    assert celebamask_hq(tmp_path, "train", size=4, ids=[29_499]).names == ["29499"]
    assert celebamask_hq(tmp_path, "unlabelled", size=4, n_images=1).names == ["0"]
    assert celebamask_hq(tmp_path, "val", size=4, ids=[27_999]).names == ["27999"]
    assert celebamask_hq(tmp_path, "unlabelled", size=4, ids=[27_999]).names == ["27999"]   # val lies inside
    assert celebamask_hq(tmp_path, "test", size=4, n_images=1).names == ["29500"]
    for split, ids in [("test", [29_499]), ("train", [27_999]), ("val", [28_000]), ("unlabelled", [28_000])]:
        with pytest.raises(ValueError, match=f"not in the {split} split"): celebamask_hq(tmp_path, split, ids=ids)
    with pytest.raises(ValueError, match="splits"): celebamask_ids("labelled")


def test_celebamask_resizes_photos_and_masks_to_one_size(tmp_path):
    # 2x2 blocks of one part each in the 8-px masks: nearest resizing to 4 px keeps one pixel per block
    blocks = np.arange(64).reshape(8, 8) // 8 // 2 * 4 + np.arange(64).reshape(8, 8) % 8 // 2
    _celebamask(tmp_path, [29_500], photo=16, paint=lambda k: (blocks == k) if k < 16 else None)
    small = celebamask_hq(tmp_path, "test", size=4, n_images=1)
    merge = [CELEBA8_CLASSES.index(target_of(p, CELEBA8_MERGE)) for p in CELEBAMASK_PARTS]
    assert small.images.shape == (1, 3, 4, 4) and small.masks.shape == (1, 4, 4)
    assert small.masks[0].flatten().tolist() == [merge[k] for k in range(16)]
    wide = celebamask_hq(tmp_path, "test", size=(6, 12), n_images=1)
    assert wide.images.shape == (1, 3, 6, 12) and wide.masks.shape == (1, 6, 12)
    native = celebamask_hq(tmp_path, "test", size=None, n_images=1)    # the photos' 16 px; masks follow
    assert native.images.shape == (1, 3, 16, 16) and torch.equal(native.masks[0][::4, ::4], small.masks[0])


def test_celebamask_errors_name_the_missing_folder_or_file_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)image folder .*CelebA-HQ-img does not exist.*"
                                                r"CelebAMask-HQ-mask-anno/\{id // 2000\}/\{id:05d\}_\{part\}.png"):
        celebamask_hq(tmp_path, "test")
    _celebamask(tmp_path, [29_500])
    (tmp_path / "CelebA-HQ-img" / "29501.jpg").write_bytes((tmp_path / "CelebA-HQ-img" / "29500.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"(?s)image 29501 has no part mask .*14/29501_<part>.png.*layout"):
        celebamask_hq(tmp_path, "test", n_images=2)
    with pytest.raises(FileNotFoundError, match=r"(?s)image 29502 .*29502.jpg does not exist.*CelebA-HQ-img/\{id\}"):
        celebamask_hq(tmp_path, "test", ids=[29_500, 29_502])


# ------------------------------------------------------------------------------------------- DatasetGAN's release
def _datasetgan(root, dataset="car-20", n_train=3, n_test=12, side=8, test_ext=".png"):
    """annotation/{training,testing}_data/...: image_{i}.jpg (train) or .png (test), with image_mask{i}.npy. Test
    image i is a flat grey 10 * i and its labels are all i % C, so that a mispairing shows."""
    train_dir, test_dir = DATASETGAN[dataset]["folders"]
    n_classes = len(DATASETGAN[dataset]["classes"])
    for folder, n, ext in ((root / "annotation" / "training_data" / train_dir, n_train, ".jpg"),
                           (root / "annotation" / "testing_data" / test_dir, n_test, test_ext)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _photo(folder / f"image_{i}{ext}", side, value=10 * i)
            labels = np.full((side, side), i % n_classes, np.uint8)
            labels[0, 0] = (i + 1) % n_classes
            other = (labels + 3) % n_classes                       # [H, W, 3] arrays: DatasetGAN reads channel 0
            np.save(folder / f"image_mask{i}.npy", np.stack([labels, other, other], -1) if i == 1 else labels)
    return root / "annotation" / "testing_data" / test_dir


def test_datasetgan_test_images_are_sorted_as_strings_and_paired(tmp_path):
    _datasetgan(tmp_path, n_test=12)
    test = datasetgan(tmp_path, "car-20", "test", size=8)
    assert test.names == ["image_0", "image_1", "image_10", "image_11"] + [f"image_{i}" for i in range(2, 10)]
    for k, name in enumerate(test.names):
        i = int(name.split("_")[1])
        assert test.masks[k][1, 1] == i % 20 and test.masks[k][0, 0] == (i + 1) % 20            # its own labels
        assert abs((test.images[k].mean().item() + 1) * 127.5 - 10 * i) < 1                   # its own image
    assert test.n_classes == 20 and test.class_names == CAR20_CLASSES


def test_datasetgan_cross_validation_reproduces_the_string_sorted_folds(tmp_path):
    _datasetgan(tmp_path, n_test=12)
    test = datasetgan(tmp_path, "car-20", "test", size=8)
    by_string = sorted(f"image_{i}" for i in range(12))
    folds = [by_string[2 * f:2 * f + 2] for f in range(5)]            # floor(12 / 5) = 2; image_8, image_9 left over
    assert folds[1] == ["image_10", "image_11"] and folds[2] == ["image_2", "image_3"]

    class RightOn(nn.Module):
        "Exact on the images named in `right`, wrong (label + 1) elsewhere."
        def __init__(self, right):
            super().__init__(); self.right, self.w = right, nn.Parameter(torch.zeros(1))
        def forward(self, x):
            k = next(k for k in range(len(test)) if torch.equal(test.images[k], x[0]))
            truth = test.masks[k] if test.names[k] in self.right else (test.masks[k] + 1) % 20
            return F.one_hot(truth, 20).permute(2, 0, 1)[None].float()

    result = datasetgan_cross_validation({f"ck{f}": RightOn(fold) for f, fold in enumerate(folds)}, test)
    assert result["picked"] == ["ck0", "ck1", "ck2", "ck3", "ck4"]
    assert result["fold_miou"] == [0.0] * 5                            # each is wrong on its fold's test images
    numeric = [[f"image_{i}" for i in range(2 * f, 2 * f + 2)] for f in range(5)]   # what a numeric sort would give
    wrong = datasetgan_cross_validation({f"ck{f}": RightOn(fold) for f, fold in enumerate(numeric)}, test)
    assert wrong["picked"] != ["ck0", "ck1", "ck2", "ck3", "ck4"]
    # the loaded names reproduce the folds whatever order the per-image matrices are given in
    shuffled = [test.names[k] for k in torch.randperm(len(test), generator=torch.Generator().manual_seed(0))]
    eye = {n: torch.eye(20, dtype=torch.long) for n in shuffled}
    per_image = {f"ck{f}": torch.stack([eye[n] * (n in fold) for n in shuffled]) for f, fold in enumerate(folds)}
    assert cross_validation_miou(shuffled, per_image)["picked"] == ["ck0", "ck1", "ck2", "ck3", "ck4"]


def test_datasetgan_training_images_are_the_first_n_by_number(tmp_path):
    _datasetgan(tmp_path, "face-34", n_train=12, side=6)
    train = datasetgan(tmp_path, "face-34", "train", size=4, n_images=11)
    assert train.names == [f"image_{i}" for i in range(11)] and train.images.shape == (11, 3, 4, 4)
    assert [int(m[1, 1]) for m in train.masks] == list(range(11)) and train.n_classes == 34
    assert datasetgan(tmp_path, "face-34", "test", n_images=None).images.shape[-2:] == (512, 512)   # DatasetGAN's res
    with pytest.raises(FileNotFoundError, match=r"(?s)image .*face_processed/image_12.jpg does not exist.*layout"):
        datasetgan(tmp_path, "face-34", "train", n_images=13)
    (tmp_path / "annotation" / "training_data" / "face_processed" / "image_mask3.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"label array .*image_mask3.npy does not exist"):
        datasetgan(tmp_path, "face-34", "train", n_images=4)


def test_datasetgan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)test folder .*testing_data/cat_16_class does not exist.*"
                                                r"dataset_release"):
        datasetgan(tmp_path, "cat-16", "test")
    with pytest.raises(FileNotFoundError, match=r"(?s)train folder .*training_data/car_processed does not exist"):
        datasetgan(tmp_path, "car-20", "train")
    with pytest.raises(ValueError, match="unknown DatasetGAN dataset 'horse-6'"): datasetgan(tmp_path, "horse-6")
    folder = _datasetgan(tmp_path, "cat-16", n_test=5)
    (folder / "image_mask4.npy").unlink()
    with pytest.raises(ValueError, match="5 images and 4 label arrays"): datasetgan(tmp_path, "cat-16", "test")
    (folder / "image_4.png").rename(folder / "image_9.png"); np.save(folder / "image_mask4.npy", np.zeros((8, 8)))
    with pytest.raises(ValueError, match="image image_9.png is paired with image_mask4.npy"):
        datasetgan(tmp_path, "cat-16", "test")
    np.save(folder / "image_mask9.npy", np.full((8, 8), 16)); (folder / "image_mask4.npy").unlink()
    with pytest.raises(ValueError, match=r"image_mask9.npy has labels \[16\] outside \[0, 16\)"):
        datasetgan(tmp_path, "cat-16", "test")


# --------------------------------------------------------------------------------------------------- Pascal-Part
def _struct(rows, fields):
    out = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, row in enumerate(rows): out[0, k] = row
    return out


def _voc(root, photos, category="horse", shape=(80, 100)):
    """VOCdevkit/VOC2010 with JPEGImages/{id}.jpg, ImageSets/Main/{category}_{train,val}.txt and Pascal-Part's
    Annotations_Part/{id}.mat (struct anno: imname, objects(class, class_ind, mask, parts(part_name, mask))).
    photos: {id: (VOC split, [(class, box, [(part, box)])] or None)}; every mask is a filled box (x0, y0, x1, y1)."""
    import scipy.io

    def filled(box):
        m = np.zeros(shape, np.uint8); m[box[1]:box[3], box[0]:box[2]] = 1
        return m
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val"):
        lines = [f"{i} {' 1' if objects else '-1'}" for i, (s, objects) in photos.items() if s == split]
        (root / "ImageSets" / "Main" / f"{category}_{split}.txt").write_text("\n".join(lines) + "\n")
    for image_id, (_, objects) in photos.items():
        _photo(root / "JPEGImages" / f"{image_id}.jpg", *shape)
        if not objects: continue
        rows = [(cls, np.array([[1]]), filled(box),
                 _struct([(p, filled(b)) for p, b in parts], ["part_name", "mask"]) if parts else np.zeros((0, 0)))
                for cls, box, parts in objects]
        anno = _struct([(image_id, _struct(rows, ["class", "class_ind", "mask", "parts"]))], ["imname", "objects"])
        (root / "Annotations_Part").mkdir(exist_ok=True)
        scipy.io.savemat(root / "Annotations_Part" / f"{image_id}.mat", {"anno": anno})


HORSE = [("head", (10, 20, 18, 26)), ("leye", (18, 20, 20, 22)), ("reye", (18, 22, 20, 24)), ("lear", (18, 24, 20, 26)),
         ("rear", (18, 26, 20, 28)), ("muzzle", (10, 26, 14, 30)), ("torso", (20, 30, 50, 44)),
         ("neck", (14, 26, 18, 34)), ("tail", (45, 20, 50, 25))] + \
        [(leg, (20 + 2 * k, 44, 22 + 2 * k, 60)) for k, leg in enumerate(
            ["lfho", "rfho", "lbho", "rbho", "lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg",
             "rblleg"])]
PHOTOS = {
    "2008_000001": ("train", [("horse", (10, 20, 50, 60), HORSE), ("person", (20, 5, 45, 40), []),
                              ("horse", (80, 60, 90, 70), [("torso", (80, 60, 90, 70))])]),
    "2008_000002": ("train", [("horse", (0, 50, 40, 80), []), ("horse", (10, 50, 50, 80), []),
                              ("horse", (50, 0, 90, 35), [("torso", (50, 0, 90, 35))])]),
    "2008_000003": ("val", [("horse", (30, 10, 70, 50), [("tail", (30, 10, 70, 50))])]),
    "2008_000004": ("val", None)}


def test_pascal_horse_merges_every_part_of_table_a2(tmp_path):
    _voc(tmp_path, PHOTOS)
    train = pascal_part(tmp_path, "horse", "train", size=40, n_train=1)
    classes = ["background", "head", "torso", "legs", "neck", "tail"]
    hand = {"head": "head", "leye": "head", "reye": "head", "lear": "head", "rear": "head", "muzzle": "head",
            "torso": "torso", "neck": "neck", "tail": "tail"}
    assert train.names == ["2008_000001_0"] and train.class_names == classes
    crop = train.masks[0]          # a square 40-px box: the patch is the box itself (offset x 10, y 20), not resized
    for part, (x0, y0, x1, y1) in HORSE:
        assert classes[crop[y1 - 1 - 20, x1 - 1 - 10]] == hand.get(part, "legs"), part
    assert crop[57 - 20, 45 - 10] == 255                   # the horse's pixels outside its parts are ignored
    assert train.ignore_index == 255


def test_pascal_aeroplane_merges_numbered_engines_and_wheels(tmp_path):
    parts = [("body", (10, 10, 20, 20)), ("stern", (20, 10, 25, 20)), ("tail", (25, 10, 30, 20)),
             ("lwing", (30, 10, 35, 20)), ("rwing", (35, 10, 40, 20)), ("engine_1", (40, 10, 45, 20)),
             ("engine_12", (45, 10, 50, 20)), ("wheel_1", (50, 10, 55, 20)), ("wheel_3", (55, 10, 60, 20))]
    _voc(tmp_path, {"2009_000001": ("val", [("aeroplane", (10, 0, 60, 50), parts)])}, "aeroplane")
    test = pascal_part(tmp_path, "aeroplane", "test", size=50)
    assert test.class_names == ["background", "body", "stern", "wing", "engine", "wheel"]
    expected = ["body", "stern", "stern", "wing", "wing", "engine", "engine", "wheel", "wheel"]
    assert [test.class_names[test.masks[0][15, x0 - 10]] for _, (x0, *_) in parts] == expected
    assert PASCAL_MERGES["aeroplane"]["engine"] == [r"engine_\d+"]


def test_pascal_patches_are_filtered_cropped_square_padded_and_split(tmp_path):
    _voc(tmp_path, PHOTOS)
    assert pascal_part(tmp_path, "horse", "train", size=40).names == ["2008_000001_0", "2008_000002_2"]
    assert pascal_part(tmp_path, "horse", "train", size=40, n_train=1).names == ["2008_000001_0"]
    val = pascal_part(tmp_path, "horse", "val", size=40, n_train=1)
    assert val.names == ["2008_000002_2"]       # 2008_000002's overlapping horses (IoU 0.6) are both dropped
    # a 40 x 35 box at the top edge: its square reaches 3 rows above the photo, padded with zeros
    assert (val.masks[0][:3] == 0).all() and (val.images[0][:, :3] == -1).all()
    assert (val.masks[0][3:38] == 2).all() and (val.masks[0][38:] == 0).all()
    assert pascal_part(tmp_path, "horse", "test", size=40).names == ["2008_000003_0"]    # VOC val; 2008_000004 unread
    assert pascal_part(tmp_path, "horse", "train", size=40, overlap="any").names == ["2008_000002_2"]   # the rider
    assert pascal_part(tmp_path, "horse", "train", size=40, min_side=10).names == ["2008_000001_0", "2008_000001_2",
                                                                                    "2008_000002_2"]
    small = pascal_part(tmp_path, "horse", "test", size=20)
    assert small.images.shape == (1, 3, 20, 20) and (small.masks[0] == 5).all()
    assert pascal_part(tmp_path, "horse", "test").images.shape[-2:] == (256, 256)     # the paper's 256 px


def test_box_rules():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0
    def obj(cls, box):
        m = np.zeros((200, 200), bool); m[box[1]:box[3], box[0]:box[2]] = True
        return {"class": cls, "mask": m, "parts": []}
    # 32 px is enough, 31 is not; IoU 0.05 exactly is kept, more is not
    objects = [obj("horse", (0, 0, 32, 40)), obj("horse", (100, 100, 131, 140)), obj("horse", (150, 0, 170, 100)),
               obj("horse", (169, 0, 189, 100))]
    assert kept_objects(objects, "horse", 32) == [0]
    assert kept_objects(objects, "horse", 20) == [0, 1, 2, 3]             # IoU 100 / 3900 < 0.05
    assert kept_objects(objects, "horse", 20, max_iou=0.02) == [0, 1]
    at_limit = [obj("horse", (0, 0, 105, 10)), obj("horse", (95, 0, 200, 10))]       # IoU 100 / 2000 = 0.05
    assert box_iou((0, 0, 105, 10), (95, 0, 200, 10)) == 0.05 and kept_objects(at_limit, "horse", 10) == [0, 1]
    assert kept_objects([obj("horse", (0, 0, 105, 10)), obj("horse", (94, 0, 199, 10))], "horse", 10) == []
    ridden = [obj("horse", (0, 0, 50, 50)), obj("person", (10, 10, 60, 60))]
    assert kept_objects(ridden, "horse", 32) == [0] and kept_objects(ridden, "horse", 32, overlap="any") == []


def test_pascal_split_of_another_size_than_the_papers_warns(tmp_path):
    import warnings
    from lagm_nb.loaders import PASCAL_SPLIT_SIZES, SplitSizeWarning, check_split_size
    _voc(tmp_path, PHOTOS)
    with pytest.warns(SplitSizeWarning, match="Pascal-Part horse train: 2 patches, where Appendix A has 180"):
        assert len(pascal_part(tmp_path, "horse", "train", size=16)) == 2
    with pytest.warns(SplitSizeWarning, match="horse val: 1 patches, where Appendix A has 33"):
        pascal_part(tmp_path, "horse", "val", size=16, n_train=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for category, sizes in PASCAL_SPLIT_SIZES.items():
            for split, n in sizes.items(): check_split_size(n, category, split)      # the paper's sizes: silent
    with pytest.warns(SplitSizeWarning, match="aeroplane test: 265 patches, where Appendix A has 266"):
        check_split_size(265, "aeroplane", "test")


def test_pascal_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"(?s)VOC 2010 folder .* does not exist.*JPEGImages/\{id\}.jpg"):
        pascal_part(tmp_path / "VOC2010", "horse")
    _voc(tmp_path, {"2008_000001": PHOTOS["2008_000001"]})
    with pytest.raises(FileNotFoundError, match=r"(?s)class list .*ImageSets/Main/aeroplane_train.txt does not"):
        pascal_part(tmp_path, "aeroplane")
    with pytest.raises(ValueError, match="category must be in"): pascal_part(tmp_path, "cow")
    (tmp_path / "JPEGImages" / "2008_000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)photo .*JPEGImages/2008_000001.jpg does not exist.*layout"):
        pascal_part(tmp_path, "horse")
    (tmp_path / "ImageSets" / "Main" / "horse_val.txt").write_text("2008_000009  1\n")
    with pytest.raises(FileNotFoundError, match=r"Pascal-Part file .*Annotations_Part/2008_000009.mat does not exist"):
        pascal_part(tmp_path, "horse", "test")
    monkeypatch.setitem(sys.modules, "scipy", None); monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match=r"pip install lagm_nb\[pascal\]"): pascal_part(tmp_path, "horse")


def test_pascal_unknown_part_is_an_error(tmp_path):
    _voc(tmp_path, {"2008_000001": ("train", [("horse", (10, 20, 50, 60), [("saddle", (20, 20, 30, 30))])])})
    with pytest.raises(ValueError, match=r"2008_000001.mat: part 'saddle' of a horse is in no class of Table A.2"):
        pascal_part(tmp_path, "horse")


# ------------------------------------------------------------------------------------------------------- CGPart
def _cgpart(root, n_train=6, n_val=2, shape=(12, 16)):
    """file_list_{train,val}.txt with lines '<image> <mask>' (relative paths); masks index PNGs 0..31, render k's
    pixel j holding part (j + k) % 32, so that every render differs."""
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for k in range(n):
            model = f"{k % 2:032x}"
            name = f"{model}_a{k * 30:03d}_e010_t000_d300"
            _photo(root / "image" / model / f"{name}.png", *shape)
            parts = np.zeros(shape, np.uint8)
            parts.flat[:32] = (np.arange(32) + k) % 32
            (root / "seg" / model).mkdir(parents=True, exist_ok=True)
            Image.fromarray(parts).save(root / "seg" / model / f"{split}{k}.png")
            lines.append(f"image/{model}/{name}.png seg/{model}/{split}{k}.png")
        (root / f"file_list_{split}.txt").write_text("\n".join(lines) + "\n")


def test_cgpart_merges_every_part_into_table_a3(tmp_path):
    _cgpart(tmp_path)
    train = cgpart_car(tmp_path, "train")
    hand = {"left_frame": "car_body", "right_frame": "car_body", "hood": "hood", "roof": "roof", "trunk": "trunck",
            "back_bumper": "back_bumper", "front_bumper": "front_bumper", "back_windshield": "windshield",
            "front_windshield": "windshield", "back_license_plate": "licence_plate",
            "front_license_plate": "licence_plate"}
    for part in CGPART_CAR_PARTS:
        if part in hand: continue
        hand[part] = next(t for t in ("door", "wheel", "head_light", "tail_light", "mirror", "window")
                          if part.endswith(t))
    names = ["background"] + CGPART_CAR_PARTS
    merged = [train.class_names[c] for c in train.masks[0].flatten()[:32]]
    assert merged == ["background"] + [hand[p] for p in names[1:]]
    assert train.n_classes == 15 == len(CGPART_CAR_CLASSES) and train.images.shape == (6, 3, 12, 16)
    assert set(sum(CGPART_CAR_MERGE.values(), [])) == set(names)


def test_cgpart_splits_sampling_and_resizing(tmp_path):
    _cgpart(tmp_path)
    everything = cgpart_car(tmp_path, "train").names
    some = cgpart_car(tmp_path, "train", n_images=3, seed=1)
    assert len(some) == 3 and some.names == [n for n in everything if n in some.names]    # list order, no repeats
    assert cgpart_car(tmp_path, "train", n_images=3, seed=1).names == some.names
    assert any(cgpart_car(tmp_path, "train", n_images=3, seed=s).names != some.names for s in range(2, 6))
    test = cgpart_car(tmp_path, "test", size=8)
    assert test.names == [f"image/{k % 2:032x}/{k % 2:032x}_a{k * 30:03d}_e010_t000_d300" for k in range(2)]
    assert test.images.shape == (2, 3, 8, 8) and test.masks.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="n_images=7 but"): cgpart_car(tmp_path, "train", n_images=7)
    with pytest.raises(ValueError, match="splits"): cgpart_car(tmp_path, "val")


def test_cgpart_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)file list .*file_list_train.txt does not exist.*<mask path>"):
        cgpart_car(tmp_path)
    _cgpart(tmp_path)
    (tmp_path / "file_list_val.txt").write_text("image/a.png seg/a.png\njust_one_path.png\n")
    with pytest.raises(ValueError, match=r"file_list_val.txt, line 2: expected '<image path> <mask path>'"):
        cgpart_car(tmp_path, "test")
    (tmp_path / "file_list_val.txt").write_text("image/a.png seg/a.png\n")
    with pytest.raises(FileNotFoundError, match=r"render .*image/a.png does not exist"): cgpart_car(tmp_path, "test")
    Image.fromarray(np.full((12, 16), 40, np.uint8)).save(tmp_path / "seg" / "bad.png")
    first = (tmp_path / "file_list_train.txt").read_text().split()[0]
    (tmp_path / "file_list_val.txt").write_text(f"{first} seg/bad.png\n")
    with pytest.raises(ValueError, match="bad.png has the value 40; CGPart car masks hold 0 to 31"):
        cgpart_car(tmp_path, "test")


# ------------------------------------------------------------------------------------------- the paper's configs
def test_paper_configs_name_known_loaders_and_appendix_b_settings():
    assert set(PAPER_CONFIGS) >= {"celebamask-hq", "pascal-horse", "pascal-aeroplane", "face-34", "cat-16", "car-20",
                                  "cgpart-car"}
    for cfg in PAPER_CONFIGS.values():
        assert cfg.loader in LOADERS and cfg.truncation_psi == 0.7
        r = cfg.recipe
        assert (r.steps, r.batch_size, r.labelled_batch_size, r.segmenter_every) == (150_000, 2, 2, 1)
        assert (r.annotator_optimizer, r.annotator_lr, r.annotator_momentum) == ("sgd", 1e-3, 0.9)
        assert (r.segmenter_lr, r.segmenter_momentum, r.segmenter_state) == (1e-3, 0.9, "learned")
        assert cfg.segmenter == "deeplabv3_resnet101" and r.match == "head"
        unet = paper_config(cfg.name, "unet")
        assert unet.recipe.match == "all" and unet.segmenter == "unet" and unet.recipe.steps == 150_000
        assert (cfg.layers == r"synthesis\.b\d+") == cfg.generator.startswith("StyleGAN2")
    resolutions = {n: c.resolution for n, c in PAPER_CONFIGS.items()}
    assert resolutions["celebamask-hq"] == 256 and resolutions["face-34"] == 512 and resolutions["cat-16"] == 256
    assert resolutions["car-20"] == 512 and resolutions["pascal-horse"] == resolutions["pascal-aeroplane"] == 256
    assert [len(PAPER_CONFIGS[n].class_names) for n in ("celebamask-hq", "pascal-horse", "face-34", "cat-16",
                                                         "car-20", "cgpart-car")] == [8, 6, 34, 16, 20, 15]
    assert PAPER_CONFIGS["pascal-horse"].truncation_cutoff == 7 and PAPER_CONFIGS["car-20"].truncation_cutoff == 8
    with pytest.raises(ValueError, match="unknown paper configuration 'ffhq'"): paper_config("ffhq")
    with pytest.raises(ValueError, match="segmenter must be in"): paper_config("car-20", "segformer")
    import dataclasses
    with pytest.raises(ValueError, match="unknown loader 'coco'"): dataclasses.replace(PAPER_CONFIGS["car-20"],
                                                                                      loader="coco")


def test_paper_configs_load_their_datasets(tmp_path):
    _celebamask(tmp_path / "celeba", [29_500])
    data = paper_config("celebamask-hq").load(tmp_path / "celeba", "test", n_images=1)
    assert isinstance(data, LabelledImages) and data.images.shape == (1, 3, 256, 256)
    assert data.class_names == list(paper_config("celebamask-hq").class_names)
    _voc(tmp_path / "voc", PHOTOS)
    horse = paper_config("pascal-horse").load(tmp_path / "voc", "test")
    assert horse.images.shape == (1, 3, 256, 256)
    assert horse.class_names == list(paper_config("pascal-horse").class_names)
    _datasetgan(tmp_path / "dg", "cat-16", n_test=5)
    cats = paper_config("cat-16").load(tmp_path / "dg", "test")
    assert cats.images.shape == (5, 3, 256, 256) and cats.n_classes == 16
    _cgpart(tmp_path / "cg")
    assert paper_config("cgpart-car").load(tmp_path / "cg", "train", n_images=2).images.shape == (2, 3, 512, 512)
    assert len(paper_config("cgpart-car").load(tmp_path / "cg", "test")) == 2


def test_paper_config_hooks_every_synthesis_block_with_truncation():
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=256, channel_max=16))
    H = paper_config("car-20").hook(G)
    assert H.layers == ["synthesis.b4", "synthesis.b8", "synthesis.b16", "synthesis.b32"]
    assert H.truncation_psi == 0.7 and H.truncation_cutoff == 8
    with pytest.raises(ValueError, match="layer names depend on its port"): paper_config("car-20-stylegan").hook(G)
