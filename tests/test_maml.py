import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call

from lagm_nb.annotator import FPNAnnotator
from lagm_nb.core import CheckpointError, step_seed
from lagm_nb.datasets import LabelledImages
from lagm_nb.gradmatch import segmentation_loss
from lagm_nb.maml import MAMLConfig, maml_annotator_step, maml_meta_loss, simulated_sgd, step_cost, train_maml
from lagm_nb.segmenters import UNet
from lagm_nb.testing import TeacherLabeller, tiny_generator
from lagm_nb.train import GMConfig, annotate


@pytest.fixture(scope="module")
def G():
    return tiny_generator()


@pytest.fixture(scope="module")
def lab(G):
    z = G.latents(6, seed=5)
    return LabelledImages(G.sample(z=z)[0], TeacherLabeller(G, 3)(z), 3)


class _Float64:
    "The tiny generator's samples in double precision, for finite differences."
    def __init__(self, G): self.G = G
    def sample(self, n, seed=None):
        x, h = self.G.sample(n, seed=seed)
        return x.double(), [f.double() for f in h]


class _OneMap(nn.Module):
    "A tiny annotator: a 1x1 conv on the finest feature map, upsampled to the image."
    def __init__(self, c_in, n_classes, size):
        super().__init__()
        self.conv, self.size = nn.Conv2d(c_in, n_classes, 1), size
    def forward(self, feats): return F.interpolate(self.conv(feats[-1]), size=self.size, mode="bilinear")


@pytest.fixture()
def tiny64(G):
    "float64: generator, 1x1-conv annotator, 1x1-conv segmenter with bias (no BN), a fixed labelled batch source."
    torch.manual_seed(0)
    A, S = _OneMap(8, 3, G.image_size).double(), nn.Conv2d(3, 3, 1).double()
    xl, yl = _Float64(G).sample(2, seed=99)[0], TeacherLabeller(G, 3)(G.latents(2, seed=99))
    return _Float64(G), A, S, (lambda step: (xl, yl))


def _nets(G, seed=0):
    torch.manual_seed(seed)
    return FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)


def test_config_presets_and_errors():
    assert MAMLConfig.preset("paper") == MAMLConfig() and MAMLConfig().inner_lr == 0.1
    assert MAMLConfig.preset("paper", inner_steps=2).inner_steps == 2
    with pytest.raises(ValueError, match="inner_steps"): MAMLConfig(inner_steps=0)
    with pytest.raises(ValueError, match="inner_steps"): MAMLConfig.preset("paper", inner_steps=1.5)
    with pytest.raises(ValueError, match="inner_lr"): MAMLConfig(inner_lr=-0.1)


@pytest.mark.parametrize("k", [1, 2])
def test_meta_gradient_matches_finite_differences(tiny64, k):
    G64, A, S, source = tiny64
    meta = lambda: maml_meta_loss(G64, A, S, source, MAMLConfig(inner_steps=k), 3, "cpu")
    w = A.conv.weight
    analytic = torch.autograd.grad(meta(), w)[0]
    assert analytic.abs().max() > 1e-5
    for idx in [(0, 0, 0, 0), (1, 5, 0, 0), (2, 7, 0, 0)]:
        with torch.no_grad():
            w0 = w[idx].item()
            w[idx] = w0 + 1e-6; up = meta().item()
            w[idx] = w0 - 1e-6; down = meta().item()
            w[idx] = w0
        assert (up - down) / 2e-6 == pytest.approx(analytic[idx].item(), rel=1e-6, abs=1e-12)


