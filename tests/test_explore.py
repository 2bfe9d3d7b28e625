"""The explorer and the training dashboard, driven from Python on the tiny generator with untrained annotators: every
control changes the picture as it should and recomputes only what changed; the dashboard records what it draws,
does nothing outside a Jupyter kernel, and leaves a training run exactly as it would be without it."""
import re
from unittest import mock

import numpy as np
import pytest
import torch

from lagm_nb.annotator import FPNAnnotator
from lagm_nb.bench.gantrain import image_grid
from lagm_nb.datasets import LabelledImages
from lagm_nb.downstream import labelled_batches, train_segmenter
from lagm_nb.core import CheckpointError
from lagm_nb.factory import save_annotator
from lagm_nb.explore import (AnnotatorExplorer, GeneratorChoice, TrainingDashboard, annotator_labels, blend_labels,
                             class_palette, overlay_picture)
from lagm_nb.generators import FeatureGenerator, HookedGenerator, latents_for_seeds
from lagm_nb.segmenters import UNet
from lagm_nb.stylegan2 import Generator
from lagm_nb.testing import TeacherLabeller, tiny_generator
from lagm_nb.train import GMConfig, train_gradient_matching

CLASSES = ["background", "one", "two"]
pytestmark = pytest.mark.filterwarnings("error")   # a failing callback is only warned about (and dropped) by notify


class Counted:
    "Counts a generator's syntheses (per image) and annotators' forward passes."
    def __init__(self): self.images = self.forwards = 0

    def generator(self, G):
        synthesize = G.synthesize
        def counted(z):
            self.images += len(z)
            return synthesize(z)
        G.synthesize = counted
        return G

    def annotator(self, A):
        A.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        return A

    def __call__(self): return self.images, self.forwards


def _annotator(G, seed, n_classes=3):
    torch.manual_seed(seed)
    return FPNAnnotator(G.feature_shapes, n_classes, G.image_size, width=8)


def _plain(G, seeds):
    return G.sample(z=latents_for_seeds(G, seeds))


@pytest.fixture
def explorer():
    count = Counted()
    G, other = count.generator(tiny_generator()), count.generator(tiny_generator(seed=1))
    A, B = count.annotator(_annotator(G, 0)), count.annotator(_annotator(G, 1))
    ex = AnnotatorExplorer("tiny", {"A": A, "B": B}, generators={"tiny": G, "other": other}, classes=CLASSES,
                           n_images=3, seed=2, columns=3)
    return ex, G, other, A, B, count


def test_explorer_first_picture_is_the_annotators_masks(explorer):
    ex, G, _, A, _, count = explorer
    assert count() == (3, 1)
    images, features = _plain(G, [2, 3, 4])
    labels = annotator_labels(A, features)
    assert np.array_equal(ex.rendered, image_grid(blend_labels(images, labels, class_palette(3), 0.5), 3))
    assert ex.rendered.shape == (32, 3 * 33 - 1, 3)
    assert ex.status.value == "tiny: seeds 2-4; A" and "lagm-explorer" in ex.widget._dom_classes
    assert A.training                                          # a new module is in train mode; drawing kept it so
    assert [t.description for t in ex.class_toggles] == CLASSES and ex.truncation.layout.display == "none"


def test_seed_slider_and_box_redraw_once_per_new_seed(explorer):
    ex, G, _, A, _, count = explorer
    before = ex.rendered
    ex.seed.value = 7
    assert ex.seed_box.value == 7 and count() == (6, 2) and not np.array_equal(before, ex.rendered)
    images, features = _plain(G, [7, 8, 9])
    expected = overlay_picture(images, [annotator_labels(A, features)], class_palette(3), 0.5, columns=3)
    assert np.array_equal(ex.rendered, expected)
    count.images = count.forwards = 0
    ex.seed_box.value = 2                                      # back to a cached seed, through the text box
    assert ex.seed.value == 2 and count() == (0, 0) and np.array_equal(ex.rendered, before)


def test_class_toggle_and_opacity_recompute_nothing(explorer):
    ex, G, _, A, _, count = explorer
    images, features = _plain(G, [2, 3, 4])
    labels = annotator_labels(A, features)
    count.images = count.forwards = 0
    before = ex.rendered.copy()
    ex.class_toggles[1].value = False
    hidden = image_grid((labels == 1).float()[:, None].expand(-1, 3, -1, -1) * 2 - 1, 3)[..., 0] == 255   # class 1
    changed = (ex.rendered != before).any(-1)
    assert changed.any() and (changed <= hidden).all()         # only pixels of class 1 changed...
    plain = image_grid(images, 3)
    assert np.array_equal(ex.rendered[hidden], plain[hidden])  # ...and they show the plain image now
    ex.opacity.value = 0.0
    assert np.array_equal(ex.rendered, plain)
    ex.opacity.value = 1.0
    ex.class_toggles[1].value = True
    assert np.array_equal(ex.rendered, image_grid(blend_labels(images, labels, class_palette(3), 1.0), 3))
    assert count() == (0, 0)


