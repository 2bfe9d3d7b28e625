"""The README's Python examples (```python blocks) run as written, sized to take seconds; ```py blocks need data or
a checkpoint of the reader's and are not run."""
import os, re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    for code in blocks:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["synthetic_masks"].shape == (16, 32, 32) and int(scope["synthetic_masks"].max()) < 3
    assert (tmp_path / "runs" / "my_annotator").is_dir()
