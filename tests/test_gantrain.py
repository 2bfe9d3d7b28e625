"""lagm_nb.bench.gantrain: real-image sources, config checks, bit-exact resume, snapshots and sample grids, on tiny runs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lagm_nb.core import CheckpointError, load_checkpoint
from lagm_nb.bench.gantrain import (GANConfig, disc_images, image_grid, list_snapshots, load_snapshot, real_batches,
                              snapshot_name, train_stylegan2)
from lagm_nb.stylegan2 import Generator, load_official_state_dict

torch.set_num_threads(1)
TINY = GANConfig(resolution=16, z_dim=8, w_dim=8, channel_base=64, channel_max=8, batch_size=4, steps=6,
                 snapshot_every=3, sample_every=3, log_every=2, r1_interval=2)


@pytest.fixture(scope="module")
def discs():
    return disc_images(16)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_is_bit_exact(discs, tmp_path):
    cfg = TINY.replace(xflip=0.5, steps=8, snapshot_every=4)
    full = train_stylegan2(discs, cfg, tmp_path / "full", progress=False)
    train_stylegan2(discs, cfg.replace(steps=4), tmp_path / "res", progress=False)
    res = train_stylegan2(discs, cfg, tmp_path / "res", resume=True, progress=False)
    for name in ("G", "D", "G_ema"):
        assert _same(getattr(full, name), getattr(res, name)), name
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt", "stylegan2_run") for n in ("full", "res"))
    assert a["step"] == b["step"] == 8
    for key in ("opt_G", "opt_D"):
        for sa, sb in zip(a[key]["state"].values(), b[key]["state"].values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # a different seed gives a different run
    other = train_stylegan2(discs, cfg.replace(seed=1), progress=False)
    assert not _same(full.G, other.G)


def test_run_killed_between_logs_resumes_with_the_same_log(discs, tmp_path):
    data = lambda t: discs[(4 * t) % 16:(4 * t) % 16 + 4]
    def killed_at_5(t):
        if t == 5: raise KeyboardInterrupt("killed")
        return data(t)
    full = train_stylegan2(data, TINY, tmp_path / "full", progress=False)            # log every 2, checkpoint every 3
    with pytest.raises(KeyboardInterrupt):
        train_stylegan2(killed_at_5, TINY, tmp_path / "res", progress=False)
    assert load_checkpoint(tmp_path / "res/checkpoint.pt", "stylegan2_run")["step"] == 3
    res = train_stylegan2(data, TINY, tmp_path / "res", resume=True, progress=False)
    assert _same(full.G_ema, res.G_ema)
    lines = lambda n: [json.loads(l) for l in (tmp_path / n / "log.jsonl").read_text().splitlines()]
    drop_times = lambda log: [{k: v for k, v in r.items() if k not in ("time", "sec_per_step")} for r in log]
    assert [r["step"] for r in lines("res")] == [2, 4, 6]
    assert drop_times(lines("full")) == drop_times(lines("res"))


def test_resume_with_other_settings_names_them(discs, tmp_path):
    train_stylegan2(discs, TINY.replace(steps=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"other settings.*'batch_size': \(4, 8\).*'r1_gamma': \(0.05, 1.0\)"):
        train_stylegan2(discs, TINY.replace(r1_gamma=1.0, batch_size=8), tmp_path, resume=True, progress=False)
    # run length and bookkeeping may change
    r = train_stylegan2(discs, TINY.replace(steps=4, log_every=1), tmp_path, resume=True, progress=False)
    assert [h["step"] for h in r.history] == [2, 3, 4]
    with pytest.raises(CheckpointError, match="beyond steps=1"):
        train_stylegan2(discs, TINY.replace(steps=1), tmp_path, resume=True, progress=False)


def test_outputs_and_snapshot_format(discs, tmp_path):
    res = train_stylegan2(discs, TINY.replace(batch_size=400, steps=3, keep_snapshots=(1,)), tmp_path, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pt", "log.jsonl", "samples_000000.png", "samples_000003.png",
                     "snapshot_000000.pt", "snapshot_000001.pt"]
    assert [p.name for p in list_snapshots(tmp_path)] == ["snapshot_000000.pt", "snapshot_000001.pt"]
    G = load_official_state_dict(None, tmp_path / "snapshot_000001.pt")     # the official loader reads it
    assert _same(G, res.G_ema) and isinstance(G, Generator)
    G1, info = load_snapshot(tmp_path / "snapshot_000000.pt")
    assert info["step"] == 1 and info["kimg"] == 0.4 and info["train_config"]["batch_size"] == 400
    assert not _same(G1, res.G_ema)
    grid = np.array(Image.open(tmp_path / "samples_000003.png"))
    assert grid.shape == (4 * 17 - 1, 4 * 17 - 1, 3)
    with torch.no_grad():
        z = torch.randn(1, 8)
        assert G(z).shape == (1, 3, 16, 16)


def test_log_records(discs, tmp_path):
    res = train_stylegan2(discs, TINY, tmp_path, progress=False)
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == res.history and [r["step"] for r in log] == [2, 4, 6]
    assert all(np.isfinite(r["loss_G"]) and np.isfinite(r["loss_D"]) and r["sec_per_step"] > 0 for r in log)
    assert log[0]["r1"] is not None and log[-1]["kimg"] == pytest.approx(0.024)
    assert res.G.training and not res.G_ema.training


def test_r1_off_and_ema_is_average(discs):
    res = train_stylegan2(discs, TINY.replace(r1_interval=0, steps=2, ema_rampup=None, ema_kimg=1e-6), progress=False)
    assert res.history[-1]["r1"] is None
    assert _same(res.G, res.G_ema)                       # half-life ~0: the average is the latest generator
    frozen = train_stylegan2(discs, TINY.replace(steps=2, ema_rampup=None, ema_kimg=1e9), progress=False)
    assert not _same(frozen.G, frozen.G_ema)             # half-life huge: the average barely moves


def test_real_batches_sources_and_flips(discs):
    cfg = TINY.replace(xflip=0.0)
    src = real_batches(discs, cfg)
    seen = torch.cat([src(t) for t in range(1, 5)])      # one epoch of 16 images
    assert sorted(seen.sum((1, 2, 3)).tolist()) == pytest.approx(sorted(discs.sum((1, 2, 3)).tolist()))
    assert not torch.equal(src(5), src(1)) or not torch.equal(src(6), src(2))   # the next epoch is reshuffled
    assert torch.equal(real_batches(discs, cfg.replace(xflip=1.0))(2), src(2).flip(-1))
    some = real_batches(discs, cfg.replace(xflip=0.5))
    flips = [torch.equal(a, b.flip(-1)) for t in range(1, 9) for a, b in zip(some(t), src(t))]
    assert 0 < sum(flips) < len(flips)
    u8 = ((discs + 1) * 127.5).round().to(torch.uint8)
    assert (real_batches(u8, cfg)(2) - src(2)).abs().max() <= 0.5 / 127.5 + 1e-6
    assert torch.equal(real_batches(torch.utils.data.TensorDataset(discs), cfg)(3), src(3))


@pytest.mark.parametrize("images, error, match", [
    (lambda d: d * 127.5 + 127.5, ValueError, r"x / 127\.5 - 1"),
    (lambda d: (d + 1) / 2, ValueError, r"look like \[0, 1\]"),
    (lambda d: torch.nn.functional.interpolate(d, size=32), ValueError, r"expected \[N, 3, 16, 16\].*resolution 16"),
    (lambda d: d[:, :1], ValueError, r"expected \[N, 3, 16, 16\]"),
    (lambda d: d.long(), TypeError, "uint8"),
    (lambda d: d[:0], ValueError, "empty"),
    (lambda d: torch.where(d > 0, torch.nan, d), ValueError, "NaN"),
    (lambda d: d.numpy(), TypeError, "tensor, a torch Dataset or a function"),
])
def test_bad_images_are_refused(discs, images, error, match):
    with pytest.raises(error, match=match):
        train_stylegan2(images(discs), TINY, progress=False)


def test_bad_batches_from_a_function(discs):
    with pytest.raises(ValueError, match="expected batch_size=4"):
        train_stylegan2(lambda t: discs[:3], TINY, progress=False)
    with pytest.raises(ValueError, match=r"step 1 must lie in \[-1, 1\]"):
        train_stylegan2(lambda t: discs[:4] * 3, TINY, progress=False)


def test_config_checks():
    assert snapshot_name(5000, 16) == "snapshot_000080.pt"
    with pytest.raises(ValueError, match="power of two"): GANConfig(resolution=24)
    with pytest.raises(ValueError, match="multiple of mbstd_group_size"): GANConfig(batch_size=10)
    with pytest.raises(ValueError, match="same file name twice"): GANConfig(keep_snapshots=(100, 110))
    with pytest.raises(ValueError, match="probability"): GANConfig(xflip=2.0)
    with pytest.raises(ValueError, match="no channels"): GANConfig(channel_base=32)
    with pytest.raises(TypeError, match="no option"): GANConfig.from_dict({"r1": 1.0})


def test_image_grid_layout():
    x = torch.linspace(-1, 1, 5 * 3 * 2 * 2).reshape(5, 3, 2, 2)
    g = image_grid(x, nrow=3, pad=1)
    assert g.shape == (2 * 3 - 1, 3 * 3 - 1, 3) and g.dtype == np.uint8
    assert (g[3:5, 3:5] == ((x[4].permute(1, 2, 0) + 1) * 127.5).round().numpy()).all()
    assert image_grid(x * 5).min() == 0 and image_grid(x * 5).max() == 255     # clipped to [-1, 1]
