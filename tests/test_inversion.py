import json
import re

import pytest
import torch

import lagm_nb.inversion as inversion
from lagm_nb.annotator import FPNAnnotator, PixelMLPAnnotator
from lagm_nb.core import CheckpointError
from lagm_nb.datasets import LabelledImages
from lagm_nb.inversion import (InversionConfig, ReconstructionLoss, invert, inversion_annotator, latent_view,
                               learning_rate, noise_scale, psnr)
from lagm_nb.testing import tiny_generator, tiny_stylegan


def _targets(G, n=2, seed=5):
    z = G.latents(n, seed=seed)
    return z, *G.sample(z=z)


def test_dcgan_inversion_recovers_the_latent_of_a_generated_image():
    # Random pairs of tiny-DCGAN images are ~9 dB apart. 40 dB is an RMS error of 1% of the range; the loss (pixel
    # MSE on [-1, 1] = 4 x MSE on [0, 1], plus two pooled MSEs that cannot exceed it) is then below 3 * 4e-4.
    G = tiny_generator()
    z, x, _ = _targets(G)
    inv = invert(G, x, InversionConfig(steps=100), progress=False)
    assert inv.space == "z" and (inv.psnr > 40).all() and (inv.losses < 3 * 4e-4 * 1.01).all()
    assert ((inv.latents - z).norm(dim=1) / z.norm(dim=1) < 0.05).all()
    exact = invert(G, x, InversionConfig(steps=150, prior_weight=0.0), progress=False)   # no prior: z itself
    assert ((exact.latents - z).norm(dim=1) / z.norm(dim=1) < 0.01).all() and (exact.psnr > 60).all()


def test_norm_prior_pulls_the_latent_to_the_shell():
    G = tiny_generator()
    z, x, _ = _targets(G, 3)
    shell = lambda v: (v.square().mean(1) - 1).abs()
    pulled = invert(G, x, InversionConfig(steps=100, prior_weight=10.0), progress=False).latents
    assert (shell(pulled) < shell(z)).all()


def test_stylegan_w_plus_inversion_reconstructs_a_generated_image():
    S = tiny_stylegan()
    _, x, _ = _targets(S)
    floor = psnr(x, S.sample(2, seed=6)[0])   # ~20 dB: the tiny StyleGAN2's images are low-contrast
    inv = invert(S, x, InversionConfig(steps=200, w_avg_samples=1000), progress=False)
    assert inv.space == "w+" and inv.latents.shape == (2, S.G.num_ws, S.G.w_dim)
    assert (inv.psnr > 35).all() and (inv.psnr > floor + 15).all()
    assert torch.allclose(inv.generator.sample(z=inv.latents)[0], inv.reconstructions)


def test_w_plus_view_is_the_generator_in_w_plus():
    S = tiny_stylegan()
    z, x, h = _targets(S, 3)
    view = latent_view(S, "w+")
    xv, hv = view.sample(z=S.G.mapping(z, None))
    assert torch.equal(x, xv) and all(torch.equal(a, b) for a, b in zip(h, hv))
    assert latent_view(S, "w").sample(z=S.G.mapping(z, None)[:, 0])[0].shape == x.shape
    assert len(S.sample(1, seed=0)[1]) == 3 and view._store == []   # the two wrappers do not share features


def test_restarts_never_make_the_best_loss_worse():
    G = tiny_generator()
    _, x, _ = _targets(G, 4)
    one = invert(G, x, InversionConfig(steps=40), progress=False)
    three = invert(G, x, InversionConfig(steps=40, restarts=3), progress=False)
    first = three.restart == 0
    assert (three.losses <= one.losses).all() and torch.equal(three.losses[first], one.losses[first])
    assert torch.equal(three.latents[first], one.latents[first])


def test_inversion_is_deterministic_from_the_seed():
    S = tiny_stylegan()
    _, x, _ = _targets(S)
    cfg = InversionConfig(space="w", steps=10, restarts=2, w_avg_samples=500)
    a, b = (invert(S, x, cfg, progress=False) for _ in range(2))
    c = invert(S, x, cfg.replace(seed=1), progress=False)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


