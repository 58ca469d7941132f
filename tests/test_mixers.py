import pytest
import torch

from pipeline.mixers import MIXERS


@pytest.mark.parametrize("name", MIXERS.names())
def test_mixers_return_soft_labels(name):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    xm, ym = MIXERS[name](x, y, 10, 1.0)
    assert xm.shape == x.shape and ym.shape == (16, 10)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert (ym >= 0).all()


@pytest.mark.parametrize("name", MIXERS.names())
def test_mixers_repeat_under_a_seed(name):
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(3)
    a = MIXERS[name](x, y, 10, 1.0)
    torch.manual_seed(3)
    b = MIXERS[name](x, y, 10, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mixup_is_a_convex_combination_with_the_rolled_batch():
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8)
    xm, ym = MIXERS["mixup"](x, y, 8, 1.0)
    lam = ym[0, 0].item()  # sample 0 keeps weight lambda on its own label
    assert torch.allclose(xm, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_and_mixes_labels_by_area():
    torch.manual_seed(2)
    x = torch.zeros(4, 1, 8, 8)
    x[1:] = torch.arange(1, 4).float().view(3, 1, 1, 1)  # each image a constant
    y = torch.arange(4)
    xm, ym = MIXERS["cutmix"](x, y, 4, 1.0)
    for i in range(4):
        own = (xm[i] == x[i, 0, 0, 0]).float().mean().item()
        if x[i, 0, 0, 0] != x[i - 1, 0, 0, 0]:
            assert abs(ym[i, i].item() - own) < 1e-6, "label weight = area kept"


def test_no_mixing_is_one_hot():
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 2, 1, 2])
    xm, ym = MIXERS["none"](x, y, 3, 1.0)
    assert torch.equal(xm, x) and torch.equal(ym.argmax(1), y)