def test_one_step_meta_gradient_is_a_gradient_dot_product(tiny64):
    # K = 1: grad_w L_l(theta - eta g(w)) = grad_w [-eta <grad L_l(theta'), g(w)>] with grad L_l(theta') held fixed
    G64, A, S, source = tiny64
    cfg = MAMLConfig(inner_steps=1)
    meta_grad = torch.autograd.grad(maml_meta_loss(G64, A, S, source, cfg, 3, "cpu"), A.conv.weight)[0]
    x, h = G64.sample(2, seed=step_seed(cfg.seed, 3, "match"))
    g = torch.autograd.grad(segmentation_loss(S(x), annotate(A, h, graph=True)), list(S.parameters()),
                            create_graph=True)
    after = {n: p - cfg.inner_lr * gi for (n, p), gi in zip(dict(S.named_parameters()).items(), g)}
    xl, yl = source(3)
    v = torch.autograd.grad(segmentation_loss(functional_call(S, after, (xl,)), yl), list(after.values()),
                            retain_graph=True)
    surrogate = -cfg.inner_lr * sum((gi * vi).sum() for gi, vi in zip(g, v))
    assert torch.allclose(torch.autograd.grad(surrogate, A.conv.weight)[0], meta_grad, rtol=1e-9, atol=1e-15)


def test_two_steps_differ_from_one(tiny64):
    G64, A, S, source = tiny64
    grads = [torch.autograd.grad(maml_meta_loss(G64, A, S, source, MAMLConfig(inner_steps=k), 3, "cpu"),
                                 A.conv.weight)[0] for k in (1, 2)]
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


def test_simulated_step_is_an_sgd_step_and_leaves_the_network_alone():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    net, twin = make(), make()
    twin.load_state_dict(net.state_dict())
    x, y = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    theta = simulated_sgd(net, dict(net.named_parameters()), {n: b.clone() for n, b in net.named_buffers()},
                          x, y, lr=0.1, steps=2)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad(); segmentation_loss(twin(x), y).backward(); opt.step()
    for n, p in twin.named_parameters(): assert torch.allclose(theta[n], p, atol=1e-6), n
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_annotator_step_leaves_real_segmenter_untouched(G, lab):
    A, S = _nets(G)
    s0 = {k: v.clone() for k, v in S.state_dict().items()}   # weights and BatchNorm statistics
    a0 = [p.detach().clone() for p in A.parameters()]
    opt = torch.optim.SGD(A.parameters(), lr=0.1)
    loss = maml_annotator_step(G, A, S, opt, lab, MAMLConfig(inner_steps=2), 1, "cpu")
    assert torch.isfinite(loss) and any(not torch.equal(u, v) for u, v in zip(a0, A.parameters()))
    assert all(torch.equal(v, S.state_dict()[k]) for k, v in s0.items())
    assert all(p.grad is None for p in S.parameters())


def test_training_with_two_inner_steps_differs_from_one(G, lab):
    runs = []
    for k in (1, 2):
        A, S = _nets(G)
        runs.append(train_maml(G, A, S, lab, MAMLConfig(steps=2, inner_steps=k), progress=False))
    assert not torch.equal(runs[0].annotator.head[-1].weight, runs[1].annotator.head[-1].weight)


def test_resume_is_bit_exact(G, lab, tmp_path):
    cfg = MAMLConfig(steps=8, checkpoint_every=4, log_every=1, inner_steps=2)
    full = train_maml(G, *_nets(G), lab, cfg, out_dir=tmp_path / "full", progress=False)
    train_maml(G, *_nets(G), lab, cfg.replace(steps=4), out_dir=tmp_path / "resumed", progress=False)
    resumed = train_maml(G, *_nets(G, seed=1), lab, cfg, out_dir=tmp_path / "resumed", resume=True, progress=False)
    for a, b in [(full.annotator, resumed.annotator), (full.segmenter, resumed.segmenter)]:
        for (k, v), u in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(v, u), k
    assert [r["meta_loss"] for r in full.history] == [r["meta_loss"] for r in resumed.history]
    with pytest.raises(CheckpointError, match="other settings"):
        train_maml(G, *_nets(G), lab, cfg.replace(inner_lr=0.01), out_dir=tmp_path / "resumed", resume=True,
                   progress=False)


def test_train_maml_needs_a_maml_config(G, lab):
    with pytest.raises(TypeError, match="MAMLConfig"):
        train_maml(G, *_nets(G), lab, GMConfig(steps=1), progress=False)


