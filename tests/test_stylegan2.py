"""lagm_nb.stylegan2 against NVIDIA's stylegan2-ada-pytorch test vector, plus the discriminator, losses and loader."""
import copy, math, warnings
from pathlib import Path

import pytest
import torch

from lagm_nb.core import CheckpointError
from lagm_nb.generators import HookedGenerator
from lagm_nb.stylegan2 import (Discriminator, Generator, d_logistic_loss, ema_update, g_nonsaturating_loss,
                               load_official_state_dict, modulated_conv2d, r1_penalty)

torch.set_num_threads(1)
FIXTURE = Path(__file__).parent / "fixtures" / "stylegan2ada_small_testvector.pt"
SMALL = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
             synthesis_kwargs=dict(channel_base=256, channel_max=16))


@pytest.fixture(scope="module")
def tv():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(FIXTURE, weights_only=True)


def test_matches_official_testvector(tv):
    G = load_official_state_dict(None, tv["state_dict"], source=FIXTURE.name, **tv["config"])   # strict, all keys
    assert len(tv["state_dict"]) == 94 and list(G.state_dict()) == list(tv["state_dict"])
    outs = {}
    for r in G.synthesis.block_resolutions:
        getattr(G.synthesis, f"b{r}").register_forward_hook(lambda m, i, o, r=r: outs.__setitem__(f"b{r}", o))
    with torch.no_grad():
        ws1 = G.mapping(tv["z"], None)
        ws07 = G.mapping(tv["z"], None, truncation_psi=tv["psi"], truncation_cutoff=tv["truncation_cutoff"])
        img = G.synthesis(ws07, noise_mode="const")
    pairs = {"ws_psi1": (ws1, tv["ws_psi1"]), "ws_psi07": (ws07, tv["ws_psi07"]), "img": (img, tv["img"])}
    for b, ref in tv["block_outputs"].items():
        assert isinstance(outs[b], tuple) and len(outs[b]) == 2
        pairs[f"{b}.x"], pairs[f"{b}.img"] = (outs[b][0], ref["x"]), (outs[b][1], ref["img"])
    assert len(pairs) == 13
    for name, (ours, ref) in pairs.items():
        assert ours.shape == ref.shape, name
        assert (ours - ref).abs().max() < 1e-4, name
    # the whole generator call gives the same image; the non-fused form agrees within float32 round-off
    assert (G(tv["z"], None, truncation_psi=tv["psi"]) - tv["img"]).abs().max() < 1e-4
    with torch.no_grad():
        assert (G.synthesis(ws07, fused_modconv=False) - tv["img_nonfused"]).abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loader_names_the_file_and_keys(tmp_path, tv):
    small = Generator(**SMALL)
    p = tmp_path / "small.pt"
    torch.save(small.state_dict(), p)
    with pytest.raises(CheckpointError, match=r"small\.pt does not fit Generator: .*(missing|differently shaped)"):
        load_official_state_dict(None, p, **tv["config"])
    torch.save({"config": small.init_kwargs, "state_dict": small.state_dict()}, tmp_path / "cfg.pt")
    G = load_official_state_dict(None, tmp_path / "cfg.pt")
    assert not G.training and torch.equal(G.synthesis.b4.const, small.synthesis.b4.const)
    (tmp_path / "net.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"net\.pkl is not a plain torch state dict"):
        load_official_state_dict(None, tmp_path / "net.pkl")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_state_dict(None, tmp_path / "none.pt")


def test_bad_inputs_are_refused():
    G = Generator(**SMALL)
    with pytest.raises(ValueError, match="power of two"):
        Generator(**{**SMALL, "img_resolution": 24})
    with pytest.raises(ValueError, match=r"expects \[N, 16\]"):
        G(torch.randn(2, 15))
    with pytest.raises(NotImplementedError, match="c_dim=0"):
        Generator(**{**SMALL, "c_dim": 5})
    with pytest.raises(ValueError, match="noise_mode"):
        G(torch.randn(2, 16), noise_mode="fixed")


def test_hooked_generator_reads_synthesis_blocks():
    H = HookedGenerator(Generator(**SMALL), r"synthesis\.b\d+", 16, truncation_psi=0.7)
    assert H.image_size == (32, 32) and H.feature_shapes == [(16, 4, 4), (16, 8, 8), (16, 16, 16), (8, 32, 32)]
    assert torch.equal(H.sample(2, seed=3)[1][2], H.sample(2, seed=3)[1][2])


def test_fused_and_nonfused_modulated_conv_agree():
    x, w, s = torch.randn(3, 5, 6, 6), torch.randn(4, 5, 3, 3), torch.randn(3, 5)
    f = torch.tensor([1., 3, 3, 1]).outer(torch.tensor([1., 3, 3, 1])) / 64
    for up in (1, 2):
        a = modulated_conv2d(x, w, s, up=up, padding=1, resample_filter=f, fused=True)
        b = modulated_conv2d(x, w, s, up=up, padding=1, resample_filter=f, fused=False)
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("res", [32, 64])
def test_discriminator_shapes_and_gradients(res):
    D = Discriminator(0, res, 3, channel_base=512, channel_max=32)
    x = torch.randn(4, 3, res, res, requires_grad=True)
    y = D(x)
    assert y.shape == (4, 1)
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in D.parameters())
    names = {n for n, _ in D.named_modules()}
    assert {f"b{res}.fromrgb", f"b{res}.skip", "b8.conv1", "b4.mbstd", "b4.conv", "b4.fc", "b4.out"} <= names


