import pytest
import torch

from lagm_nb.metrics import (confusion_matrix, cross_validation_miou, evaluate_segmenter, fg_miou, iou_per_class,
                             miou)


def test_absent_class_scores_zero_and_counts():
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 3)
    assert iou_per_class(cm).tolist() == [1.0, 1.0, 0.0]
    assert miou(cm) == pytest.approx(2 / 3) and fg_miou(cm) == pytest.approx(0.5)


def test_ignored_pixels_do_not_count():
    cm = confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 255, 255]), 3)
    assert cm.sum() == 1


def test_negative_labels_raise():
    with pytest.raises(ValueError, match="found"):
        confusion_matrix(torch.tensor([0]), torch.tensor([-1]), 2)


def test_cross_validation_needs_five_images():
    with pytest.raises(ValueError, match="cannot be split"):
        cross_validation_miou(["a", "b"], {"c": torch.zeros(2, 2, 2, dtype=torch.long)})


def test_cross_validation_ties_go_to_earlier_checkpoint():
    cm = torch.stack([torch.tensor([[1, 0], [0, 1]])] * 10)
    r = cross_validation_miou([f"i{k}" for k in range(10)], {"ck_a": cm, "ck_b": cm.clone()})
    assert r["picked"] == ["ck_a"] * 5 and r["miou"] == pytest.approx(100) and r["std"] == 0


def test_authors_rule_ignores_every_label_at_or_above_n_classes():
    pred, target = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 3, 7, 255, 2])
    with pytest.raises(ValueError, match=r"found \[3, 7\]"):
        confusion_matrix(pred, target, 3)                        # our default: only 255 may be ignored
    cm = confusion_matrix(pred, target, 3, ignore_index=None)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"found \[-2\]"):
        confusion_matrix(pred, torch.tensor([0, 1, 3, 7, 255, -2]), 3, ignore_index=None)
    with pytest.raises(ValueError, match="prediction"):          # predictions are never ignored
        confusion_matrix(torch.tensor([5, 1]), torch.tensor([0, 1]), 3, ignore_index=None)


def test_evaluate_segmenter_with_the_authors_rule():
    class Zeros(torch.nn.Module):
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, x): return torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)
    masks = torch.tensor([[[0, 1], [4, 9]]])
    with pytest.raises(ValueError, match=r"found \[4, 9\]"):
        evaluate_segmenter(Zeros(), torch.zeros(1, 3, 2, 2), masks, 2)
    cm = evaluate_segmenter(Zeros(), torch.zeros(1, 3, 2, 2), masks, 2, ignore_index=None)
    assert cm.tolist() == [[1, 0], [1, 0]]


def test_cross_validation_fold_scoring_zero_everywhere_picks_nothing():
    good, bad = torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0, 1], [1, 0]])
    names = [f"i{k}" for k in range(10)]                       # folds of 2 images, in name order
    ck = torch.stack([good] * 4 + [bad] * 6)                   # right on folds 0-1, wrong (mIoU 0) on folds 2-4
    r = cross_validation_miou(names, {"ck": ck})
    assert r["picked"] == ["ck", "ck", None, None, None]
    assert r["fold_miou"][2:] == [0.0, 0.0, 0.0] and r["fold_miou"][0] == pytest.approx(miou(ck[2:].sum(0)))
    assert r["miou"] == pytest.approx(100 * sum(r["fold_miou"]) / 5)
