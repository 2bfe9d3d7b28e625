import pytest
import torch
from torch import nn

from lagm_nb.annotator import FPNAnnotator
from lagm_nb.core import fingerprint
from lagm_nb.testing import TeacherLabeller, tiny_generator
from lagm_nb.recipe import RECIPES, RecipeConfig, default_recipe, learn_annotator, pseudo_labels
from lagm_nb.segmenters import UNet
from lagm_nb.datasets import LabelledImages
from lagm_nb.train import GMConfig


def test_recipe_config_splits_into_matching_settings():
    cfg = RecipeConfig.preset("cpu", steps=7, seed=3)
    m = cfg.matching()
    assert isinstance(m, GMConfig) and not isinstance(m, RecipeConfig)
    assert (m.steps, m.seed, m.match) == (7, 3, "head")
    assert RecipeConfig.preset("pseudo_label").steps == 0
    assert set(RECIPES) >= {"paper", "cpu", "pseudo_label"}
    with pytest.raises(ValueError, match="known presets"): RecipeConfig.preset("gpu")


def test_default_recipe_depends_on_device():
    assert default_recipe("cpu") == RecipeConfig.preset("cpu")
    assert default_recipe(torch.device("cuda")) == RecipeConfig.preset("paper")


def test_fingerprint_sees_every_input():
    net = nn.Conv2d(2, 3, 1)
    images, masks = torch.full((2, 3, 4, 4), -0.5), torch.zeros(2, 4, 4, dtype=torch.long)
    base = fingerprint(net, LabelledImages(images, masks, 3), {"steps": 1})
    assert base == fingerprint(net, LabelledImages(images, masks, 3), {"steps": 1})
    masks2 = masks.clone(); masks2[0, 0, 0] = 1
    assert base != fingerprint(net, LabelledImages(images, masks2, 3), {"steps": 1})
    assert base != fingerprint(net, LabelledImages(images, masks, 3), {"steps": 2})
    with torch.no_grad(): net.weight[0, 0] += 1
    assert base != fingerprint(net, LabelledImages(images, masks, 3), {"steps": 1})


def _setup():
    G = tiny_generator()
    teacher = TeacherLabeller(G, 3)
    z = G.latents(12, seed=5)
    data = LabelledImages(G.sample(z=z)[0], teacher(z), 3)
    torch.manual_seed(0)
    return G, data, FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)


def test_pseudo_labels_are_probabilities():
    G, data, _, S = _setup()
    z, q = pseudo_labels(G, S, 5, seed=1)
    assert z.shape[0] == 5 and q.shape == (5, 3, *G.image_size)
    assert torch.allclose(q.sum(1), torch.ones(5, *G.image_size), atol=1e-5)
    assert torch.equal(pseudo_labels(G, S, 5, seed=1)[0], z)


def test_learn_annotator_reuses_cached_stages(tmp_path):
    G, data, A, S = _setup()
    cfg = RecipeConfig.preset("cpu", pretrain_steps=4, warm_start_images=8, warm_start_steps=3, steps=3,
                              eval_every=100, seed=2)
    w0 = A.head[-1].weight.detach().clone()
    first = learn_annotator(G, A, S, data.subset(range(4)), cfg, cache_dir=tmp_path, progress=False)
    assert not torch.equal(w0, first.annotator.head[-1].weight)
    names = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert names == ["match", "pretrain", "recipe", "warm"]
    _, _, A2, S2 = _setup()
    again = learn_annotator(G, A2, S2, data.subset(range(4)), cfg, cache_dir=tmp_path, progress=False)
    assert again.minutes == first.minutes
    for a, b in zip(first.annotator.state_dict().values(), again.annotator.state_dict().values()):
        assert torch.equal(a, b)
    # other labelled images: a new fingerprint, nothing reused
    _, _, A3, S3 = _setup()
    learn_annotator(G, A3, S3, data.subset(range(4, 8)), cfg, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("warm-*.pt"))) == 2


def test_pretrain_balance_is_a_pretraining_of_its_own(tmp_path):
    G, data, A, S = _setup()
    cfg = RecipeConfig.preset("cpu", pretrain_steps=4, warm_start_images=8, warm_start_steps=3, steps=0, seed=2)
    plain = learn_annotator(G, A, S, data.subset(range(4)), cfg, cache_dir=tmp_path, progress=False)
    _, _, A2, S2 = _setup()
    balanced = learn_annotator(G, A2, S2, data.subset(range(4)), cfg.replace(pretrain_balance=0.5),
                               cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("pretrain-*"))) == 2 and len(list(tmp_path.glob("warm-*.pt"))) == 2
    assert not torch.equal(plain.segmenter.outc.conv.weight, balanced.segmenter.outc.conv.weight)
    # the default (0) is no setting at all: the runs stored before the option existed keep their names
    assert "pretrain_balance" not in cfg.changes() and cfg.replace(pretrain_balance=0.0) == cfg


def test_pretrain_keep_backbone_redraws_the_rest():
    from lagm_nb.recipe import keep_pretrained
    from lagm_nb.segmenters import DeepLabV3
    torch.manual_seed(0)
    net = DeepLabV3(3, backbone="resnet50")
    with torch.no_grad():
        for p in net.parameters(): p.add_(1.0)            # "pre-trained": differs from any fresh draw
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    keep_pretrained(net, "backbone", seed=7)
    fresh = net.fresh(7).state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k] if k.startswith("backbone.") else fresh[k]), k


def test_config_changes_name_runs_by_their_differences():
    cfg = RecipeConfig.preset("cpu")
    assert cfg.changes()["match"] == "head" and "segmenter_state" not in cfg.changes()
    assert RecipeConfig().changes() == {}


