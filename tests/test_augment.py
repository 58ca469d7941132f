import torch

from pipeline.methods.pretrain.augment import contrastive_view, random_affine


def test_augmentations_keep_shape_and_repeat_under_a_seed():
    x = torch.randn(16, 3, 8, 8)
    for fn in (random_affine, contrastive_view):
        a = fn(x, torch.Generator().manual_seed(0))
        b = fn(x, torch.Generator().manual_seed(0))
        c = fn(x, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_random_affine_with_no_range_is_the_identity():
    x = torch.randn(4, 1, 8, 8)
    y = random_affine(x, torch.Generator().manual_seed(0), max_translate=0.0, max_degrees=0.0, scale=(1.0, 1.0))
    assert torch.allclose(x, y, atol=1e-5)
