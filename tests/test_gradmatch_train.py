import pytest
import torch
from torch import nn
import torch.nn.functional as F

from lagm_nb.annotator import FPNAnnotator
from lagm_nb.testing import TeacherLabeller, tiny_generator
from lagm_nb.core import CheckpointError
from lagm_nb.gradmatch import GradientMatchingLoss, gradient_distance, row_cosine
from lagm_nb.segmenters import UNet
from lagm_nb.datasets import LabelledImages
from lagm_nb.train import GMConfig, train_gradient_matching


@pytest.fixture(scope="module")
def setup():
    G = tiny_generator()
    z = G.latents(6, seed=5)
    return G, LabelledImages(G.sample(z=z)[0], TeacherLabeller(G, 3)(z), 3)


def _nets(G, seed=0):
    torch.manual_seed(seed)
    return FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)


def test_conventions_weight_layers_differently():
    # paper: per-row sum, mean over tensors; authors: per-row mean, divided by all tensors incl. 1-D
    a = [torch.tensor([[1., 0], [1, 0], [1, 0], [1, 0]]), torch.tensor([[1., 0]]), torch.zeros(3)]
    b = [torch.tensor([[0., 1], [1, 0], [1, 0], [1, 0]]), torch.tensor([[0., 1]]), torch.ones(3)]
    assert gradient_distance(a, b, "sum") == pytest.approx((1 + 1) / 2, abs=1e-5)
    assert gradient_distance(a, b, "mean", n_tensors=3) == pytest.approx((0.25 + 1) / 3, abs=1e-5)


def test_authors_cosine_clamps_each_norm():
    # row 0: norms 1e-7 < eps, clamped to eps each: cos = 1e-14 / 1e-12 = 0.01 (eps added to the product: ~1e-8)
    # row 1: norms 5e-4 > eps, product 2.5e-7: clamping leaves cos = 24/25; eps added to the product gives 0.192
    a = torch.tensor([[1e-7, 0], [3e-4, 4e-4]], dtype=torch.double)
    b = torch.tensor([[1e-7, 0], [4e-4, 3e-4]], dtype=torch.double)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-6)
    assert cos.tolist() == pytest.approx([0.01, 0.96], rel=1e-12)
    assert torch.equal(row_cosine(a, b, 1e-6, "torch"), cos)
    assert row_cosine(a, b).tolist() == pytest.approx([1e-14 / (1e-14 + 1e-6), 0.192], rel=1e-9)
    lin = nn.Linear(2, 2).double()    # a weight and a bias: the authors divide by both tensors
    rows = 1 - cos                    # distances 0.99 and 0.04
    expect = {"authors": rows.mean().item() / 2, "authors_sum": rows.sum().item() / 2,
              "paper": (1 - row_cosine(a, b)).sum().item()}
    assert expect["authors"] == pytest.approx(0.2575) and expect["authors_sum"] == pytest.approx(0.515)
    for convention, value in expect.items():
        assert GradientMatchingLoss(lin, convention=convention)([a], [b]).item() == pytest.approx(value, rel=1e-12)


def test_authors_convention_has_torchs_gradient():
    a = torch.tensor([[2e-7, 1e-7], [3e-4, 4e-4]], dtype=torch.double)
    b = torch.tensor([[1e-7, 3e-7], [4e-4, -3e-4]], dtype=torch.double, requires_grad=True)
    ours = torch.autograd.grad(GradientMatchingLoss(nn.Linear(2, 2), convention="authors")([a], [b]), b)[0]
    theirs = torch.autograd.grad((1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)).mean() / 2, b)[0]
    assert torch.equal(ours, theirs)


def test_head_only_matching_of_unet():
    gm = GradientMatchingLoss(UNet(3, width=4), "head")
    assert gm.names == ["up4.conv.double_conv.3.weight", "outc.conv.weight"]


def test_small_class_rows_get_gradient(setup):
    G, lab = setup
    S = UNet(3, width=4)
    gm = GradientMatchingLoss(S, r"outc\.conv\.weight")
    masks = lab.masks.clone(); masks[:, :2, :2] = 2   # a tiny part
    g = gm.gradients(lab.images, masks)[0]
    assert (g.flatten(1).norm(dim=1) > 0).all()