def test_learn_annotator_runs_without_a_cache_dir():
    G, data, A, S = _setup()
    cfg = RecipeConfig.preset("cpu", pretrain_steps=2, warm_start_images=4, warm_start_steps=2, steps=2, seed=1)
    w0 = S.outc.conv.weight.detach().clone()
    res = learn_annotator(G, A, S, data.subset(range(4)), cfg, progress=False)
    assert res.match_dir is None and not torch.equal(w0, res.segmenter.outc.conv.weight)


SMALL = dict(pretrain_steps=2, warm_start_images=4, warm_start_steps=2, steps=2, seed=1)


def test_class_counts_are_checked_before_any_stage(tmp_path, unchanged):
    G, data, A, S = _setup()
    labelled = data.subset(range(4))
    learn_annotator(G, A, S, labelled, RecipeConfig.preset("cpu", **SMALL), cache_dir=tmp_path, progress=False)
    nets = lambda a, s: (FPNAnnotator(G.feature_shapes, a, G.image_size, width=8), UNet(s, width=4))
    for name in ["cpu", "paper", "pseudo_label"]:      # cpu matched augmented batches; paper failed after its stages
        for a, s in [(5, 5), (2, 2), (3, 5)]:
            with unchanged(tmp_path), pytest.raises(ValueError, match=f"class counts differ: the labelled 3, the "
                                                                      f"annotator {a}, the segmenter {s}; build them"):
                learn_annotator(G, *nets(a, s), labelled, RecipeConfig.preset(name, **SMALL), cache_dir=tmp_path,
                                progress=False)


def test_without_a_config_the_device_default_is_named_printed_and_recorded(tmp_path, monkeypatch, capsys):
    import json
    from lagm_nb.recipe import recipe_name
    monkeypatch.setitem(RECIPES, "cpu", {**RECIPES["cpu"], **SMALL})    # the cpu recipe, made small for a test
    G, data, A, S = _setup()
    res = learn_annotator(G, A, S, data.subset(range(4)), None, cache_dir=tmp_path, device="cpu", progress=False)
    assert res.recipe == "cpu" and res.config == RecipeConfig.preset("cpu")
    assert "no recipe given, so the cpu default, recipe 'cpu'" in capsys.readouterr().out
    [record] = tmp_path.glob("recipe-*.json")
    assert json.loads(record.read_text())["recipe"] == "cpu" and json.loads(record.read_text())["chosen"] == "by device"
    assert record.name.removeprefix("recipe-").removesuffix(".json") == res.match_dir.name.removeprefix("match-")
    assert recipe_name(default_recipe("cuda")) == "paper"
    given = learn_annotator(G, *_setup()[2:], data.subset(range(4)),
                            RecipeConfig.preset("cpu", **{**SMALL, "steps": 3}),
                            device="cpu", progress=False)
    assert given.recipe == "cpu with steps=3" and capsys.readouterr().out == ""


def test_match_framing_zooms_only_the_matching_target(tmp_path):
    G, data, A, S = _setup()
    cfg = RecipeConfig.preset("cpu", pretrain_steps=4, warm_start_images=8, warm_start_steps=3, steps=2, seed=2,
                              eval_every=100)
    plain = learn_annotator(G, A, S, data.subset(range(4)), cfg, cache_dir=tmp_path, progress=False)
    _, _, A2, S2 = _setup()
    framed = learn_annotator(G, A2, S2, data.subset(range(4)), cfg.replace(match_framing=True), cache_dir=tmp_path,
                             progress=False)
    assert plain.framing_zoom == 1.0 and 0.5 <= framed.framing_zoom <= 2.0
    # stages 1-2 are shared, the matching is a run of its own
    assert len(list(tmp_path.glob("warm-*.pt"))) == 1 and len(list(tmp_path.glob("match-*"))) == 2
    with pytest.raises(ValueError, match="augment_labelled=True"):
        learn_annotator(G, A2, S2, data.subset(range(4)), cfg.replace(match_framing=True, augment_labelled=False),
                        progress=False)


def test_recipes_without_a_framing_setting_keep_their_stage_names():
    from lagm_nb.recipe import _stage_keys
    cfg = RecipeConfig.preset("cpu")
    key_pre, key_warm, key_match = _stage_keys(cfg, "the data")
    assert key_match == fingerprint(key_warm, cfg.matching().changes(), cfg.augment_labelled)  # the formula of old
    assert _stage_keys(cfg.replace(match_framing=True), "the data")[:2] == (key_pre, key_warm)


def test_framing_zoom_is_the_root_of_the_foreground_shares():
    from lagm_nb.recipe import framing_zoom
    G = tiny_generator()
    h, w = G.image_size

    class Everywhere(nn.Module):               # labels every pixel of a generated image foreground
        def forward(self, feats):
            n = len(feats[0])
            return torch.stack([torch.zeros(n, h, w), torch.ones(n, h, w)], 1)

    masks = torch.zeros(2, h, w, dtype=torch.long)
    masks[:, : h // 9] = 1                     # about a ninth of the labelled pixels
    share = (masks != 0).float().mean().item()
    labelled = LabelledImages(torch.full((2, 3, h, w), -0.5), masks, 2)
    got = framing_zoom(G, Everywhere(), labelled, n_images=4, limits=(0.1, 10))
    assert got == pytest.approx((1 / share) ** 0.5, rel=1e-5)
    masks[:] = 255                              # every pixel ignored: no foreground to compare
    with pytest.raises(ValueError, match="no foreground"):
        framing_zoom(G, Everywhere(), LabelledImages(torch.full((2, 3, h, w), -0.5), masks, 2), n_images=4)
