import pytest
import torch

from lagm_nb.core import CheckpointError, Config, load_checkpoint, save_checkpoint, write_text_atomic


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint({"step": 1}, tmp_path / "ck.pt", kind="run")
    with pytest.raises(Exception):
        save_checkpoint({"step": 2, "bad": lambda: 0}, path, kind="run")   # a lambda cannot be pickled
    assert load_checkpoint(path, "run")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_checkpoint_without_kind_is_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="holds a None"):
        load_checkpoint(tmp_path / "plain.pt", "run")


def test_config_rejects_unknown_keys():
    with pytest.raises(TypeError, match="valid options"):
        Config.from_dict({"x": 1})


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "manifest.json"
    write_text_atomic(p, "old")
    write_text_atomic(p, "new")
    assert p.read_text() == "new" and [f.name for f in p.parent.iterdir()] == ["manifest.json"]
    with pytest.raises(TypeError):
        write_text_atomic(p, None)   # a failed write keeps the old file and removes its temporary
    assert p.read_text() == "new" and [f.name for f in p.parent.iterdir()] == ["manifest.json"]


def test_device_choice_refuses_devices_that_do_not_exist(monkeypatch):
    import torch
    from lagm_nb.core import default_device
    for value, error in [("", "LAGM_DEVICE is empty"), ("gpu", "'gpu' is not a device torch knows")]:
        monkeypatch.setenv("LAGM_DEVICE", value)
        with pytest.raises(ValueError, match=error): default_device()
    monkeypatch.setenv("LAGM_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"): default_device("cuda:1")


def test_finite_guard_reports_the_window():
    import torch
    from lagm_nb.core import FiniteGuard
    g = FiniteGuard("run")
    g.watch(torch.tensor([1.0, 2.0])); g.check(10)
    g.watch(torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match="run: a loss became NaN or infinite between steps 11 and 12"): g.check(12)