def test_step_cost(G, lab):
    r = step_cost("maml", G, *_nets(G), lab, MAMLConfig(inner_steps=1), warmup=1, steps=1, device="cpu")
    assert r["seconds_per_step"] > 0 and r["peak_memory_mib"] >= 0 and r["memory"] == "process resident memory, sampled"
    with pytest.raises(ValueError, match="kind"): step_cost("dc", G, *_nets(G), lab, GMConfig())


def test_refused_calls_and_a_nan_stop_leave_the_run_as_it_was(G, lab, tmp_path, unchanged, nan_gradient):
    run = tmp_path / "run"
    train_maml(G, *_nets(G), lab, MAMLConfig(steps=2, checkpoint_every=2), out_dir=run, progress=False)
    cfg = MAMLConfig(steps=4, checkpoint_every=2)
    nets = lambda a, s: (FPNAnnotator(G.feature_shapes, a, G.image_size, width=8), UNet(s, width=4))
    twos = lambda t: (lab.images[:2], torch.full_like(lab.masks[:2], 2))
    cases = [  # (networks, labelled, error, message)
        (nets(5, 5), lab, ValueError, "class counts differ: the labelled 3, the annotator 5, the segmenter 5"),
        (nets(2, 2), twos, ValueError, r"labels from 2 to 2 \(at least 3 classes\), the annotator 2, the segmenter 2"),
        (_nets(G), lambda t: (lab.images[:2], lab.masks[:2]), CheckpointError, r"other settings .*'labelled'"),
    ]
    for networks, labelled, error, message in cases:
        with unchanged(run), pytest.raises(error, match=message):
            train_maml(G, *networks, labelled, cfg, out_dir=run, resume=True, progress=False)
    A, S = _nets(G)
    nan_gradient(S.outc.conv.weight, call=2)    # the segmenter's own update at step 4 (a checkpoint step)
    with unchanged(run), pytest.raises(FloatingPointError, match=r"1-step MAML: the segmenter's outc.conv.weight "
                                       "became NaN or infinite between steps 3 and 4"):
        train_maml(G, A, S, lab, cfg.replace(steps=6), out_dir=run, resume=True, progress=False)


@pytest.mark.parametrize("k", [1, 2])
def test_bf16_meta_loss_stays_within_5_percent_of_fp32(G, lab, k):
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        A, S = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)
        hist = train_maml(G, A, S, lab, MAMLConfig(steps=3, inner_steps=k, log_every=1, precision=precision),
                          progress=False).history
        losses[precision] = [r["meta_loss"] for r in hist] + [r["seg_loss"] for r in hist]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        train_maml(G, A, S, lab, MAMLConfig(steps=1, precision="fp16"), progress=False)


def test_segmenter_states_work_as_in_algorithm_1(G, lab):
    cfg = MAMLConfig(steps=2, log_every=1)
    torch.manual_seed(0)
    A, S = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)
    before = {k: v.clone() for k, v in S.state_dict().items()}
    hist = train_maml(G, A, S, lab, cfg.replace(segmenter_state="fixed"), progress=False).history
    assert all(torch.equal(v, S.state_dict()[k]) for k, v in before.items())      # weights and BN statistics
    assert [r["seg_loss"] for r in hist] == [None, None]
    hist = train_maml(G, A, S, lab, cfg.replace(segmenter_state="reinit", reinit_every=2), progress=False).history
    drawn = S.fresh(step_seed(cfg.seed, 2, "reinit")).state_dict()              # redrawn at step 2
    assert all(torch.equal(v, drawn[k]) for k, v in S.state_dict().items())
    with pytest.raises(ValueError, match="segmenter_state must be one of"):
        train_maml(G, A, S, lab, cfg.replace(segmenter_state="frozen"), progress=False)


def test_maml_refuses_a_weight_average_it_does_not_keep(G, lab):
    A, S = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)
    with pytest.raises(ValueError, match="annotator_ema"):
        train_maml(G, A, S, lab, MAMLConfig(steps=1, annotator_ema=0.9), progress=False)
