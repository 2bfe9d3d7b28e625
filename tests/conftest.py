"""Helpers shared by the tests. The bad-input tests check that a refused call leaves an existing run as it was:
`unchanged(folder)` snapshots every file under `folder` (path and bytes) and compares after the block;
`nan_gradient(parameter, call)` makes one gradient of a parameter NaN, as a run that goes wrong mid-way."""
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


def _nan_gradient(parameter, call: int = 2):
    "Make the `call`-th gradient accumulated into `parameter` NaN (a finite loss with a non-finite update)."
    calls = []
    def poison(p):
        calls.append(1)
        if len(calls) == call: p.grad.mul_(float("nan"))
    parameter.register_post_accumulate_grad_hook(poison)


@pytest.fixture
def nan_gradient():
    "`nan_gradient(parameter, call=2)`: the `call`-th gradient of `parameter` becomes NaN."
    return _nan_gradient