def test_compare_and_feature_pickers(explorer):
    ex, G, _, A, B, count = explorer
    _, features = _plain(G, [2, 3, 4])
    count.images = count.forwards = 0
    single = ex.rendered
    ex.compare.value = True
    assert count() == (0, 1) and ex.rendered.shape[1] == 2 * single.shape[1] + 6 and "A | B" in ex.status.value
    assert np.array_equal(ex.rendered[:, :single.shape[1]], single)
    assert np.array_equal(ex.rendered[:, -single.shape[1]:],
                          overlay_picture(_plain(G, [2, 3, 4])[0], [annotator_labels(B, features)], class_palette(3),
                                          0.5, columns=3))
    count.images = count.forwards = 0
    ex.compare.value = False; ex.compare.value = True
    before = ex.feature_rendered
    ex.layer.value = 0
    assert ex.channel.max == G.feature_shapes[0][0] - 1
    ex.channel.value = 5
    assert not np.array_equal(before, ex.feature_rendered) and ex.feature_rendered.shape[:2] == single.shape[:2]
    assert count() == (0, 0)


def test_switching_generator_computes_it_once(explorer):
    ex, G, other, A, _, count = explorer
    before = ex.rendered
    ex.generator.value = "other"
    assert count() == (6, 2) and not np.array_equal(before, ex.rendered)
    images, features = _plain(other, [2, 3, 4])
    assert np.array_equal(ex.rendered, overlay_picture(images, [annotator_labels(A, features)], class_palette(3), 0.5,
                                                       columns=3))
    count.images = count.forwards = 0
    ex.generator.value = "tiny"
    assert count() == (0, 0) and np.array_equal(ex.rendered, before)


def test_annotator_of_another_generator_is_not_run():
    count = Counted()
    G = tiny_generator()
    wrong = count.annotator(FPNAnnotator(tiny_generator(n_up=2).feature_shapes, 3, 16, width=4))
    ex = AnnotatorExplorer(G, wrong, generators={}, n_images=2)
    images, _ = _plain(G, [0, 1])
    assert count.forwards == 0 and np.array_equal(ex.rendered, image_grid(images, 2))
    assert re.search(r"annotator is not drawn: it reads feature maps .* this generator makes", ex.status.value)


def test_truncation_only_for_a_mapping_network():
    torch.manual_seed(0)
    small = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
                 synthesis_kwargs=dict(channel_base=256, channel_max=16))
    S = HookedGenerator(Generator(**small), r"synthesis\.b\d+", 16)
    with torch.no_grad(): S.G.mapping.w_avg.normal_()
    ex = AnnotatorExplorer("style", generators={"style": GeneratorChoice(lambda: S, ["a", "b"]),
                                                "dcgan": tiny_generator()}, n_images=2)
    assert ex.truncation.layout.display is None and ex.truncation.value == 1.0
    full = ex.rendered
    ex.truncation.value = 0.0                                  # every image becomes the average image
    assert not np.array_equal(full, ex.rendered) and S.truncation_psi == 1.0   # the generator is left as it was
    assert np.array_equal(ex.rendered[:, :32], ex.rendered[:, 33:]) and "truncation ψ = 0" in ex.status.value
    ex.generator.value = "dcgan"
    assert ex.truncation.layout.display == "none" and ex.current_images()[0][3] == 1.0


def test_an_annotator_checkpoint_path_shows_the_saved_annotator(tmp_path):
    G = tiny_generator()
    A = _annotator(G, 0)
    save_annotator(A, tmp_path / "a.pt", G)
    from_module = AnnotatorExplorer("tiny", A, generators={"tiny": G}, classes=CLASSES, n_images=2).rendered
    from_path = AnnotatorExplorer("tiny", tmp_path / "a.pt", generators={"tiny": G}, classes=CLASSES, n_images=2)
    assert np.array_equal(from_module, from_path.rendered)
    assert np.array_equal(from_module, AnnotatorExplorer("tiny", {"saved": str(tmp_path / "a.pt")},
                                                         generators={"tiny": G}, classes=CLASSES, n_images=2).rendered)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="checkpoint path"):
        AnnotatorExplorer(tiny_generator(), 3, generators={})
    with pytest.raises(CheckpointError, match="missing.pt"):
        AnnotatorExplorer(tiny_generator(), tmp_path / "missing.pt", generators={})
    with pytest.raises(ValueError, match="is not one of"):
        AnnotatorExplorer("nope", generators={"tiny": tiny_generator()})
    def broken(): raise FileNotFoundError("no weights")
    ex = AnnotatorExplorer("tiny", generators={"tiny": tiny_generator(), "broken": GeneratorChoice(broken)})
    before = ex.rendered
    ex.generator.value = "broken"                              # reported, and the previous generator stays
    assert ex.generator.value == "tiny" and "broken cannot be built" in ex.status.value
    assert np.array_equal(before, ex.rendered)


# --- the dashboard ---

@pytest.fixture(scope="module")
def task():
    G = tiny_generator()
    teacher = TeacherLabeller(G, 3)
    z, z_val = G.latents(6, seed=5), G.latents(4, seed=6)
    return G, LabelledImages(G.sample(z=z)[0], teacher(z), 3), (z_val, teacher(z_val))


