"""Data-parallel Algorithm 1 (torch.distributed, gloo, 2 CPU processes) equals one process with the doubled batch."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lagm_nb.datasets import LabelledImages
from lagm_nb.testing import tiny_generator
from lagm_nb.train import GMConfig, train_gradient_matching


class PlainAnnotator(nn.Module):     # no BatchNorm: per-rank batch statistics would differ from the doubled batch's
    def __init__(self, channels, n_classes):
        super().__init__(); self.n_classes = n_classes; self.conv = nn.Conv2d(channels, n_classes, 1)
    def forward(self, features): return nn.functional.interpolate(self.conv(features[-1]), size=(32, 32))


class PlainSegmenter(nn.Module):
    def __init__(self, n_classes):
        super().__init__(); self.n_classes = n_classes
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, n_classes, 1))
    def forward(self, x): return self.net(x)


def _run(batch, steps, out=None):
    torch.manual_seed(0)
    G = tiny_generator()
    lab = LabelledImages(G.sample(4, seed=3)[0], torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(1)), 3)
    torch.manual_seed(0)
    A, S = PlainAnnotator(G.feature_shapes[-1][0], 3), PlainSegmenter(3)
    cfg = GMConfig(steps=steps, batch_size=batch, labelled_batch_size=batch, eval_every=100, log_every=1,
                   annotator_lr=0.1, segmenter_lr=0.1)
    res = train_gradient_matching(G, A, S, lab, cfg, out_dir=out, device="cpu", progress=False)
    return {**{f"A.{k}": v for k, v in res.annotator.state_dict().items()},
            **{f"S.{k}": v for k, v in res.segmenter.state_dict().items()}}, [r["gm_loss"] for r in res.history]


def _rank(rank, init_file, out_dir, result_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        state, losses = _run(1, 3, out_dir)
        if rank == 0: torch.save({"state": state, "losses": losses}, result_file)
    finally: torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_rank_with_the_doubled_batch(tmp_path):
    if not torch.distributed.is_available(): pytest.skip("torch.distributed is not available")
    torch.set_num_threads(1)
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path / "two.pt")),
                       nprocs=2, start_method="spawn")
    two = torch.load(tmp_path / "two.pt")
    one, losses = _run(2, 3)
    assert sorted(one) == sorted(two["state"])
    for k, v in one.items(): assert torch.allclose(v, two["state"][k], atol=1e-5), k
    assert losses == pytest.approx(two["losses"], abs=1e-5)
    assert (tmp_path / "run" / "checkpoint.pt").exists()      # rank 0 wrote the run folder
    alone, _ = _run(1, 3)                                      # one rank's share alone is another run
    assert any(not torch.allclose(v, alone[k], atol=1e-4) for k, v in one.items())
