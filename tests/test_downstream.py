import pytest
import torch

from lagm_nb.annotator import FPNAnnotator
from lagm_nb.downstream import augment, class_balance_weights, labelled_batches, synthetic_batches, train_segmenter
from lagm_nb.testing import tiny_generator
from lagm_nb.segmenters import UNet
from lagm_nb.datasets import LabelledImages


def test_zoom_out_marks_outside_pixels_ignored():
    x, y = torch.zeros(4, 3, 16, 16), torch.ones(4, 16, 16, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    _, ya = augment(x, y, g, flip=False, scale=0.0, shift=0.3, jitter=0.0)
    assert (ya == 255).any() and set(ya.unique().tolist()) <= {1, 255}


def test_augment_keeps_images_in_range():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    xa, _ = augment(x, torch.zeros(3, 8, 8, dtype=torch.long), torch.Generator().manual_seed(1), jitter=0.9)
    assert xa.min() >= -1 and xa.max() <= 1


def test_batch_sources_are_reproducible_and_typed():
    G = tiny_generator()
    A = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8)
    soft, hard = synthetic_batches(G, A, 50, 4, soft=True), synthetic_batches(G, A, 50, 4, soft=False)
    x1, q = soft(3)
    x2, y = hard(3)
    assert torch.equal(x1, x2) and q.shape == (4, 3, 32, 32) and y.dtype == torch.long
    assert torch.allclose(q.sum(1), torch.ones(4, 32, 32), atol=2e-3)   # labels are stored as float16
    assert torch.equal(q.argmax(1), y)
    data = LabelledImages(G.sample(3, seed=0)[0], torch.zeros(3, 32, 32, dtype=torch.long), 3)
    src = labelled_batches(data, 5, seed=2)
    assert torch.equal(src(7)[0], src(7)[0]) and src(7)[0].shape == (5, 3, 32, 32)



def test_temperature_is_a_sharpened_softmax_of_the_annotator_logits():
    G = tiny_generator()
    A = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8)
    q1, q3 = (synthetic_batches(G, A, 20, 2, temperature=t, progress=False)(5)[1] for t in (1.0, 1 / 3))
    # softmax(l / T) with T = 1/3 is q1 ** 3, renormalised
    expected = q1 ** 3 / (q1 ** 3).sum(1, keepdim=True)
    assert torch.allclose(q3, expected, atol=5e-3)
    with pytest.raises(ValueError, match="temperature must be positive"):
        synthetic_batches(G, A, 20, 2, temperature=-1.0)

def test_best_validation_weights_are_restored():
    G = tiny_generator()
    data = LabelledImages(G.sample(4, seed=0)[0], torch.randint(0, 3, (4, 32, 32)), 3)
    run = train_segmenter(UNet(3, width=4), labelled_batches(data, 2), 4, val=data, eval_every=1, progress=False)
    vals = [r["val_miou"] for r in run.history if "val_miou" in r]
    assert run.best_val_miou == max(vals) and run.best_step == 1 + vals.index(max(vals))


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        train_segmenter(UNet(3, width=4), lambda t: None, 1, optimizer="lbfgs", progress=False)


def test_nan_batch_stops_training_before_the_checkpoint(tmp_path):
    from lagm_nb.core import load_checkpoint
    data = LabelledImages(torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 3, (4, 16, 16)), 3)
    def batches(t):
        x, y = data.images[:2], data.masks[:2]
        return (x * float("nan") if t == 3 else x), y
    with pytest.raises(FloatingPointError, match="between steps 3 and 4"):
        train_segmenter(UNet(3, width=4), batches, 6, checkpoint_every=2, out_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt", "segmenter_run")["step"] == 2


def test_class_counts_must_agree():
    data = LabelledImages(torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 3, (4, 16, 16)), 3)
    with pytest.raises(ValueError, match="the segmenter 5, the val 3"):
        train_segmenter(UNet(5, width=4), labelled_batches(data), 2, val=data, progress=False)


def _finished_run(tmp_path, data):
    "The folder of a finished 2-step segmenter run on `labelled_batches(data, 2)`, checkpointed at step 2."
    torch.manual_seed(0)
    train_segmenter(UNet(3, width=4), labelled_batches(data, 2), 2, checkpoint_every=2, out_dir=tmp_path / "run",
                    progress=False)
    return tmp_path / "run"


def _data():
    return LabelledImages(torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 3, (4, 16, 16)), 3)


