"""Helpers shared by the tests. The bad-input tests of issue 14 check that a refused call leaves an existing run as it
was: `unchanged(folder)` snapshots every file under `folder` (path and bytes) and compares after the block."""
import contextlib
from pathlib import Path

import pytest


def _snapshot(folder) -> dict[str, bytes]:
    "{path relative to `folder`: bytes} of every file under `folder`."
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _unchanged(folder):
    before = _snapshot(folder)
    assert before, f"{folder} holds no file: there is no run to compare"
    yield before
    after = _snapshot(folder)
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"{folder}: added {added}, removed {removed}, changed {changed}"


@pytest.fixture
def snapshot():
    "`snapshot(folder)`: {relative path: bytes} of every file under `folder`."
    return _snapshot


@pytest.fixture
def unchanged():
    "`with unchanged(folder), pytest.raises(...): ...` asserts that no file under `folder` was added, removed, changed."
    return _unchanged