def test_schedules():
    cfg = InversionConfig()
    assert learning_rate(0.0, cfg) == 0 and learning_rate(0.5, cfg) == pytest.approx(cfg.lr)
    assert learning_rate(0.025, cfg) == pytest.approx(cfg.lr / 2)       # halfway up the warm-up
    assert learning_rate(0.875, cfg) == pytest.approx(cfg.lr / 2)       # halfway down the cosine
    assert noise_scale(0.0, cfg, 1.0) == pytest.approx(0.05) and noise_scale(0.375, cfg, 1.0) == pytest.approx(0.0125)
    assert noise_scale(0.8, cfg, 1.0) == 0


def test_reconstruction_loss_and_psnr_by_hand():
    t = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(psnr(t + 0.02, t), torch.tensor(40.0))
    assert torch.allclose(ReconstructionLoss(t)(t + 0.02), torch.full((2,), 3 * 4e-4))   # constant error: 3 terms
    assert torch.allclose(ReconstructionLoss(t, multiscale_weight=0.0)(t + 0.02), torch.full((2,), 4e-4))
    feats = lambda x: [x.mean(1), 2 * x]
    expected = 3 * 4e-4 + (4e-4 + 4 * 4e-4) / 2
    assert torch.allclose(ReconstructionLoss(t, perceptual=feats)(t + 0.02), torch.full((2,), expected))
    images = t.clone().requires_grad_(True)
    ReconstructionLoss(t + 0.1, perceptual=feats)(images).sum().backward()
    assert images.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    G, S = tiny_generator(), tiny_stylegan()
    x = S.sample(2, seed=0)[0]
    with pytest.raises(ValueError, match="16x16 pixels but must be 32x32"): invert(G, x)
    with pytest.raises(ValueError, match="channel-last"): invert(S, x.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"): invert(S, x * 10)
    with pytest.raises(ValueError, match=r"\[0, 1\] data"): invert(S, (x + 1) / 2)
    with pytest.raises(ValueError, match="unknown space 'W'"): invert(S, x, InversionConfig(space="W"))
    with pytest.raises(ValueError, match="use space='z'"): invert(G, G.sample(2, seed=0)[0], InversionConfig(space="w"))


@pytest.mark.parametrize("kind", ["fpn", "mlp"])
def test_inversion_annotator_end_to_end(kind):
    G = tiny_generator()
    x, _ = G.sample(4, seed=1)
    lab = LabelledImages(x, torch.randint(0, 3, (4, 32, 32)), 3)
    A = (FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8) if kind == "fpn"
         else PixelMLPAnnotator(G.feature_shapes, 3, G.image_size, n_members=2))
    before = [p.detach().clone() for p in A.parameters()]
    A, inv = inversion_annotator(G, A, lab, InversionConfig(steps=10), fit_steps=3, progress=False)
    assert inv.latents.shape == (4, 16) and inv.psnr.shape == (4,)
    assert any(not torch.equal(p, q) for p, q in zip(before, A.parameters()))
    assert A(G.sample(2, seed=9)[1]).shape == (2, 3, 32, 32)


# Checkpoints and resume (out_dir)

RESULTS = ("latents", "losses", "restart", "reconstructions", "psnr")


def _same(a, b): return all(torch.equal(getattr(a, k), getattr(b, k)) for k in RESULTS)


class Interrupted(Exception):
    "A simulated kill (not KeyboardInterrupt, which would stop pytest itself if a wrong implementation let it out)."


def _stop_after(monkeypatch, k: int):
    "Make `project` raise Interrupted on its call number k + 1 (k batches finish, as if the run were killed)."
    real, calls = inversion.project, []
    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) > k: raise Interrupted("simulated interruption")
        return real(*args, **kwargs)
    monkeypatch.setattr(inversion, "project", stop)


