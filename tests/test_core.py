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
