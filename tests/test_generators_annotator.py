import pytest
import torch
from torch import nn

from lagm_nb.annotator import FPNAnnotator, PixelMLPAnnotator
from lagm_nb.generators import HookedGenerator
from lagm_nb.testing import tiny_generator


class _TupleBlocks(nn.Module):
    "A generator whose blocks return (features, image) like StyleGAN2's synthesis blocks."
    class Block(nn.Module):
        def __init__(self):
            super().__init__(); self.conv = nn.Conv2d(3, 3, 1)
        def forward(self, x):
            y = self.conv(x); return y, y.tanh()
    def __init__(self):
        super().__init__(); self.b4 = self.Block(); self.b8 = self.Block()
    def forward(self, z):
        x, _ = self.b4(z.reshape(-1, 3, 4, 4))
        x, img = self.b8(nn.functional.interpolate(x, scale_factor=2))
        return img


def test_tuple_outputs_contribute_their_first_element():
    G = HookedGenerator(_TupleBlocks(), r"b\d+", 48)
    assert G.feature_shapes == [(3, 4, 4), (3, 8, 8)] and G.image_size == (8, 8)


def test_module_called_twice_is_rejected():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__(); self.lin = nn.Linear(4, 4)
        def forward(self, z): return self.lin(self.lin(z)).reshape(-1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="exactly once"):
        HookedGenerator(Twice(), "lin", 4)


def test_sample_needs_exactly_one_of_n_and_z():
    G = tiny_generator()
    with pytest.raises(ValueError, match="exactly one"):
        G.sample()
    with pytest.raises(ValueError, match="exactly one"):
        G.sample(2, z=G.latents(2))


def test_fpn_adds_maps_of_equal_resolution():
    A = FPNAnnotator([(4, 8, 8), (6, 8, 8)], 3, 16, width=8)
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    assert torch.allclose(A.fuse([a, b]), A.lateral[0](a) + A.lateral[1](b), atol=1e-6)
    assert A([a, b]).shape == (2, 3, 16, 16)


def test_fpn_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2"):
        FPNAnnotator([(4, 8, 8)], 1, 16)


def test_pixel_mlp_chunking_does_not_change_output():
    G = tiny_generator()
    _, h = G.sample(2, seed=0)
    M = PixelMLPAnnotator(G.feature_shapes, 4, G.image_size, n_members=2).eval()
    big = M(h)
    M.chunk = 37
    assert torch.allclose(big, M(h), atol=1e-6)


def test_wrong_z_dim_names_z_dim():
    from lagm_nb.generators import DCGAN
    with pytest.raises(ValueError, match=r"check z_dim=10"): HookedGenerator(DCGAN(16, 8, n_up=3), r"relu\d+", 10)