def test_segmenter_updates_every_k_steps(setup):
    G, lab = setup
    A, S = _nets(G)
    before = [p.detach().clone() for p in S.parameters()]
    train_gradient_matching(G, A, S, lab, GMConfig(steps=1, segmenter_every=2), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, S.parameters()))
    train_gradient_matching(G, A, S, lab, GMConfig(steps=2, segmenter_every=2), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, S.parameters()))


def test_segmenter_size_and_head_matching(setup):
    G, lab = setup
    A, S = _nets(G)
    r = train_gradient_matching(G, A, S, lab, GMConfig(steps=2, segmenter_size=16, match="head", log_every=1,
                                                       annotator_optimizer="adam"), val=lab, progress=False)
    assert [h["step"] for h in r.history if "gm_loss" in h] == [1, 2]
    assert "val_miou" in r.history[-1]


def test_resume_with_another_architecture_names_the_keys(setup, tmp_path):
    G, lab = setup
    A, S = _nets(G)
    train_gradient_matching(G, A, S, lab, GMConfig(steps=1), out_dir=tmp_path, progress=False)
    A2 = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=16)
    with pytest.raises(CheckpointError, match="annotator in .*checkpoint.pt does not fit FPNAnnotator"):
        train_gradient_matching(G, A2, UNet(3, width=4), lab, GMConfig(steps=2), out_dir=tmp_path, resume=True, progress=False)


def test_resume_needs_out_dir(setup):
    G, lab = setup
    A, S = _nets(G)
    with pytest.raises(ValueError, match="out_dir"):
        train_gradient_matching(G, A, S, lab, GMConfig(steps=1), resume=True, progress=False)


def test_images_of_the_wrong_range_are_refused():
    with pytest.raises(ValueError, match="127.5"):
        LabelledImages(torch.full((1, 3, 4, 4), 200.), torch.zeros(1, 4, 4, dtype=torch.long), 2)


def _params(net): return [p.detach().clone() for p in net.parameters()]


def test_fixed_segmenter_is_never_updated(setup):
    G, lab = setup
    A, S = _nets(G)
    before = _params(S)
    cfg = GMConfig(steps=3, segmenter_state="fixed", eval_every=10, log_every=1)
    res = train_gradient_matching(G, A, S, lab, cfg, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, res.segmenter.parameters()))
    assert all(r["seg_loss"] is None for r in res.history if "gm_loss" in r)


def test_reinit_segmenter_holds_the_fresh_weights_of_its_last_redraw(setup):
    from lagm_nb.core import step_seed
    G, lab = setup
    A, S = _nets(G)
    cfg = GMConfig(steps=4, segmenter_state="reinit", reinit_every=2, eval_every=10)
    res = train_gradient_matching(G, A, S, lab, cfg, progress=False)
    drawn = UNet(3, width=4).fresh(step_seed(cfg.seed, 4, "reinit"))
    assert all(torch.equal(a, b) for a, b in zip(res.segmenter.parameters(), drawn.parameters()))
    with pytest.raises(ValueError, match="segmenter_state must be one of"):
        train_gradient_matching(G, *_nets(G), lab, cfg.replace(segmenter_state="frozen"), progress=False)


