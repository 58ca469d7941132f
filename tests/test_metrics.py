import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

from pipeline.evaluation.metrics import (
    brier_score,
    classification_report,
    fit_temperature,
    accuracy,
    expected_calibration_error,
    nll,
    per_class_accuracy,
    reliability_bins,
    shard_accuracy,
)


def sample(n=500, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return logits, y


def test_ece_agrees_with_torchmetrics():
    for seed in range(3):
        logits, y = sample(seed=seed)
        probs = logits.softmax(1)
        for bins in (5, 15):
            ref = MulticlassCalibrationError(num_classes=7, n_bins=bins, norm="l1")(probs, y).item()
            assert abs(expected_calibration_error(probs, y, bins) - ref) < 1e-6


def test_accuracy_and_nll():
    logits, y = sample()
    assert accuracy(logits, y) == (logits.argmax(1) == y).float().mean().item()
    assert abs(nll(logits, y) - F.cross_entropy(logits, y).item()) < 1e-6


def test_reliability_bins_count_everything():
    logits, y = sample()
    b = reliability_bins(logits.softmax(1), y, 10)
    assert b["count"].sum().item() == len(y)
    assert ((b["confidence"] >= 0) & (b["confidence"] <= 1)).all()


def test_shard_accuracy_reweights_classes():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    y = torch.tensor([0, 1, 1, 2])  # class 0: 1/1, class 1: 1/2, class 2: 1/1
    acc = per_class_accuracy(logits, y, 3)
    assert torch.allclose(acc, torch.tensor([1.0, 0.5, 1.0]))
    # a shard holding only class 1 sees 0.5; one with classes 0 and 1 equally sees 0.75
    assert shard_accuracy(acc, torch.tensor([0, 10, 0])) == 0.5
    assert abs(shard_accuracy(acc, torch.tensor([4, 4, 0])) - 0.75) < 1e-7


def test_brier_score_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 1])
    # (0.3^2 + 0.2^2 + 0.1^2) = 0.14 ; (0.1^2 + 0.9^2 + 0.8^2) = 1.46 ; mean 0.8
    assert abs(brier_score(probs, y) - 0.8) < 1e-6


def test_temperature_scaling_recovers_the_overconfidence_factor():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 5, generator=g) * 1.5
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)  # labels drawn from softmax(z): calibrated
    t = fit_temperature(3.0 * z, y)  # three times overconfident
    assert abs(t - 3.0) < 0.15
    report = classification_report(3.0 * z, y, 15, temperature=t)
    assert report["ece_scaled"] < report["ece"] / 3 and report["nll_scaled"] < report["nll"]


def test_device_knn_votes_as_scikit_learns_cosine_knn():
    """Checked against scikit-learn's KNeighborsClassifier (brute force, cosine metric), which
    the evaluate stage used before the vote moved onto the features' device."""
    from sklearn.neighbors import KNeighborsClassifier

    from pipeline.evaluation.probes import knn_predict

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g)
    y_train = torch.randint(0, 5, (400,), generator=g)
    train = centres[y_train] + 0.8 * torch.randn(400, 16, generator=g)
    y_query = torch.randint(0, 5, (150,), generator=g)
    query = centres[y_query] + 0.8 * torch.randn(150, 16, generator=g)
    ours = knn_predict(train, y_train, query, k=20, chunk=64)
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(train.numpy(), y_train.numpy())
    assert (ours.numpy() == ref.predict(query.numpy())).all()


def test_fixed_subsets_are_seeded_sorted_and_whole_when_small():
    from pipeline.evaluation.subsets import fixed_subset

    assert fixed_subset(10, 50, 0).tolist() == list(range(10))
    a, b, c = fixed_subset(1000, 100, 1), fixed_subset(1000, 100, 1), fixed_subset(1000, 100, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a.unique()) == 100 and (a.diff() > 0).all()


def test_pair_sample_is_bounded_seeded_and_complete_when_small():
    from pipeline.evaluation.compare import choose_pairs

    experts = [f"expert_{k}" for k in range(20)]
    assert len(choose_pairs(experts[:4], 6, 0)) == 6  # all C(4, 2)
    picked = choose_pairs(experts, 6, 0)
    assert len(picked) == 6 and picked == choose_pairs(experts, 6, 0) != choose_pairs(experts, 6, 1)
    assert all(int(a.removeprefix("expert_")) < int(b.removeprefix("expert_")) for a, b in picked)
    assert len(set(picked)) == 6
