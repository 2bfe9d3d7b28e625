"""The training dashboard in a real Jupyter kernel, run by papermill as `make reproduce` runs notebooks: a small
notebook made here trains the tiny generator's annotator with a `TrainingDashboard` (default settings, so it finds
the kernel by itself); the run must finish, the executed notebook must hold one picture of the dashboard, updated
in place to its last drawing, and a dashboard whose drawing fails must be dropped with a warning, not end the run."""
import base64, hashlib, os
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parents[1]

CELLS = [
    """import hashlib, lagm_nb, torch
from lagm_nb.explore import TrainingDashboard
from lagm_nb.testing import TeacherLabeller, tiny_generator
from lagm_nb.datasets import LabelledImages
from lagm_nb.annotator import FPNAnnotator
from lagm_nb.segmenters import UNet
from lagm_nb.train import GMConfig, train_gradient_matching
torch.set_num_threads(1)
print("package:", lagm_nb.__file__)""",
    """G = tiny_generator()
teacher = TeacherLabeller(G, 3)
z_lab, z_val = G.latents(4, seed=1), G.latents(4, seed=2)
labelled = LabelledImages(G.sample(z=z_lab)[0], teacher(z_lab), 3)
def run(dashboard):
    torch.manual_seed(0)
    return train_gradient_matching(G, FPNAnnotator(G.feature_shapes, 3, 32, width=8), UNet(3, width=4), labelled,
                                   GMConfig(steps=6, log_every=1, eval_every=6), annotator_val=(z_val, teacher(z_val)),
                                   progress=False, callbacks=[dashboard])""",
    """dashboard = TrainingDashboard(every=2, n_images=2, classes=["background", "one", "two"], min_seconds=0)
result = run(dashboard)
print("shown:", dashboard.show, "draws:", dashboard.draws, "frames:", [step for step, _ in dashboard.frames])
print("last picture:", hashlib.sha1(dashboard.png).hexdigest())""",
    """broken = TrainingDashboard(min_seconds=0)
broken.figure = lambda *args, **kwargs: 1 / 0   # every drawing fails
result = run(broken)
print("finished after a broken dashboard:", result.history[-1]["step"])""",
]


def test_dashboard_in_a_papermill_run(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "dashboard.ipynb")
    # the kernel imports this checkout's package, on one thread
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = papermill.execute_notebook(str(tmp_path / "dashboard.ipynb"), str(tmp_path / "run.ipynb"), cwd=str(tmp_path),
                                     kernel_name="python3", progress_bar=False, execution_timeout=120)
    text = lambda cell: "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    setup, _, trained, survived = out.cells
    assert f"package: {ROOT / 'lagm_nb'}" in text(setup)
    assert all(o.output_type != "error" for c in out.cells for o in c.outputs)
    assert "shown: True draws: " in text(trained) and "frames: [2, 4, 6]" in text(trained)
    assert int(text(trained).split("draws: ")[1].split()[0]) >= 3   # drawn more than once: updated in place
    pictures = [o for o in trained.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pictures) == 1, f"one picture, updated in place, not {len(pictures)}: {trained.outputs}"
    png = base64.b64decode(pictures[0].data["image/png"])
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert f"last picture: {hashlib.sha1(png).hexdigest()}" in text(trained)   # the picture is the last drawing
    assert "finished after a broken dashboard: 6" in text(survived)
    assert "failed (ZeroDivisionError" in text(survived) and "it is dropped" in text(survived)
    assert not any("image/png" in o.get("data", {}) for o in survived.outputs)

