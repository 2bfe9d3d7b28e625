"""Data-parallel Algorithm 1 (torch.distributed, gloo, 2 CPU processes) equals one process with the doubled batch."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lagm_nb.core import CheckpointError
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


def _run(batch, steps, out=None, resume=False):
    torch.manual_seed(0)
    G = tiny_generator()
    lab = LabelledImages(G.sample(4, seed=3)[0], torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(1)), 3)
    torch.manual_seed(0)
    A, S = PlainAnnotator(G.feature_shapes[-1][0], 3), PlainSegmenter(3)
    cfg = GMConfig(steps=steps, batch_size=batch, labelled_batch_size=batch, eval_every=100, log_every=1,
                   annotator_lr=0.1, segmenter_lr=0.1)
    res = train_gradient_matching(G, A, S, lab, cfg, out_dir=out, resume=resume, device="cpu", progress=False)
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
    # rank 0's checkpoint of the 2 x 1 run continues as 1 x 2 (the same total batch), not as 1 x 1
    resumed, losses = _run(2, 5, tmp_path / "run", resume=True)
    straight, straight_losses = _run(2, 5)
    for k, v in straight.items(): assert torch.allclose(v, resumed[k], atol=1e-5), k
    assert losses == pytest.approx(straight_losses, abs=1e-5) and len(losses) == 5
    with pytest.raises(CheckpointError, match=r"'batch_size': \(2, 1\)"):
        _run(1, 7, tmp_path / "run", resume=True)


# ---- dataset export shared out among ranks (lagm_nb.factory.export_dataset under torch.distributed) ----------------

def _export_networks():
    from lagm_nb.annotator import FPNAnnotator
    G = tiny_generator()
    torch.manual_seed(0)
    return G, FPNAnnotator(G.feature_shapes, 3, G.image_size, width=8).eval()


def _export(out, n_images, **kw):
    from lagm_nb.factory import export_dataset
    G, A = _export_networks()
    return export_dataset(G, A, out, n_images, **{"seed": 5, "batch_size": 4, "shard_size": 4, "soft": True,
                                                  "preview": True, "progress": False, **kw})


def _export_rank(rank, init_file, jobs, result_dir):
    "Run each (out_dir, n_images, kwargs) of `jobs` as one of two ranks; record the indices each wrote, or its error."
    import lagm_nb.factory as factory
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    outcomes, written, write = [], [], factory.write_item
    factory.write_item = lambda out, i, *args: (written.append(i), write(out, i, *args))
    try:
        for out, n_images, kw in jobs:
            written.clear()
            try: _export(out, n_images, **kw); outcomes.append(list(written))
            except Exception as e: outcomes.append(f"{type(e).__name__}: {e}")
    finally:
        torch.distributed.destroy_process_group()
        torch.save(outcomes, os.path.join(result_dir, f"rank{rank}.pt"))


def _two_ranks(tmp_path, jobs):
    mp.start_processes(_export_rank, args=(str(tmp_path / "init"), jobs, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


def _same_export(a, b):
    import filecmp, json
    files = lambda d: sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files(a) and files(a) == files(b)
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files(a)), "files differ"
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb): del m["created"], m["updated"]
    assert ma == mb
    return True


def test_export_from_two_ranks_equals_export_from_one_and_resumes_with_any_number(tmp_path):
    if not torch.distributed.is_available(): pytest.skip("torch.distributed is not available")
    torch.set_num_threads(1)
    (tmp_path / "not_export").mkdir(); (tmp_path / "not_export" / "x.txt").write_text("x")
    _export(tmp_path / "grown_by_two", 5)                      # one rank starts it (5 of 13: block 1 half done) ...
    jobs = [(tmp_path / "two", 10, {}),                         # 3 blocks of 4: rounds (0, 1), (2, -)
            (tmp_path / "grown_by_two", 13, {}),                # ... two ranks grow it to 13
            (tmp_path / "started_by_two", 6, {}),               # two ranks start it, one grows it below
            (tmp_path / "not_export", 4, {}),                   # rank 0 refuses the folder: both ranks stop
            (tmp_path / "two", 12, {"seed": 6})]                # another seed: refused on both ranks
    outcomes = _two_ranks(tmp_path, jobs)
    assert outcomes[0][:3] == [[0, 1, 2, 3, 8, 9], [5, 6, 7, 12], [0, 1, 2, 3]], outcomes   # blocks 0 and 2; 1 and 3; 0
    assert outcomes[1][:3] == [[4, 5, 6, 7], [8, 9, 10, 11], [4, 5]], outcomes                # block 1; 2; 1
    assert outcomes[0][3].startswith("FileExistsError") and outcomes[1][3].startswith("RuntimeError: rank 0 failed "
                                                                                       "(FileExistsError"), outcomes
    assert "seed (5 (recorded) vs 6 (given))" in outcomes[0][4] and "rank 0 failed (ValueError" in outcomes[1][4]
    _export(tmp_path / "one", 10)
    assert _same_export(tmp_path / "one", tmp_path / "two")
    _export(tmp_path / "started_by_two", 13)
    _export(tmp_path / "one", 13)
    assert _same_export(tmp_path / "one", tmp_path / "grown_by_two")
    assert _same_export(tmp_path / "one", tmp_path / "started_by_two")
    assert not list(tmp_path.rglob("*.tmp"))