def test_resuming_a_checkpoint_from_before_a_setting_existed(setup, tmp_path):
    # a checkpoint that does not record `segmenter_state` (written before it existed) resumes as its default
    from lagm_nb.core import load_checkpoint, save_checkpoint
    G, lab = setup
    cfg = GMConfig(steps=2, checkpoint_every=1, eval_every=10)
    train_gradient_matching(G, *_nets(G), lab, cfg, out_dir=tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt", "gm_run")
    del ck["settings"]["segmenter_state"], ck["lagm_nb_kind"]
    save_checkpoint(ck, tmp_path / "checkpoint.pt", "gm_run")
    res = train_gradient_matching(G, *_nets(G), lab, cfg.replace(steps=3), out_dir=tmp_path, resume=True, progress=False)
    assert res.history[-1]["step"] == 3


def test_callbacks_see_every_record_and_change_nothing(setup):
    G, lab = setup
    cfg = GMConfig(steps=4, log_every=2, eval_every=2)
    events = []
    def draw(event):   # what a dashboard does: label fixed latents with the annotator
        with torch.no_grad(): event["annotator"].eval()(event["generator"].sample(2, seed=9)[1])
        events.append((event["kind"], event["record"]["step"]))
    watched = train_gradient_matching(G, *_nets(G), lab, cfg, val=lab, callbacks=[draw], progress=False)
    plain = train_gradient_matching(G, *_nets(G), lab, cfg, val=lab, progress=False)
    assert events == [("log", 2), ("eval", 2), ("log", 4), ("eval", 4)]
    assert all(torch.equal(a, b) for a, b in zip(watched.annotator.state_dict().values(), plain.annotator.state_dict().values()))


def test_bf16_matching_loss_stays_within_5_percent_of_fp32(setup):
    from lagm_nb.train import annotator_step
    G, lab = setup
    losses = {}
    for precision in ("fp32", "bf16"):
        A, S = _nets(G)
        gm = GradientMatchingLoss(S, "all")
        opt = torch.optim.SGD(A.parameters(), lr=0.0)     # the same annotator at every step
        cfg = GMConfig(precision=precision, batch_size=2)
        losses[precision] = [annotator_step(gm, G, A, opt, lab, cfg, t, "cpu").item() for t in (1, 2, 3)]
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    with pytest.raises(ValueError, match="precision must be"):
        annotator_step(gm, G, A, opt, lab, GMConfig(precision="fp16"), 1, "cpu")


def _finished(G, lab, tmp_path, labelled=None):
    "The folder of a finished 2-step gradient-matching run, checkpointed at step 2."
    train_gradient_matching(G, *_nets(G), lab if labelled is None else labelled, GMConfig(steps=2, checkpoint_every=2),
                            out_dir=tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_refused_resumes_leave_the_run_as_it_was(setup, tmp_path, unchanged):
    G, lab = setup
    run = _finished(G, lab, tmp_path)
    cfg = GMConfig(steps=4, checkpoint_every=2)
    cases = [  # (generator, labelled, config, resume, error, message)
        (G, lab, cfg, False, FileExistsError, "already holds a run"),
        (G, lab, cfg.replace(annotator_lr=0.1), True, CheckpointError, r"other settings .*'annotator_lr'"),
        (G, lab.subset([0, 1, 2]), cfg, True, CheckpointError, r"other settings .*'labelled'"),
        (tiny_generator(seed=1), lab, cfg, True, CheckpointError, r"other settings .*'generator'"),
    ]
    for generator, labelled, config, resume, error, message in cases:
        with unchanged(run), pytest.raises(error, match=message):
            train_gradient_matching(generator, *_nets(G), labelled, config, out_dir=run, resume=resume, progress=False)


def test_resume_with_other_batches_is_refused(setup, tmp_path, unchanged):
    G, lab = setup
    run = _finished(G, lab, tmp_path, labelled=lambda t: (lab.images[:2], lab.masks[:2]))
    with unchanged(run), pytest.raises(CheckpointError, match=r"other settings .*'labelled_batches'"):
        train_gradient_matching(G, *_nets(G), lambda t: (lab.images[2:4], lab.masks[2:4]), GMConfig(steps=4),
                                out_dir=run, resume=True, progress=False)
    res = train_gradient_matching(G, *_nets(G), lambda t: (lab.images[:2], lab.masks[:2]), GMConfig(steps=3),
                                  out_dir=run, resume=True, progress=False)    # the same batches: it continues
    assert res.history[-1]["step"] == 3


def test_class_counts_are_checked_before_anything_runs(setup, tmp_path, unchanged):
    G, lab = setup
    run = _finished(G, lab, tmp_path)
    nets = lambda a, s: (FPNAnnotator(G.feature_shapes, a, G.image_size, width=8), UNet(s, width=4))
    twos = lambda t: (lab.images[:2], torch.full_like(lab.masks[:2], 2))
    cases = [  # annotator 5 / segmenter 5 / labels of 3 used to run; 2 / 2 / 3 used to end in torch's IndexError
        (nets(5, 5), lab, "class counts differ: the labelled 3, the annotator 5, the segmenter 5; build them"),
        (nets(2, 2), lab, "the labelled 3, the annotator 2, the segmenter 2"),
        (nets(2, 2), twos, r"the first batch of the batch source has labels from 2 to 2 \(at least 3 classes\), "
                           "the annotator 2, the segmenter 2; build the networks"),
    ]
    for (A, S), labelled, message in cases:
        with unchanged(run), pytest.raises(ValueError, match=message):
            train_gradient_matching(G, A, S, labelled, GMConfig(steps=4), out_dir=run, resume=True, progress=False)


def test_a_nan_gradient_stops_the_run_before_its_checkpoint(setup, tmp_path, unchanged, nan_gradient):
    G, lab = setup
    run = _finished(G, lab, tmp_path)
    A, S = _nets(G)
    nan_gradient(S.outc.conv.weight, call=2)    # the segmenter's own update at step 4 (a checkpoint step)
    with unchanged(run), pytest.raises(FloatingPointError, match=r"gradient matching: the segmenter's outc.conv.weight "
                                       "became NaN or infinite between steps 3 and 4 while the losses stayed finite"):
        train_gradient_matching(G, A, S, lab, GMConfig(steps=6, checkpoint_every=2), out_dir=run, resume=True,
                                progress=False)


def test_a_nan_gradient_entry_under_a_finite_matching_loss_is_still_zeroed(setup):
    from lagm_nb.train import update_annotator
    G, _ = setup
    A, _ = _nets(G)
    before = [p.detach().clone() for p in A.parameters()]
    loss = (A.head[-1].weight * 0).abs().sqrt().sum()          # 0, with the gradient 0/0 = NaN
    assert loss.item() == 0 and torch.isnan(torch.autograd.grad(loss, A.head[-1].weight, retain_graph=True)[0]).all()
    update_annotator(loss, A, torch.optim.SGD(A.parameters(), lr=0.1, momentum=0.9))
    assert all(torch.equal(a, b) for a, b in zip(before, A.parameters()))


@pytest.mark.parametrize("kind", ["fpn", "pixel_mlp"])
def test_bf16_fit_annotator_loss_stays_within_5_percent_of_fp32(setup, kind):
    from lagm_nb.annotator import PixelMLPAnnotator
    from lagm_nb.gradmatch import segmentation_loss
    from lagm_nb.train import fit_annotator
    G, _ = setup
    z = G.latents(8, seed=7)
    y = TeacherLabeller(G, 3)(z)
    fitted = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        A = (FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8) if kind == "fpn" else
             PixelMLPAnnotator(G.feature_shapes, 3, G.image_size, n_members=2))
        fitted[precision] = fit_annotator(G, A, z, y, steps=20, batch_size=4, precision=precision, progress=False)
    with torch.no_grad():
        loss = {p: segmentation_loss(A(G.sample(z=z)[1]), y).item() for p, A in fitted.items()}   # scored in fp32
    assert not all(torch.equal(a, b) for a, b in zip(fitted["fp32"].parameters(), fitted["bf16"].parameters()))
    assert loss["bf16"] == pytest.approx(loss["fp32"], rel=0.05)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', not 'fp16'"):
        fit_annotator(G, fitted["fp32"], z, y, steps=1, precision="fp16", progress=False)


def test_the_weight_average_is_returned_and_resumes_exactly(setup, tmp_path):
    from lagm_nb.core import load_checkpoint
    G, lab = setup
    cfg = GMConfig(steps=6, checkpoint_every=3, eval_every=3, annotator_ema=0.5, annotator_optimizer="adam")
    full = train_gradient_matching(G, *_nets(G), lab, cfg, out_dir=tmp_path / "full", progress=False)
    live = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "gm_run")
    assert torch.equal(full.annotator.state_dict()["head.6.weight"], live["annotator_average"]["head.6.weight"])
    assert not torch.equal(live["annotator"]["head.6.weight"], live["annotator_average"]["head.6.weight"])
    train_gradient_matching(G, *_nets(G), lab, cfg.replace(steps=3), out_dir=tmp_path / "resumed", progress=False)
    resumed = train_gradient_matching(G, *_nets(G, seed=1), lab, cfg, out_dir=tmp_path / "resumed", resume=True,
                                      progress=False)
    for a, b in zip(full.annotator.state_dict().values(), resumed.annotator.state_dict().values()):
        assert torch.equal(a, b)
    plain = train_gradient_matching(G, *_nets(G), lab, cfg.replace(annotator_ema=0.0), progress=False)
    assert not torch.equal(plain.annotator.head[6].weight, full.annotator.head[6].weight)