def test_r1_of_linear_discriminator_is_squared_weight_norm():
    v = torch.randn(3, 8, 8, requires_grad=True)   # D(x) = <v, x>, so grad_x D = v for every image
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    r1 = r1_penalty((x * v).flatten(1).sum(1, keepdim=True), x)
    assert torch.allclose(r1, v.square().sum().expand(4))
    r1.mean().backward()   # the penalty is differentiable w.r.t. D's parameters: d||v||^2/dv = 2v
    assert torch.allclose(v.grad, 2 * v)


def test_losses_and_ema():
    z = torch.zeros(3, 1)
    assert math.isclose(g_nonsaturating_loss(z).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(d_logistic_loss(z, z).item(), 2 * math.log(2), rel_tol=1e-6)
    G = Generator(**SMALL)
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        G.mapping.fc0.weight.add_(1.0)
        G.mapping.w_avg.fill_(2.0)
    ema_update(G_ema, G, beta=0.75)
    assert torch.allclose(G_ema.mapping.fc0.weight, G.mapping.fc0.weight - 0.75, atol=1e-5)
    assert torch.equal(G_ema.mapping.w_avg, G.mapping.w_avg)


def test_small_generator_trains_a_step():
    G = Generator(**SMALL).train()
    D = Discriminator(0, 32, 3, channel_base=256, channel_max=16)
    loss = g_nonsaturating_loss(D(G(torch.randn(4, 16), noise_mode="random")))
    loss.backward()
    assert all(p.grad is not None for n, p in G.named_parameters()), "every G parameter gets a gradient"
    assert G.mapping.w_avg.abs().sum() > 0   # training mode tracks w_avg


def test_tf_converted_constructor_arguments_are_accepted():
    G = Generator(**{**SMALL,
                     "mapping_kwargs": dict(num_layers=2, embed_features=None, layer_features=None, activation="lrelu",
                                            lr_multiplier=0.01, w_avg_beta=0.995),
                     "synthesis_kwargs": dict(channel_base=256, channel_max=16, num_fp16_res=4, conv_clamp=0.25,
                                              architecture="skip", resample_filter=[1, 3, 3, 1], use_noise=False,
                                              activation="lrelu")}).eval()
    assert not any("noise" in k for k in G.state_dict())
    x = {}
    G.synthesis.b16.register_forward_hook(lambda m, i, o: x.update(b16=o[0]))   # returns None: output kept
    assert G(torch.randn(2, 16), force_fp32=True).shape == (2, 3, 32, 32)
    assert x["b16"].abs().max() <= 0.25
    with pytest.raises(NotImplementedError, match="only 'skip'"):
        Generator(**{**SMALL, "synthesis_kwargs": dict(architecture="resnet")})
