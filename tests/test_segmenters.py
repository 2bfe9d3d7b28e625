"""Tests for lagm_nb.segmenters: torchvision state-dict compatibility of DeepLabV3 and the U-Net interface.

The fixture tests/fixtures/torchvision_deeplabv3_keys.json was dumped with torchvision 0.29.1 from
deeplabv3_resnet50/101(weights=None, weights_backbone=None, num_classes=21, aux_loss=False).state_dict().
"""
import json
from pathlib import Path

import pytest
import torch

from lagm_nb.segmenters import DeepLabV3, UNet, build_segmenter

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_deeplabv3_keys.json"


@pytest.fixture(scope="module")
def tv_keys():
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_deeplabv3_state_dict_matches_torchvision(tv_keys, backbone):
    model = DeepLabV3(21, backbone=backbone)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = tv_keys[backbone]
    assert set(ours) == set(theirs), f"only ours: {sorted(set(ours) - set(theirs))[:5]}, only torchvision: {sorted(set(theirs) - set(ours))[:5]}"
    bad = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not bad, bad
    assert sum(p.numel() for p in model.parameters()) == tv_keys["param_counts"][backbone]


def test_deeplabv3_forward_and_groups():
    model = DeepLabV3(4)
    assert model(torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, 4, 64, 64)
    names = [n for n, _ in model.named_parameters()]
    groups = model.param_groups()
    assert groups["all"] == names
    assert all(set(g) <= set(names) for g in groups.values())
    assert groups["head"] == groups["classifier"] and groups["res1"] == groups["backbone.conv1"]
    assert sorted(sum((groups[f"res{i}"] for i in range(1, 6)), []) + groups["head"]) == sorted(names)


def test_deeplabv3_drops_aux_classifier():
    model = DeepLabV3(3)
    sd = {**DeepLabV3(3).state_dict(), "aux_classifier.4.weight": torch.zeros(3, 10, 1, 1)}
    with pytest.warns(UserWarning, match="aux_classifier"):
        model.load_torchvision_state_dict(sd)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_unet_shapes(size):
    net = UNet(n_classes=3, width=8)
    assert net(torch.zeros(2, 3, *size)).shape == (2, 3, *size)


def test_unet_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match=r"divisible by 16.*50x50"):
        UNet(2, width=8)(torch.zeros(1, 3, 50, 50))


def test_unet_parameter_count_matches_reference():
    # milesial/Pytorch-UNet UNet(n_channels=3, n_classes=2, bilinear=True)
    assert sum(p.numel() for p in UNet(2).parameters()) == 17_263_042


def test_unet_group_coverage():
    net = UNet(2, width=8)
    names = [n for n, _ in net.named_parameters()]
    groups = net.param_groups()
    assert groups["all"] == names
    assert all(g and set(g) <= set(names) for g in groups.values())
    assert sorted(groups["inc"] + groups["down"] + groups["up"] + groups["outc"]) == sorted(names)
    assert sorted(sum((groups[f"s{i}"] for i in range(1, 6)), []) + groups["outc"]) == sorted(names)
    assert groups["u1"] == groups["s1"] and groups["u2"] == groups["s2"]
    assert groups["head"] == ["up4.conv.double_conv.3.weight", "up4.conv.double_conv.4.weight",
                              "up4.conv.double_conv.4.bias", "outc.conv.weight", "outc.conv.bias"]


def test_build_segmenter():
    assert isinstance(build_segmenter("unet", 2, width=4), UNet)
    with pytest.raises(ValueError, match="valid names"):
        build_segmenter("segformer", 2)
