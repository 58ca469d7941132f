import torch
from torch import nn

from pipeline.nn.batchnorm import has_batchnorm, recalibrate
from pipeline.nn.models import SmallCNN


def test_recalibration_sets_running_stats_to_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(100.0)  # stale statistics, as after merging
    x = torch.randn(300, 3) * 2 + 1
    recalibrate(model, x, batch_size=100)
    h = model[0](x).detach()
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-5)
    # the cumulative average of per-batch unbiased variances (equal batch sizes)
    per_batch = torch.stack([h[i : i + 100].var(0, unbiased=True) for i in range(0, 300, 100)]).mean(0)
    assert torch.allclose(model[1].running_var, per_batch, atol=1e-5)
    assert model[1].momentum == 0.1, "momentum restored"


def test_recalibration_restores_train_eval_mode():
    model = SmallCNN(1, 10, 4).eval()
    assert has_batchnorm(model)
    recalibrate(model, torch.randn(10, 1, 8, 8))
    assert not model.training