def test_refused_calls_leave_an_existing_run_as_it_was(tmp_path, unchanged):
    from lagm_nb.core import CheckpointError
    data = _data()
    run = _finished_run(tmp_path, data)
    twos = lambda t: (data.images[:2], torch.full_like(data.masks[:2], 2))
    cases = [  # (segmenter classes, batches, train_segmenter keywords, error, message)
        (3, labelled_batches(data, 2), {"resume": False}, FileExistsError, "already holds a run"),
        (3, labelled_batches(data, 2), {"lr": 1e-2}, CheckpointError, r"other settings .*'lr'"),
        (3, labelled_batches(data.subset([0, 1]), 2), {}, CheckpointError, r"other settings .*'batches'"),
        (3, lambda t: (data.images[:2], data.masks[:2]), {}, CheckpointError, r"other settings .*'batches'"),
        (5, labelled_batches(data, 2), {}, ValueError, "class counts differ: the labels 3, the segmenter 5"),
        (2, twos, {}, ValueError, r"labels from 2 to 2 \(at least 3 classes\), the segmenter 2; build the networks"),
        (3, labelled_batches(data, 2), {"class_weights": torch.tensor([1.0, 2.0, 3.0])}, CheckpointError,
         r"other settings .*'class_weights'"),
        (3, labelled_batches(data, 2), {"class_weights": torch.ones(2)}, ValueError, "2 entries, the segmenter 3 classes"),
    ]
    for n, batches, kw, error, message in cases:
        with unchanged(run), pytest.raises(error, match=message):
            train_segmenter(UNet(n, width=4), batches, 4, checkpoint_every=2, out_dir=run,
                            **{"resume": True, **kw}, progress=False)
    # the same data under another batch size is other batches; `data=` names the batches instead of their fingerprint
    with unchanged(run), pytest.raises(CheckpointError, match="'batches'"):
        train_segmenter(UNet(3, width=4), labelled_batches(data, 3), 4, out_dir=run, resume=True, progress=False)


def test_class_weights_change_the_training_and_equal_weights_do_not():
    data = _data()
    def final_weights(class_weights):
        torch.manual_seed(0)
        S = train_segmenter(UNet(3, width=4), labelled_batches(data, 2), 3, class_weights=class_weights,
                            progress=False).segmenter
        return torch.cat([p.flatten() for p in S.parameters()])
    plain = final_weights(None)
    assert torch.allclose(final_weights(torch.ones(3)), plain)
    assert not torch.allclose(final_weights(class_balance_weights(data.masks, 3, power=1.0) * torch.tensor([1.0, 1.0, 5.0])),
                              plain)


def test_resume_with_the_same_batches_continues(tmp_path):
    data = _data()
    run = _finished_run(tmp_path, data)
    res = train_segmenter(UNet(3, width=4), labelled_batches(data, 2), 4, checkpoint_every=2, out_dir=run,
                          resume=True, progress=False)
    assert res.history[-1]["step"] == 4


def test_a_nan_gradient_stops_the_run_before_its_checkpoint(tmp_path, unchanged):
    data = _data()
    run = _finished_run(tmp_path, data)
    S, calls = UNet(3, width=4), []
    def poison(g):      # the gradient of the step after the resumed one (step 4, a checkpoint step) is NaN
        calls.append(1)
        return g * float("nan") if len(calls) == 2 else g
    next(S.parameters()).register_hook(poison)
    with unchanged(run), pytest.raises(FloatingPointError, match=r"segmenter: the segmenter's \S+ became NaN or "
                                       r"infinite between steps 3 and 4 while the losses stayed finite"):
        train_segmenter(S, labelled_batches(data, 2), 6, checkpoint_every=2, out_dir=run, resume=True, progress=False)


def test_bf16_training_loss_stays_within_5_percent_of_fp32_and_is_a_setting_of_the_run(tmp_path):
    from lagm_nb.core import CheckpointError
    G = tiny_generator()
    masks = torch.randint(0, 3, (8, 32, 32), generator=torch.Generator().manual_seed(0))
    data = LabelledImages(G.sample(8, seed=7)[0], masks, 3)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        run = train_segmenter(UNet(3, width=4), labelled_batches(data, 4, seed=0), 4, precision=precision,
                              out_dir=tmp_path / precision, progress=False)
        losses[precision] = run.history[-1]["loss"]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    with pytest.raises(CheckpointError, match="'precision': \\('fp32', 'bf16'\\)"):   # a resume keeps the precision
        train_segmenter(UNet(3, width=4), labelled_batches(data, 4, seed=0), 6, precision="bf16",
                        out_dir=tmp_path / "fp32", resume=True, progress=False)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', not 'half'"):
        train_segmenter(UNet(3, width=4), labelled_batches(data, 4, seed=0), 1, precision="half", progress=False)


def test_zoom_shrinks_the_content_and_is_part_of_the_batches_fingerprint():
    x, y = torch.zeros(2, 3, 16, 16), torch.ones(2, 16, 16, dtype=torch.long)
    _, half = augment(x, y, torch.Generator().manual_seed(0), flip=False, scale=0, shift=0, jitter=0, zoom=0.5)
    assert (half != 255).sum() == 2 * 8 * 8 and (half[:, 4:12, 4:12] == 1).all()
    data = LabelledImages(torch.full((3, 3, 16, 16), -0.5), torch.ones(3, 16, 16, dtype=torch.long), 2)
    plain, zoomed = labelled_batches(data, 2, seed=1), labelled_batches(data, 2, seed=1, zoom=0.7)
    assert plain.__fingerprint__() == labelled_batches(data, 2, seed=1, zoom=1.0).__fingerprint__()
    assert plain.__fingerprint__() != zoomed.__fingerprint__()
    assert (zoomed(3)[1] == 255).sum() > (plain(3)[1] == 255).sum()
    with pytest.raises(ValueError, match="augmented=True"): labelled_batches(data, 2, augmented=False, zoom=0.7)
