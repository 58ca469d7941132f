import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.data_path import BatchSource
from pipeline.train.loop import Schedule, batches, fit

CPU = torch.device("cpu")


def test_batches_cover_every_index_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    seen = torch.cat(list(batches(103, 10, g, torch.device("cpu"))))
    assert sorted(seen.tolist()) == list(range(103))


def test_batches_drop_a_last_batch_of_one():
    g = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in batches(21, 10, g, torch.device("cpu"))]
    assert sizes == [10, 10]


def test_fit_learns_a_separable_problem_and_repeats_under_a_seed():
    def run():
        torch.manual_seed(0)
        x = torch.randn(200, 2)
        y = (x[:, 0] > 0).long()
        model = nn.Linear(2, 2)
        hist = fit(model.parameters(), lambda xb, yb: F.cross_entropy(model(xb), yb), BatchSource(x, y, CPU),
                   Schedule(20, 32, 0.5), torch.Generator().manual_seed(0), torch.device("cpu"))
        return hist, (model(x).argmax(1) == y).float().mean().item()

    (h1, acc1), (h2, _) = run(), run()
    assert h1 == h2
    assert h1[-1] < h1[0] / 3 and acc1 > 0.95
