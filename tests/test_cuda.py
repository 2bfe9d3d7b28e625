"""The CUDA subset, `pytest -m cuda`: each test skips without a CUDA device. No GPU has run them yet (none was lent to
the sessions that wrote them); on a machine with one, `pytest -m cuda` runs exactly these."""
import pytest
import torch

from lagm_nb.annotator import FPNAnnotator
from lagm_nb.datasets import LabelledImages
from lagm_nb.gradmatch import GradientMatchingLoss
from lagm_nb.segmenters import UNet
from lagm_nb.testing import TeacherLabeller, tiny_generator
from lagm_nb.train import GMConfig, annotator_step, train_gradient_matching

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with pytest -m cuda)")]


@pytest.fixture(scope="module")
def setup():
    G = tiny_generator().to("cuda")
    z = G.latents(6, seed=5)
    return G, LabelledImages(G.sample(z=z)[0].cpu(), TeacherLabeller(G, 3)(z).cpu(), 3)


def _nets(G, seed=0):
    torch.manual_seed(seed)
    return FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8).cuda(), UNet(3, width=4).cuda()


def test_bf16_matching_loss_on_cuda_stays_within_5_percent_of_fp32(setup):
    G, lab = setup
    losses = {}
    for precision in ("fp32", "bf16"):
        A, S = _nets(G)
        gm, opt = GradientMatchingLoss(S, "all"), torch.optim.SGD(A.parameters(), lr=0.0)   # the same annotator
        cfg = GMConfig(precision=precision, batch_size=2)
        losses[precision] = [annotator_step(gm, G, A, opt, lab, cfg, t, "cuda").item() for t in (1, 2, 3)]
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_gradient_matching_step_on_cuda(setup, precision):
    G, lab = setup
    A, S = _nets(G)
    before = [p.detach().clone() for p in A.parameters()]
    res = train_gradient_matching(G, A, S, lab, GMConfig(steps=1, log_every=1, precision=precision), device="cuda",
                                  progress=False)
    assert all(p.device.type == "cuda" for p in [*res.annotator.parameters(), *res.segmenter.parameters()])
    assert torch.isfinite(torch.tensor(res.history[-1]["gm_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, res.annotator.parameters()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_benchmark_step_at_64_px_on_cuda(precision):
    from lagm_nb.bench.harness import benchmark_step
    r = benchmark_step(64, precision=precision, steps=2, warmup=1, device="cuda")
    assert r["size"] == 64 and r["precision"] == precision and r["memory"] == "cuda max_memory_allocated"
    assert r["seconds_per_step"] > 0 and r["peak_memory_mib"] > 0
