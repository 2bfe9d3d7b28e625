import pytest
import torch

from lagm_nb.metrics import confusion_matrix, cross_validation_miou, fg_miou, iou_per_class, miou


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
