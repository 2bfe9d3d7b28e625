import copy, math

import pytest
import torch
from torch import nn

from lagm_nb.core import CheckpointError
from lagm_nb.datasets import LabelledImages
from lagm_nb.downstream import labelled_batches, train_segmenter
from lagm_nb.meanteacher import (MeanTeacherConfig, consistency_loss, consistency_weight, ema_decay,
                                 mean_teacher_step, train_mean_teacher, unlabelled_batches)
from lagm_nb.segmenters import UNet
from lagm_nb.testing import tiny_generator

CFG = MeanTeacherConfig(batch_size=2, unlabelled_batch_size=2, rampup_steps=4, log_every=1)


@pytest.fixture(scope="module")
def data():
    G = tiny_generator()
    x = G.sample(12, seed=3)[0]
    labelled = LabelledImages(x[:4], torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(0)), 3)
    return labelled, x[4:]


def _fresh(seed=0):
    torch.manual_seed(seed)
    return UNet(3, width=4)


def _same(a: nn.Module, b: nn.Module):
    return all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


def test_teacher_is_the_ema_of_the_student(data):
    labelled, pool = data
    student = _fresh()
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():   # a teacher that differs from the student, so that the average is visible
        for p in teacher.parameters(): p.add_(0.1)
    old = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    src = unlabelled_batches(pool, 2, (32, 32))
    mean_teacher_step(student, teacher, opt, labelled_batches(labelled, 2), src, CFG, step=1)
    params = dict(student.named_parameters())
    for k, v in teacher.state_dict().items():   # teacher_new = decay * teacher_old + (1 - decay) * student_new
        expected = 0.99 * old[k] + 0.01 * params[k].detach() if k in params else student.state_dict()[k]
        assert torch.allclose(v, expected, atol=1e-6), k
    assert not any(p.requires_grad for p in teacher.parameters())


def test_without_unlabelled_data_the_student_is_the_supervised_baseline(data):
    labelled, pool = data
    student = _fresh()
    train_mean_teacher(student, labelled, None, 4, config=CFG, seed=3, progress=False)
    baseline = train_segmenter(_fresh(), labelled_batches(labelled, CFG.batch_size, seed=3), 4, seed=3, progress=False)
    assert _same(student, baseline.segmenter)
    with_unlabelled = _fresh()
    train_mean_teacher(with_unlabelled, labelled, pool, 4, config=CFG, seed=3, progress=False)
    assert not _same(with_unlabelled, student)


def test_consistency_ramp_up_and_ema_schedule():
    cfg = MeanTeacherConfig(rampup_steps=10, consistency_weight=3.0, ema_decay_after_rampup=0.999)
    assert consistency_weight(0, cfg) == pytest.approx(3 * math.exp(-5))
    assert consistency_weight(5, cfg) == pytest.approx(3 * math.exp(-5 * 0.25))
    assert consistency_weight(9, cfg) == pytest.approx(3 * math.exp(-5 * 0.01))
    assert consistency_weight(10, cfg) == consistency_weight(500, cfg) == 3.0
    assert [ema_decay(t, cfg) for t in (0, 9, 10)] == [0.99, 0.99, 0.999]


def test_consistency_loss_is_the_mse_of_softmax_outputs_and_spares_the_teacher():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = consistency_loss(s, t)
    assert torch.allclose(loss, ((s.softmax(1) - t.softmax(1)) ** 2).mean())
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_resume_is_bit_exact(data, tmp_path):
    labelled, pool = data
    cfg = CFG.replace(eval_every=2)   # the stop at step 2 is a validation step of the straight run too
    straight = _fresh()
    a = train_mean_teacher(straight, labelled, pool, 4, config=cfg, val=labelled, out_dir=tmp_path / "a",
                           progress=False)
    train_mean_teacher(_fresh(), labelled, pool, 2, config=cfg, val=labelled, out_dir=tmp_path / "b", progress=False)
    resumed = _fresh(seed=1)
    b = train_mean_teacher(resumed, labelled, pool, 4, config=cfg, val=labelled, out_dir=tmp_path / "b", resume=True,
                           progress=False)
    assert _same(straight, resumed) and _same(a.segmenter, b.segmenter)
    assert (a.best_step, a.best_val_miou) == (b.best_step, b.best_val_miou) and a.history == b.history
    with pytest.raises(CheckpointError, match="other settings"):
        train_mean_teacher(_fresh(), labelled, pool, 4, config=cfg.replace(consistency_weight=2.0), val=labelled,
                           out_dir=tmp_path / "b", resume=True, progress=False)


