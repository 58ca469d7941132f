import math

import torch
import torch.nn.functional as F

from pipeline.models import SmallCNN
from pipeline.objectives import OBJECTIVES, nt_xent


def nt_xent_loop(z1, z2, t):
    """Reference NT-Xent written term by term from Chen et al. 2020, eq. (1)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


def test_nt_xent_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert abs(nt_xent(z1, z2, 0.5).item() - nt_xent_loop(z1, z2, 0.5)) < 1e-5


def test_nt_xent_is_low_for_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(8, 16), 0.1)


def test_each_objective_gives_a_finite_differentiable_loss():
    model = SmallCNN(1, 10, 4)
    x, y, g = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)), torch.Generator().manual_seed(0)
    for name in OBJECTIVES.names():
        obj = OBJECTIVES[name](feature_dim=model.feature_dim, temperature=0.5)
        loss = obj(model, x, y, g)
        loss.backward()
        assert torch.isfinite(loss)
        assert any(p.grad is not None for p in model.body.parameters())