def _gm(task, callbacks, steps=4):
    G, labelled, annotator_val = task
    torch.manual_seed(0)
    A, S = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8), UNet(3, width=4)
    return train_gradient_matching(G, A, S, labelled, GMConfig(steps=steps, log_every=1, eval_every=2),
                                   annotator_val=annotator_val, progress=False, callbacks=callbacks)


class NoisyGenerator(FeatureGenerator):
    "A generator that draws from torch's global random generator, as StyleGAN2's random noise mode does."
    def __init__(self, G):
        super().__init__()
        self.inner, self.z_shape, self.image_size, self.feature_shapes = G, G.z_shape, G.image_size, G.feature_shapes

    def synthesize(self, z):
        images, features = self.inner.synthesize(z)
        return images + 0 * torch.randn_like(images), features


def _untimed(history): return [{k: v for k, v in r.items() if k != "time"} for r in history]


def test_dashboard_records_what_it_draws(task):
    G = task[0]
    dash = TrainingDashboard(every=1, n_images=3, seed=4, classes=CLASSES, min_seconds=0, enabled=True)
    res = _gm(task, [dash])
    assert [step for step, _ in dash.frames] == [1, 2, 3, 4] and dash.draws == 6   # 4 log records, 2 validations
    assert torch.equal(dash.frames[-1][1], annotator_labels(res.annotator, _plain(G, [4, 5, 6])[1]).to(torch.uint8))
    assert _untimed([{k: v for k, v in r.items() if k != "kind"} for r in dash.history]) == _untimed(res.history)
    assert dash.png[:4] == b"\x89PNG" and dash.seconds > 0 and not dash.show
    fig = dash.figure(rows=2)
    assert [t.get_text() for t in fig.axes[2].get_yticklabels()] == ["images", "step 1", "step 4"]
    assert len(fig.axes[1].lines) == 3                         # the annotator's IoU of each class


def test_dashboard_changes_nothing(task):
    plain = _gm(task, [])
    dash = TrainingDashboard(every=1, min_seconds=0, enabled=True)
    watched = _gm(task, [dash])
    for a, b in [(plain.annotator, watched.annotator), (plain.segmenter, watched.segmenter)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert _untimed(plain.history) == _untimed(watched.history) and len(dash.frames) == 4
    G = NoisyGenerator(task[0])                                # called directly: RNG and mode as they were
    for mode in (True, False):
        A = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8).train(mode)
        state = torch.get_rng_state()
        TrainingDashboard(min_seconds=0, enabled=True)({"kind": "log", "record": {"step": 1, "gm_loss": 1.0},
                                                        "generator": G, "annotator": A})
        assert torch.equal(state, torch.get_rng_state()) and A.training == mode


class Untouchable:
    def __getattr__(self, name): raise AssertionError(f"the dashboard touched {name}")


def test_dashboard_does_nothing_outside_a_notebook():
    dash = TrainingDashboard()                                 # pytest runs outside any IPython kernel
    assert not dash.enabled and not dash.show
    dash({"kind": "log", "record": {"step": 1}, "generator": Untouchable(), "annotator": Untouchable()})
    assert dash.history == [] and dash.frames == [] and dash.png is None and dash.seconds == 0


def test_dashboard_updates_one_display_in_a_notebook(task):
    G = task[0]
    handle = mock.Mock()
    with mock.patch("lagm_nb.explore.in_notebook", return_value=True), \
         mock.patch("IPython.display.display", return_value=handle) as display:
        dash = TrainingDashboard(every=2, min_seconds=0)
        A = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8)
        for step in range(1, 7): dash({"kind": "log", "record": {"step": step, "gm_loss": 1.0 / step},
                                       "generator": G, "annotator": A})
    assert dash.enabled and display.call_count == 1 and display.call_args.kwargs == {"display_id": True}
    assert handle.update.call_count == 2 and [step for step, _ in dash.frames] == [2, 4, 6]


def test_dashboard_redraws_at_most_every_min_seconds(task):
    G = task[0]
    dash = TrainingDashboard(min_seconds=3600, enabled=True)
    A = FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8)
    for step in (1, 2, 3): dash({"kind": "log", "record": {"step": step}, "generator": G, "annotator": A})
    dash({"kind": "eval", "record": {"step": 3, "annotator_iou_0": 1.0}, "generator": G, "annotator": A})
    assert dash.draws == 2 and [step for step, _ in dash.frames] == [1, 2, 3]   # the first, then the validation


def test_dashboard_watches_a_segmenter(task):
    G, labelled, _ = task
    torch.manual_seed(0)
    dash = TrainingDashboard(min_seconds=0, enabled=True)
    train_segmenter(UNet(3, width=4), labelled_batches(labelled, 2, device="cpu"), 50, val=labelled, eval_every=50,
                    progress=False, callbacks=[dash])
    assert [r["kind"] for r in dash.history] == ["log", "eval"] and dash.frames == [] and dash.draws == 2
    assert dash.figure().axes[0].lines[0].get_label() == "loss"
