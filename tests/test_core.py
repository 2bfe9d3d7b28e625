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


def _toy_run(d, steps, resume=False, lr=0.1, **kw):
    "A run of a counter through RunDir: a checkpoint every step."
    from lagm_nb.core import RunDir
    run = RunDir(d, "toy", {"lr": lr}, restartable={"steps"})
    state = run.start(resume, **kw)
    x = state["x"] if state else 0.0
    for t in range((state or {"step": 0})["step"] + 1, steps + 1):
        x += lr; run.record({"step": t, "x": x}); run.save({"step": t, "x": x})
    return x, run


def test_unreadable_checkpoint_names_the_file_and_never_suggests_weights_only_false(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"damaged")                     # torch's own message says: weights_only=False
    with pytest.raises(CheckpointError, match=r"bad.pt is corrupt or not a torch file \(UnpicklingError\)") as err:
        load_checkpoint(tmp_path / "bad.pt", "run")
    assert "weights_only" not in str(err.value) and err.value.__cause__ is None
    torch.save({"x": print}, tmp_path / "pickle.pt")                  # loadable only by unpickling a function
    with pytest.raises(CheckpointError) as err: load_checkpoint(tmp_path / "pickle.pt", "run")
    assert "weights_only" not in str(err.value) and "UnpicklingError" in str(err.value)


def test_damaged_checkpoint_falls_back_and_keeps_the_previous_one(tmp_path, snapshot):
    _toy_run(tmp_path, 3)
    (tmp_path / "checkpoint.pt").write_bytes(b"damaged")
    good = snapshot(tmp_path)["checkpoint.prev.pt"]
    with pytest.warns(UserWarning, match="previous checkpoint") as warned:
        x, run = _toy_run(tmp_path, 3, resume=True)                    # step 3 is redone from step 2 and saved
    message = str(warned[0].message)
    assert "weights_only" not in message and "checkpoint.damaged.pt" in message and "delete it and start" not in message
    files = snapshot(tmp_path)
    assert files["checkpoint.prev.pt"] == good and files["checkpoint.damaged.pt"] == b"damaged"   # nothing lost
    assert abs(x - 0.3) < 1e-12 and [r["step"] for r in run.history] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "checkpoint.pt", "toy")["step"] == 3


def test_refused_starts_change_no_file_of_the_run(tmp_path, unchanged):
    _toy_run(tmp_path, 3)
    with unchanged(tmp_path), pytest.raises(FileExistsError, match="resume=True to continue it, overwrite=True"):
        _toy_run(tmp_path, 3)                                           # resume=False over a run
    with unchanged(tmp_path), pytest.raises(CheckpointError, match=r"other settings .*'lr': \(0.1, 0.2\)"):
        _toy_run(tmp_path, 3, resume=True, lr=0.2)
    (tmp_path / "checkpoint.pt").write_bytes(b"damaged")
    with unchanged(tmp_path), pytest.raises(CheckpointError, match=r"other settings"):
        _toy_run(tmp_path, 3, resume=True, lr=0.2)                     # refused after the fallback: nothing moved


def test_every_restart_from_scratch_keeps_the_old_log(tmp_path, capsys):
    for n in range(3):
        (tmp_path / "log.jsonl").write_text(f'{{"step": {n}}}\n')     # a log, but no checkpoint to resume
        _toy_run(tmp_path / ".", 1, resume=True)
        (tmp_path / "checkpoint.pt").unlink()
    kept = {p.name: p.read_text() for p in tmp_path.glob("log.before-restart*.jsonl")}
    assert kept == {"log.before-restart.jsonl": '{"step": 0}\n', "log.before-restart.2.jsonl": '{"step": 1}\n',
                    "log.before-restart.3.jsonl": '{"step": 2}\n'}
    assert "old log kept as log.before-restart.3.jsonl" in capsys.readouterr().out


def test_finite_guard_sees_a_nan_weight_behind_finite_losses():
    from lagm_nb.core import FiniteGuard, nonfinite_tensors
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    g = FiniteGuard("run")
    g.watch(torch.tensor(1.0)); g.check(5, net=net)
    with torch.no_grad(): net[0].weight[0, 0] = float("nan"); net[1].running_var[0] = float("inf")
    assert nonfinite_tensors(net) == ["0.weight", "1.running_var"]
    g.watch(torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match=r"run: the net's 0.weight \(and 1 more\) became NaN or infinite "
                                                 r"between steps 6 and 8 while the losses stayed finite"):
        g.check(8, net=net)


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os
    from lagm_nb.core import save_checkpoint, write_text_atomic
    mask = os.umask(0o022)
    try:
        text, ckpt = write_text_atomic(tmp_path / "a.md", "x"), save_checkpoint({}, tmp_path / "c.pt", "test")
        assert (text.stat().st_mode & 0o777, ckpt.stat().st_mode & 0o777) == (0o644, 0o644)
    finally:
        os.umask(mask)