def _log(folder): return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# (generator, config, batches done before the interruption): inside restart 0 (the best results still partly
# empty), at a restart's boundary, and inside a later restart where batches mix images kept from several restarts.
CUTS = [("dcgan", dict(restarts=2, batch_size=1), 1), ("dcgan", dict(restarts=2, batch_size=1), 4),
        ("dcgan", dict(restarts=3, batch_size=2), 3), ("dcgan", dict(restarts=3, batch_size=2), 4),
        ("stylegan", dict(space="w+", restarts=2, batch_size=2, w_avg_samples=500), 3)]


@pytest.mark.parametrize("net,changes,k", CUTS)
def test_interrupted_inversion_resumes_to_bit_identical_results(net, changes, k, monkeypatch, tmp_path):
    G = tiny_generator() if net == "dcgan" else tiny_stylegan()
    x, cfg = G.sample(3, seed=4)[0], InversionConfig(steps=12, **changes)
    plain = invert(G, x, cfg, progress=False)
    assert _same(invert(G, x, cfg, out_dir=tmp_path / "whole", progress=False), plain)   # a folder changes nothing
    with monkeypatch.context() as m:
        _stop_after(m, k)
        with pytest.raises(Interrupted): invert(G, x, cfg, out_dir=tmp_path / "cut", progress=False)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    sizes = [min(cfg.batch_size, 3 - i) for _ in range(cfg.restarts) for i in range(0, 3, cfg.batch_size)]
    assert state["done"] == k and len(_log(tmp_path / "cut")) == sum(sizes[:k])    # one record per image finished
    resumed = invert(G, x, cfg, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert _same(resumed, plain)
    log = _log(tmp_path / "cut")
    assert sorted((r["restart"], r["image"]) for r in log) == [(r, i) for r in range(cfg.restarts) for i in range(3)]
    assert all(r["seconds"] >= 0 and r["psnr"] > 0 for r in log)
    assert (tmp_path / "cut" / "checkpoint.prev.pt").exists()


def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    G = tiny_generator()
    x, cfg = G.sample(2, seed=4)[0], InversionConfig(steps=5)
    invert(G, x, cfg, out_dir=tmp_path, progress=False)
    where = re.escape(str(tmp_path))
    for images, other in [(G.sample(2, seed=5)[0], cfg), (x, cfg.replace(steps=6)), (x, cfg.replace(seed=1))]:
        with pytest.raises(CheckpointError, match=f"{where}.*other settings.*use the same settings, or another"):
            invert(G, images, other, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"'steps': \(5, 6\)"):
        invert(G, x, cfg.replace(steps=6), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="'images'"):
        invert(G, G.sample(2, seed=5)[0], cfg, out_dir=tmp_path, resume=True, progress=False)


def test_a_finished_run_is_not_overwritten_without_overwrite(monkeypatch, tmp_path):
    G = tiny_generator()
    x, cfg = G.sample(2, seed=4)[0], InversionConfig(steps=5, batch_size=1)
    first = invert(G, x, cfg, out_dir=tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"checkpoint.pt", "checkpoint.prev.pt", "log.jsonl"}
    with pytest.raises(FileExistsError, match=f"{re.escape(str(tmp_path))} already holds a run.*overwrite=True"):
        invert(G, x, cfg, out_dir=tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with monkeypatch.context() as m:                     # resuming a finished run searches nothing
        _stop_after(m, 0)
        assert _same(invert(G, x, cfg, out_dir=tmp_path, resume=True, progress=False), first)
    assert _same(invert(G, x, cfg, out_dir=tmp_path, overwrite=True, progress=False), first)
    assert len(_log(tmp_path)) == 2


def test_resume_needs_a_folder_and_starts_fresh_in_an_empty_one(tmp_path):
    G = tiny_generator()
    x, cfg = G.sample(2, seed=4)[0], InversionConfig(steps=5)
    with pytest.raises(ValueError, match="resume=True needs the out_dir"): invert(G, x, cfg, resume=True)
    assert _same(invert(G, x, cfg, out_dir=tmp_path / "new", resume=True, progress=False), invert(G, x, cfg,
                                                                                                   progress=False))


def test_inversion_annotator_resumes_after_an_interrupted_fit(monkeypatch, tmp_path):
    G = tiny_generator()
    lab = LabelledImages(G.sample(3, seed=4)[0], torch.randint(0, 3, (3, 32, 32), generator=torch.Generator()), 3)
    cfg, fit = InversionConfig(steps=8, restarts=2, batch_size=2), dict(fit_steps=4, progress=False)
    def fresh(): torch.manual_seed(0); return FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8)
    A0, inv0 = inversion_annotator(G, fresh(), lab, cfg, **fit)
    A1, inv1 = inversion_annotator(G, fresh(), lab, cfg, out_dir=tmp_path / "whole", **fit)
    def crash(*args, **kwargs): raise Interrupted("simulated interruption")
    with monkeypatch.context() as m:
        m.setattr(inversion, "fit_annotator", crash)
        with pytest.raises(Interrupted): inversion_annotator(G, fresh(), lab, cfg, out_dir=tmp_path / "cut", **fit)
    with monkeypatch.context() as m:                     # the inversion is done: it is not searched again
        _stop_after(m, 0)
        A2, inv2 = inversion_annotator(G, fresh(), lab, cfg, out_dir=tmp_path / "cut", resume=True, **fit)
    with monkeypatch.context() as m:                     # and once fitted, the annotator is loaded, not fitted
        m.setattr(inversion, "fit_annotator", crash)
        A3, _ = inversion_annotator(G, fresh(), lab, cfg, out_dir=tmp_path / "cut", resume=True, **fit)
    assert _same(inv1, inv0) and _same(inv2, inv0)
    for A in (A1, A2, A3):
        assert all(torch.equal(A.state_dict()[k], v) for k, v in A0.state_dict().items()) and not A.training
    assert "fit_steps" in _log(tmp_path / "cut")[-1]
    with pytest.raises(CheckpointError, match="other settings.*'annotator'"):        # not the annotator it started from
        inversion_annotator(G, A0, lab, cfg, out_dir=tmp_path / "cut", resume=True, **fit)
    with pytest.raises(CheckpointError, match="'fit_steps': \\(4, 5\\)"):
        inversion_annotator(G, fresh(), lab, cfg, out_dir=tmp_path / "cut", resume=True, fit_steps=5, progress=False)


def test_the_harness_inversion_row_resumes_in_its_work_folder(monkeypatch, tmp_path):
    from lagm_nb.bench.harness import SMOKE, Benchmark, ResultStore, RowSettings, inverted_annotator
    from lagm_nb.testing import TeacherLabeller
    G = tiny_generator()
    z = G.latents(8, seed=5)
    pool = LabelledImages(G.sample(z=z)[0], TeacherLabeller(G, 3)(z), 3)
    bench = Benchmark("toy", ["a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 0, 255)], {"gen": pool}, {"gen": pool},
                      pool, generators=lambda name: G, generator_names=["tiny"], sources={"": "gen"})
    cfg = RowSettings(**{k: v for k, v in SMOKE.items() if k not in ("n_val", "n_test")})
    whole = inverted_annotator(ResultStore(tmp_path / "a"), bench, cfg, "gen", 4, 0)
    store = ResultStore(tmp_path / "b")
    def crash(*args, **kwargs): raise Interrupted("simulated interruption")
    with monkeypatch.context() as m:                     # killed while fitting: the inversion is checkpointed
        m.setattr(inversion, "fit_annotator", crash)
        with pytest.raises(Interrupted): inverted_annotator(store, bench, cfg, "gen", 4, 0)
    assert len(list((tmp_path / "b" / "work").rglob("checkpoint.pt"))) == 1
    with monkeypatch.context() as m:                     # the rerun resumes it instead of searching again
        _stop_after(m, 0)
        again = inverted_annotator(store, bench, cfg, "gen", 4, 0)
    assert again.key == whole.key and again.result["psnr"] == whole.result["psnr"]
    a, b = whole.tensors(), again.tensors()
    assert all(torch.equal(a["annotator"][k], v) for k, v in b["annotator"].items())
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["reconstructions"], b["reconstructions"])
    assert not (tmp_path / "b" / "work").exists() or not any((tmp_path / "b" / "work").rglob("checkpoint.pt"))