def test_returns_the_teacher_with_the_best_validation_miou(data):
    labelled, pool = data
    run = train_mean_teacher(_fresh(), labelled, pool, 4, config=CFG.replace(eval_every=1), val=labelled,
                             progress=False)
    vals = [r["val_miou"] for r in run.history if "val_miou" in r]
    assert len(vals) == 4 and run.best_val_miou == max(vals) and run.best_step == 1 + vals.index(max(vals))
    assert all("student_val_miou" in r for r in run.history if "val_miou" in r)


def test_bad_unlabelled_images_raise_clear_errors(data):
    labelled, pool = data
    def go(unlabelled): train_mean_teacher(_fresh(), labelled, unlabelled, 1, config=CFG, progress=False)
    with pytest.raises(ValueError, match="16x16 pixels but must be 32x32"): go(pool[..., :16, :16])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"): go(pool * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\] data"): go((pool + 1) / 2)
    with pytest.raises(ValueError, match="channel-last"): go(pool.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="unlabelled batch of step 1.*16x16"): go(lambda t: pool[:2, :, :16, :16])


def test_refused_calls_and_a_nan_stop_leave_the_run_as_it_was(data, tmp_path, unchanged):
    labelled, unlabelled = data
    run, cfg = tmp_path / "run", CFG.replace(checkpoint_every=2)
    train_mean_teacher(_fresh(), labelled, unlabelled, 2, config=cfg, out_dir=run, progress=False)
    with unchanged(run), pytest.raises(ValueError, match="class counts differ: the labelled 3, the segmenter 5"):
        train_mean_teacher(UNet(5, width=4), labelled, unlabelled, 4, config=cfg, out_dir=run, resume=True,
                           progress=False)
    with unchanged(run), pytest.raises(FileExistsError, match="already holds a run"):
        train_mean_teacher(_fresh(), labelled, unlabelled, 4, config=cfg, out_dir=run, progress=False)
    student, calls = _fresh(), []
    def poison(g):      # the student's gradient at step 3, the first after the checkpoint, is NaN
        calls.append(1)
        return g * float("nan") if len(calls) == 1 else g
    next(student.parameters()).register_hook(poison)
    with unchanged(run), pytest.raises(FloatingPointError, match=r"mean teacher: the student's \S+ became NaN or "
                                       "infinite between steps 3 and 3 while the losses stayed finite"):
        train_mean_teacher(student, labelled, unlabelled, 6, config=cfg, out_dir=run, resume=True, progress=False)


def test_bf16_losses_stay_close_to_fp32(data):
    labelled, pool = data
    hist = {p: train_mean_teacher(_fresh(), labelled, pool, 4, config=CFG, precision=p, progress=False).history
            for p in ("fp32", "bf16")}
    sup = {p: [r["sup_loss"] for r in h] for p, h in hist.items()}
    cons = {p: [r["consistency"] for r in h] for p, h in hist.items()}
    assert sup["bf16"] != sup["fp32"] and sup["bf16"] == pytest.approx(sup["fp32"], rel=0.05)   # losses ~1.2
    assert cons["bf16"] == pytest.approx(cons["fp32"], abs=1e-3)                                  # MSEs ~3e-3
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        train_mean_teacher(_fresh(), labelled, pool, 1, config=CFG, precision="fp16", progress=False)
