"""lagm_nb.bench.domainfid: Fréchet distance and KID against hand computations, the feature network, save/load, helpers."""
import math

import pytest
import torch

from lagm_nb.core import CheckpointError
from lagm_nb.bench.domainfid import (DomainFeatureNet, domain_fid, extract_features, fid_from_features, frechet_distance,
                               generate_images, gaussian_fit, kid_from_features, load_feature_net, mmd2_unbiased,
                               part_areas, save_feature_net, sqrtm_psd, train_feature_net)
from lagm_nb.stylegan2 import Generator

torch.set_num_threads(1)


def test_frechet_one_dimension_and_diagonal():
    assert frechet_distance([0.5], [[1.0]], [2.0], [[0.25]]) == pytest.approx(1.5 ** 2 + 0.5 ** 2, abs=1e-12)
    v1, v2 = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 3.0])
    m1, m2 = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0])
    expect = 2.0 + (math.sqrt(2) - math.sqrt(0.5)) ** 2
    assert frechet_distance(m1, torch.diag(v1), m2, torch.diag(v2)) == pytest.approx(expect, abs=1e-12)


def test_frechet_non_commuting_2x2_closed_form():
    s1 = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    p = s1 @ s2
    tr_sqrt = math.sqrt(p.trace() + 2 * math.sqrt(torch.linalg.det(p)))   # trace of the square root of a 2x2 matrix
    expect = 1.0 + s1.trace() + s2.trace() - 2 * tr_sqrt
    assert frechet_distance([1.0, 0.0], s1, [0.0, 0.0], s2) == pytest.approx(expect.item(), abs=1e-10)
    # symmetric in its arguments
    assert frechet_distance([0.0, 0.0], s2, [1.0, 0.0], s1) == pytest.approx(expect.item(), abs=1e-10)


def test_sqrtm_psd_squares_back_including_singular():
    a = torch.randn(20, 5, dtype=torch.float64)
    for m in (a.T @ a, torch.outer(a[0], a[0])):
        r = sqrtm_psd(m)
        assert torch.allclose(r @ r, m, atol=1e-9) and torch.allclose(r, r.T)


def test_fid_from_samples():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5000, 3, generator=g), torch.randn(5000, 3, generator=g)
    assert fid_from_features(a, b) < 0.01
    assert fid_from_features(a, 2 * b) == pytest.approx(3 * (2 - 1) ** 2, rel=0.1)   # std 1 vs 2 in 3 dims
    mu, cov = gaussian_fit(a)
    assert mu.dtype == torch.float64 and cov.shape == (3, 3)
    with pytest.raises(ValueError, match="feature sizes differ"): fid_from_features(a, b[:, :2])
    with pytest.raises(ValueError, match="N >= 2"): gaussian_fit(a[:1])


def test_mmd_by_hand_and_kid():
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    k = lambda a, b: (float(a @ b) / 2 + 1) ** 3
    kxx = k(x[0], x[1]); kyy = k(y[0], y[1])
    kxy = sum(k(a, b) for a in x for b in y) / 4
    assert mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, abs=1e-12)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(600, 4, generator=g), torch.randn(600, 4, generator=g)
    same, _ = kid_from_features(a, b, n_subsets=10, subset_size=300)
    far, std = kid_from_features(a, b + 1, n_subsets=10, subset_size=300)
    assert abs(same) < 0.01 < far and std > 0
    assert kid_from_features(a, b, n_subsets=3, seed=5) == kid_from_features(a, b, n_subsets=3, seed=5)


def test_feature_net_shapes_errors_and_roundtrip(tmp_path):
    net = DomainFeatureNet(5, width=4, resolution=16)
    seg, area, f = net(torch.randn(3, 3, 16, 16))
    assert seg.shape == (3, 5, 16, 16) and area.shape == (3, 5) and f.shape == (3, 44) and net.feature_dim == 44
    with pytest.raises(ValueError, match="resize the images"): net.features(torch.randn(1, 3, 32, 32))
    p = save_feature_net(net, tmp_path / "f.pt", steps=0)
    net2 = load_feature_net(p)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(net2.features(x), net.eval().features(x)) and net2.info == {"steps": 0}
    with pytest.raises(CheckpointError): load_feature_net(tmp_path / "missing.pt")


def test_training_learns_areas_and_refuses_bad_input():
    # images whose left or right half is bright; masks say which half is class 1
    g = torch.Generator().manual_seed(0)
    side = torch.rand(64, generator=g) < 0.5
    masks = torch.zeros(64, 16, 16, dtype=torch.long)
    masks[side, :, :8] = 1; masks[~side, :, 8:] = 1
    masks[:, :4] = 0
    images = masks[:, None].float().expand(-1, 3, -1, -1) * 1.6 - 0.8
    net = train_feature_net(images, masks, 2, steps=60, batch_size=16, width=4, progress=False)
    assert not net.training
    acc = (net(images)[0].argmax(1) == masks).float().mean()
    assert acc > 0.8
    assert torch.allclose(part_areas(masks[:2], 2).sum(1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"): train_feature_net(images * 100, masks, 2, steps=1)
    with pytest.raises(ValueError, match="mask values"): train_feature_net(images, masks + 5, 2, steps=1)
    with pytest.raises(ValueError, match="masks \\[N,R,R\\]"): train_feature_net(images, masks[:3], 2, steps=1)


def test_extract_generate_and_domain_fid():
    net = DomainFeatureNet(3, width=4, resolution=16).eval()
    x = torch.rand(10, 3, 16, 16) * 2 - 1
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    f = extract_features(net, x, batch_size=3)
    assert f.shape == (10, 44) and torch.allclose(f, net.features(x), atol=1e-6)
    assert (extract_features(net, u8) - f).abs().max() < 0.05
    assert torch.equal(extract_features(lambda t: t.mean((2, 3)), x), x.mean((2, 3)))   # any function works
    torch.manual_seed(0)
    G = Generator(8, 0, 8, 16, 3, mapping_kwargs=dict(num_layers=1), synthesis_kwargs=dict(channel_base=64, channel_max=8))
    G.train()
    imgs = generate_images(G, 5, seed=3, batch_size=2)
    assert imgs.shape == (5, 3, 16, 16) and imgs.abs().max() <= 1 and G.training
    assert torch.equal(imgs, generate_images(G, 5, seed=3, batch_size=2))
    assert torch.allclose(imgs, generate_images(G, 5, seed=3), atol=1e-5)   # batching changes only round-off
    r = domain_fid(net, x, imgs, kid_subsets=2, kid_subset_size=5)
    assert set(r) == {"domain_fid", "domain_kid", "domain_kid_std", "n_real", "n_fake"} and r["n_fake"] == 5
    assert r["domain_fid"] > domain_fid(net, x, x, kid_subsets=2)["domain_fid"] - 1e-9
